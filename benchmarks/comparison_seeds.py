"""The comparison table (``comparison.py``) over seeds: mean ± standard deviation per method.

Reads ``rows.json`` of one ``comparison.py`` output folder per seed and writes ``OUT.md`` and ``OUT.json``:
per method, the number of seeds it has, and mean ± std (sample standard deviation, n - 1) of its edges,
held-out KL, held-out faithfulness, seconds and peak memory over the seeds that measured them. The
ensemble row is the one each seed chose by training KL, so its members can differ by seed: the table
names each seed's choice. A method measured on one seed only (ACDC: about six hours on 2 cores) shows
that one value and says so.

    .venv/bin/python benchmarks/comparison_seeds.py --out benchmarks/comparison/ioi-seeds \\
        benchmarks/comparison/ioi benchmarks/comparison/ioi-seed1 benchmarks/comparison/ioi-seed2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from hap.circuit import write_atomically

COLUMNS = (("edges", "edges", "{:,.0f}"), ("test_kl", "test KL", "{:.3f}"),
           ("test_faithfulness", "test faithfulness", "{:.3f}"), ("seconds", "seconds", "{:,.0f}"),
           ("peak_gib", "peak RSS (GiB)", "{:.2f}"))
ENSEMBLE = "ensemble (chosen by training KL)"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def method_of(row: dict[str, Any]) -> str:
    return ENSEMBLE if row["method"].startswith("ensemble") else row["method"]


def collect(folders: list[Path]) -> tuple[list[str], dict[str, list[tuple[str, dict[str, Any]]]]]:
    """(methods in the first folder's order, method -> [(folder name, row)] over the folders with a result)."""
    order: list[str] = []
    rows: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for folder in folders:
        path = folder / "rows.json"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: run benchmarks/comparison.py --out {folder} first")
        for row in json.loads(path.read_text()):
            name = method_of(row)
            if name not in order:
                order.append(name)
            if row.get("test_kl") is not None:
                rows.setdefault(name, []).append((folder.name, row))
    return order, rows


def cell(values: list[float], pattern: str) -> str:
    if not values:
        return ""
    mean, std = mean_std(values)
    return pattern.format(mean) + ("" if std is None else " ± " + pattern.format(std))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="comparison.py output folders, one per seed")
    parser.add_argument("--out", required=True, type=Path, help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    order, rows = collect(args.folders)
    lines = ["| method | seeds | " + " | ".join(label for _, label, _ in COLUMNS) + " | note |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    summary: dict[str, Any] = {"folders": [str(folder) for folder in args.folders], "methods": {}}
    for name in order:
        measured = rows.get(name, [])
        if not measured:
            lines.append(f"| {name} | 0 | " + " | " * len(COLUMNS) + "not run on any seed |")
            continue
        cells, entry = [], {"seeds": [seed for seed, _ in measured]}
        for key, _, pattern in COLUMNS:
            values = [float(row[key]) for _, row in measured if row.get(key) is not None]
            cells.append(cell(values, pattern))
            if values:
                mean, std = mean_std(values)
                entry[key] = {"mean": mean, "std": std, "values": values}
        note = ""
        if name == ENSEMBLE:
            note = "; ".join(f"{seed}: {row['method'].removeprefix('ensemble (').removesuffix(')')}"
                             for seed, row in measured)
        elif len(measured) == 1:
            note = f"one run ({measured[0][0]})"
        peaks = [seed for seed, row in measured if row.get("peak_gib") is not None]
        if len(measured) > 1 and 0 < len(peaks) < len(measured):
            note = (note + "; " if note else "") + f"peak RSS measured on {', '.join(peaks)} only"
        per_seed = ", ".join(f"{float(row['test_kl']):.3f}" for _, row in measured)
        note = (note + "; " if note else "") + f"test KL per seed: {per_seed}"
        summary["methods"][name] = entry
        lines.append(f"| {name} | {len(measured)} | " + " | ".join(cells) + f" | {note} |")
    table = "\n".join(lines) + "\n"
    write_atomically(args.out.with_suffix(".md"), table)
    write_atomically(args.out.with_suffix(".json"), json.dumps(summary, indent=1))
    print(table)


if __name__ == "__main__":
    main()

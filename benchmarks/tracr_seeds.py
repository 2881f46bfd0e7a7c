"""tracr recovery over seeds: how often each method recovers each program's true circuit exactly.

Reads the ``results.json`` that ``tracr_recovery.py`` writes in each folder (one folder per ``--seed``:
the seed draws the program's training and test inputs and the masks' noise) and writes ``OUT.md`` and
``OUT.json``: per program and ablation, for each method present in every folder, in how many seeds it
recovered the true circuit exactly and its mean recall; then per method the exact recoveries of each
seed (out of the cases) and their mean ± standard deviation. Refuses folders run with other settings
than the first (but the seed and the methods).

    .venv/bin/python benchmarks/tracr_seeds.py --out benchmarks/tracr-seeds \\
        benchmarks/tracr benchmarks/tracr-seed1 benchmarks/tracr-seed2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hap.circuit import write_atomically

COMPARED = ("programs", "ablations", "steps", "lr", "lambda_lr", "warmup_fraction", "n_test", "mask_init")


def read_folder(folder: Path) -> tuple[dict, dict[tuple[str, str, str], dict]]:
    """(settings, (program, ablation, method) -> row) of one ``tracr_recovery.py`` folder."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"{folder}: no results.json; run benchmarks/tracr_recovery.py --out {folder} first")
    document = json.loads(path.read_text())
    return document["settings"], {(r["program"], r["ablation"], r["method"]): r for r in document["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path, help="OUT.md and OUT.json are written")
    args = parser.parse_args()
    folders = [read_folder(folder) for folder in args.folders]
    first = {key: folders[0][0].get(key) for key in COMPARED}
    for folder, (settings, _) in zip(args.folders, folders):
        if {key: settings.get(key) for key in COMPARED} != first:
            raise SystemExit(f"{folder} was run with other settings than {args.folders[0]}; compare like with like")
    methods = [m for m in folders[0][0]["methods"] if all(m in settings["methods"] for settings, _ in folders)]
    cases = sorted({(p, a) for _, rows in folders for p, a, _ in rows})
    seeds = [settings["seed"] for settings, _ in folders]
    lines = [f"Exact recoveries over seeds {', '.join(map(str, seeds))} ({len(cases)} cases: program × ablation; "
             f"{first['steps']} steps, learning rates {first['lr']} / {first['lambda_lr']}). Each cell: seeds with "
             "the true circuit recovered exactly, of those run · mean recall.", "",
             "| program | ablation | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for program, ablation in cases:
        cells = []
        for method in methods:
            runs = [rows[(program, ablation, method)] for _, rows in folders if (program, ablation, method) in rows]
            exact = sum(bool(r["exact"]) for r in runs)
            cells.append(f"{exact}/{len(runs)} · {statistics.mean(r['recall'] for r in runs):.2f}" if runs else "n/a")
        lines.append(f"| {program} | {ablation} | " + " | ".join(cells) + " |")
    totals = {}
    for method in methods:
        per_seed = [sum(bool(rows[(p, a, method)]["exact"]) for p, a in cases if (p, a, method) in rows)
                    for _, rows in folders]
        totals[method] = per_seed
    lines += ["", "| method | exact recoveries per seed (of " + str(len(cases)) + ") | mean ± std |", "|---|---|---|"]
    for method, per_seed in totals.items():
        std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        lines.append(f"| {method} | {', '.join(map(str, per_seed))} | {statistics.mean(per_seed):.1f} ± {std:.1f} |")
    write_atomically(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_atomically(args.out.with_suffix(".json"), json.dumps(
        {"folders": [str(f) for f in args.folders], "seeds": seeds, "methods": methods, "exact_per_seed": totals,
         "cases": [list(case) for case in cases]}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

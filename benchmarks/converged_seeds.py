"""HAP against converged Edge Pruning over several seeds: mean ± standard deviation of every held-out number.

Reads the ``summary.json`` that ``converged.py report`` writes in each folder (one ``converged.py run``
per seed, e.g. ``--seed 1 --out benchmarks/converged/greater-than-seed1``, all with the same settings but
the seed) and writes ``OUT.md`` and ``OUT.json``: per seed and method the held-out KL, faithfulness and
accuracy, the seconds until HAP stays within 10% of Edge Pruning's final held-out KL and the speed-ups
against Edge Pruning (to stay there; end to end: EP's total seconds over the method's); then their means, sample standard deviations and ranges. Refuses folders whose
settings differ in anything but the seed.

    .venv/bin/python benchmarks/converged_seeds.py --out benchmarks/converged/greater-than-seeds \\
        benchmarks/converged/greater-than benchmarks/converged/greater-than-seed1 benchmarks/converged/greater-than-seed2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hap.circuit import write_atomically

METHODS = ("ep", "hap")
NUMBERS = (("test KL", lambda m: m["test"]["kl"]), ("test faithfulness", lambda m: m["test"]["faithfulness"]),
           ("test accuracy", lambda m: m["test"]["accuracy"]),
           ("seconds to stay within 10% of EP's final KL", lambda m: m.get("seconds_to_stay")),
           ("total seconds", lambda m: m.get("total_seconds")))


TIMED = ("seconds to stay within 10% of EP's final KL", "total seconds", "speed-up to stay", "speed-up end to end")


def read_seed(folder: Path) -> tuple[dict, dict]:
    """(settings, summary) of one seed's folder. A folder whose Edge Pruning run has not finished (no
    ``ep/circuit.json``) gives HAP's held-out numbers alone, without seconds (they are measured against EP)."""
    settings = json.loads((folder / "settings.json").read_text())
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        return settings, json.loads(summary_path.read_text())
    if not (folder / "ep" / "circuit.json").is_file() and (folder / "hap" / "circuit.json").is_file():
        held_out = json.loads((folder / "hap" / "circuit.json").read_text())["metrics"]
        return settings, {"methods": {"hap": {"test": held_out["test"]}}}
    raise SystemExit(f"{folder}: no summary.json; run `converged.py time` and `converged.py report` there first")


def spread(values: list[float | None]) -> str:
    """mean ± std (min to max) of the values that exist; 'n/a' for none."""
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    text = f"{statistics.mean(present):.3f} ± {std:.3f}" if max(map(abs, present)) < 100 else \
        f"{statistics.mean(present):.0f} ± {std:.0f}"
    missing = len(values) - len(present)
    return text + (f" ({missing} not reached)" if missing else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path, help="OUT.md and OUT.json are written")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="runs of each folder to tabulate (a variant re-timed with converged.py time --runs)")
    args = parser.parse_args()
    seeds = [read_seed(folder) for folder in args.folders]
    methods = args.methods.split(",")
    first = {k: v for k, v in seeds[0][0].items() if k != "seed"}
    for folder, (settings, _) in zip(args.folders, seeds):
        if {k: v for k, v in settings.items() if k != "seed"} != first:
            raise SystemExit(f"{folder} was run with other settings than {args.folders[0]}; compare like with like")
    rows = []
    for folder, (settings, summary) in zip(args.folders, seeds):
        ep_stay = summary["methods"].get("ep", {}).get("seconds_to_stay")
        ep_total = summary["methods"].get("ep", {}).get("total_seconds")
        for method in methods:
            values = summary["methods"].get(method)
            if values is None:  # Edge Pruning not finished for this seed
                continue
            row = {"seed": settings["seed"], "method": method, "folder": str(folder), "ep_finished": "ep" in summary["methods"]}
            row.update({name: get(values) for name, get in NUMBERS})
            stay = values.get("seconds_to_stay")
            row["speed-up to stay"] = ep_stay / stay if stay and ep_stay else None
            total = values.get("total_seconds")
            row["speed-up end to end"] = ep_total / total if total and ep_total else None
            rows.append(row)
    columns = [name for name, _ in NUMBERS] + ["speed-up to stay", "speed-up end to end"]
    unfinished = [str(s["seed"]) for s, summary in seeds if "ep" not in summary["methods"]]
    lines = [f"{first['model']} {first['task']}, sparsity {first['sparsity']}: Edge Pruning {first['ep_steps']} steps, "
             f"HAP {first['hap_steps']} steps, {first['n_examples']} training examples; seeds "
             f"{', '.join(str(s['seed']) for s, _ in seeds)}; held-out test split of each seed"
             + (f"; Edge Pruning not finished for seed {', '.join(unfinished)} (HAP's numbers only, no seconds)"
                if unfinished else ""), "",
             "| seed | method | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = ["n/a" if row[c] is None else (f"{row[c]:.3f}" if abs(row[c]) < 100 else f"{row[c]:.0f}")
                 for c in columns]
        lines.append(f"| {row['seed']} | {row['method']} | " + " | ".join(cells) + " |")
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        # seconds are measured against the seed's own Edge Pruning: only seeds where it finished count there
        cells = [spread([r[c] for r in mine if r["ep_finished"] or c not in TIMED]) for c in columns]
        lines.append(f"| mean ± std | {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_atomically(args.out.with_suffix(".md"), text)
    write_atomically(args.out.with_suffix(".json"), json.dumps({"settings": first, "rows": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A step budget chosen on the validation split, from several seeds' ``along_the_run.json``.

Reads each run folder's ``along_the_run.json`` (``along_the_run.py``, with the validation split measured)
and writes ``OUT.md`` and ``OUT.json``: per snapshot step the mean ± standard deviation over the runs of
the validation KL, the test KL and the test faithfulness; the step whose mean validation KL is lowest;
and the budget: the earliest step whose mean validation KL is within ``--tolerance`` (relative) of that
lowest mean. The test columns are read off at the chosen step only to report it; they choose nothing.

    .venv/bin/python benchmarks/along_the_run_seeds.py --out benchmarks/converged/ioi-seeds-along \\
        benchmarks/converged/ioi/hap benchmarks/converged/ioi-seed1/hap benchmarks/converged/ioi-seed2/hap
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hap.circuit import write_atomically

COLUMNS = (("validation KL", "validation_kl"), ("test KL", "test_kl"), ("test faithfulness", "test_faithfulness"),
           ("train KL (in-sample)", "train_kl"))


def read_rows(run: Path) -> dict[int, dict]:
    """step -> row of one run's ``along_the_run.json``; refuses a run whose validation split was not measured."""
    path = run / "along_the_run.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no along_the_run.json; run benchmarks/along_the_run.py {run} first")
    rows = {row["step"]: row for row in json.loads(path.read_text())}
    if not all("validation_kl" in row for row in rows.values()):
        raise SystemExit(f"{run}: the validation split was not measured; run benchmarks/along_the_run.py {run} "
                         "--splits validation")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding along_the_run.json")
    parser.add_argument("--out", required=True, type=Path, help="OUT.md and OUT.json are written")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="the budget: earliest step within this share of the lowest mean validation KL")
    args = parser.parse_args()
    runs = [read_rows(run) for run in args.runs]
    steps = sorted(set.intersection(*(set(rows) for rows in runs)))
    if not steps:
        raise SystemExit("the runs share no snapshot step")
    table = {}
    for step in steps:
        table[step] = {}
        for _, key in COLUMNS:
            values = [rows[step][key] for rows in runs]
            table[step][key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    best = min(steps, key=lambda step: table[step]["validation_kl"][0])
    limit = table[best]["validation_kl"][0] * (1 + args.tolerance)
    budget = next(step for step in steps if table[step]["validation_kl"][0] <= limit)
    lines = [f"Mean ± standard deviation over {len(runs)} runs ({', '.join(map(str, args.runs))}) of the circuit "
             "read off each snapshot (200 examples per split; validation: fresh draws of the training distribution, "
             "never fitted on; test: held-out templates and names).", "",
             f"Lowest mean validation KL at step {best}; budget (earliest step within {args.tolerance:.0%} of it): "
             f"**step {budget}** (the last snapshot: step {steps[-1]}).", "",
             "| step | " + " | ".join(name for name, _ in COLUMNS) + " |",
             "| --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    for step in steps:
        cells = [f"{table[step][key][0]:.3f} ± {table[step][key][1]:.3f}" for _, key in COLUMNS]
        mark = " (budget)" if step == budget else ""
        lines.append(f"| {step}{mark} | " + " | ".join(cells) + " |")
    document = {"runs": [str(run) for run in args.runs], "tolerance": args.tolerance, "lowest_step": best,
                "budget_step": budget, "last_step": steps[-1],
                "steps": {str(step): {key: {"mean": m, "std": s} for key, (m, s) in table[step].items()}
                          for step in steps}}
    write_atomically(args.out.with_suffix(".json"), json.dumps(document, indent=1))
    write_atomically(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Run one ``hap discover`` command over several seeds and report every held-out metric as mean ± std.

``--seed`` draws the task (the training split with the seed, the test split with seed + 1, both from
their own templates and names) and, for Edge Pruning and HAP, the masks' noise and initialisation.
Each seed's run directory is ``OUT/seed-N``: a finished run is read, not redone; an interrupted
pruning run resumes; so the script can be stopped and started again at any time. The summary
(``OUT/seeds.json`` and ``OUT/seeds.md``, written atomically after every seed; a seed whose row is
there and whose directory is gone is read from it) holds per seed the
held-out KL (squared error for a numerical program), logit difference, accuracy and faithfulness,
the edges kept and the seconds spent, then mean, sample standard deviation, minimum and maximum.

    .venv/bin/python benchmarks/seeds.py --out benchmarks/seeds/demo --seeds 0 1 2 3 4 -- \\
        --model smollm2-135m --task ioi --method hap --sparsity 0.95

Everything after ``--`` is passed to ``hap discover`` (without ``--out``, ``--seed``, ``--force``,
which the script sets). Run it alone: other CPU work slows pruning many times over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

METRICS = ("kl", "logit_diff", "accuracy", "faithfulness")
OWN_FLAGS = ("--out", "--seed", "--force", "--resume")


def run_seed(discover_args: list[str], folder: Path, seed: int) -> None:
    """One seed's run: kept if finished, resumed if a pruning run stopped, else started."""
    if (folder / "circuit.json").exists():
        return
    hap_command = str(Path(sys.executable).with_name("hap"))
    if (folder / "run.json").exists() and (folder / "checkpoint.pt").exists():
        command = [hap_command, "discover", "--resume", str(folder)]
    else:
        command = [hap_command, "discover", *discover_args, "--seed", str(seed), "--out", str(folder), "--force"]
    print("$", " ".join(command), flush=True)
    env = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184", **os.environ}
    finished = subprocess.run(command, env=env)
    if finished.returncode != 0:
        raise SystemExit(f"seed {seed}: hap discover stopped with exit status {finished.returncode} (its message is "
                         "above); fix that and run this again: finished seeds are kept, a pruning run resumes")


def seed_row(folder: Path, seed: int) -> dict:
    """The held-out metrics, size and time of one finished run."""
    document = json.loads((folder / "circuit.json").read_text())
    test = document["metrics"]["test"]
    runtime = document.get("runtime_s", {})
    return {"seed": seed, **{name: test.get(name) for name in METRICS}, "n_edges": test.get("n_edges"),
            "n_examples": test.get("n_examples"),
            "seconds": round(sum(v for v in runtime.values() if isinstance(v, (int, float))), 1),
            "converged": document.get("config", {}).get("converged")}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), minimum and maximum."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summary(rows: list[dict]) -> dict:
    """``spread`` of every metric over the seeds that have a value for it."""
    out = {}
    for name in (*METRICS, "n_edges", "seconds"):
        values = [row[name] for row in rows if row.get(name) is not None]
        if values:
            out[name] = spread([float(v) for v in values])
    return out


def markdown(command: str, rows: list[dict], stats: dict) -> str:
    """The per-seed table and the mean ± std line."""
    lines = [f"`hap discover {command}`, seeds {', '.join(str(row['seed']) for row in rows)}; held-out test split", "",
             "| seed | KL | logit diff | accuracy | faithfulness | edges | seconds |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[name]:.3f}" if row.get(name) is not None else "n/a" for name in METRICS]
        lines.append(f"| {row['seed']} | " + " | ".join(cells) + f" | {row['n_edges']:,} | {row['seconds']:.0f} |")
    cells = [f"{stats[name]['mean']:.3f} ± {stats[name]['std']:.3f}" if name in stats else "n/a" for name in METRICS]
    lines.append("| mean ± std | " + " | ".join(cells) + f" | {stats['n_edges']['mean']:,.0f} | "
                 f"{stats['seconds']['mean']:.0f} |")
    ranges = [f"{stats[name]['min']:.3f} to {stats[name]['max']:.3f}" if name in stats else "n/a" for name in METRICS]
    lines.append("| range | " + " | ".join(ranges) + " | | |")
    return "\n".join(lines) + "\n"


def earlier_rows(out: Path, command: str) -> dict[int, dict]:
    """The rows ``seeds.json`` already holds, by seed (run directories are large and not kept in git); a
    summary of another command is refused rather than mixed in."""
    path = out / "seeds.json"
    if not path.exists():
        return {}
    document = json.loads(path.read_text())
    if document["command"] != command:
        raise SystemExit(f"{path} summarises another command ({document['command']!r}); use another --out")
    return {row["seed"]: row for row in document["seeds"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("give the discover arguments after --, e.g. seeds.py --out DIR -- --model tiny-gpt2 ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv[:split])
    discover_args = argv[split + 1:]
    clashing = [flag for flag in discover_args if flag.split("=")[0] in OWN_FLAGS]
    if clashing:
        raise SystemExit(f"drop {', '.join(clashing)} after --: the script sets them per seed")
    from hap.circuit import write_atomically

    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(discover_args)
    recorded = earlier_rows(args.out, command)
    rows = []
    for seed in args.seeds:
        folder = args.out / f"seed-{seed}"
        if seed in recorded and not (folder / "circuit.json").exists():
            rows.append(recorded[seed])  # its run directory is not in git; its row is
        else:
            run_seed(discover_args, folder, seed)
            rows.append(seed_row(folder, seed))
        stats = summary(rows)
        write_atomically(args.out / "seeds.json", json.dumps({"command": command, "seeds": rows, "summary": stats},
                                                              indent=1))
        write_atomically(args.out / "seeds.md", markdown(command, rows, stats))
    print((args.out / "seeds.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

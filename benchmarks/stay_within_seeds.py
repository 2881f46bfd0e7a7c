"""When HAP and Edge Pruning get within 10% of Edge Pruning's final held-out KL for good, judged on the whole
test split (200 examples) instead of the 64-example monitor.

For each ``converged.py`` folder (one per seed) whose ``ep`` and ``hap`` runs have ``along_the_run.json``
(``along_the_run.py RUN --splits test``: the circuit of every snapshot on the test split), the threshold is
1.1 x Edge Pruning's final test KL (``summary.json``); a method *stays* from the first snapshot after which
every later snapshot is within it. Seconds are the re-timed training seconds at that step
(``converged.py``'s ``timing.json``; HAP's attribution stage included). A folder without one of the two files
(or whose file stops before the run's last step) is left out and named. Writes ``OUT.md`` and ``OUT.json``.

    .venv/bin/python benchmarks/stay_within_seeds.py --out benchmarks/converged/ioi-seeds-stay \\
        benchmarks/converged/ioi-seed1 benchmarks/converged/ioi-seed2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from converged import WITHIN, _seconds_at  # the benchmark beside this script: the same threshold and clock

from hap.circuit import write_atomically


def stay(points: list[tuple[int, float, float]], threshold: float) -> tuple[int, float] | None:
    """(step, seconds) from which every later point's KL is within ``threshold``; None if the last is not."""
    settled = None
    for step, seconds, kl in points:
        settled = (settled or (step, seconds)) if kl <= threshold else None
    return settled


def one_seed(folder: Path) -> dict[str, Any] | str:
    """The row of one converged.py folder, or why it is left out."""
    summary = json.loads((folder / "summary.json").read_text())
    timing = json.loads((folder / "timing.json").read_text())
    ep_final = summary["methods"]["ep"]["test"]["kl"]
    threshold = (1 + WITHIN) * ep_final
    row: dict[str, Any] = {"folder": folder.name, "ep_final_test_kl": ep_final, "threshold": threshold}
    for method in ("ep", "hap"):
        path = folder / method / "along_the_run.json"
        if not path.is_file():
            return f"{folder.name}: no {method}/along_the_run.json (along_the_run.py {folder / method} --splits test)"
        records = [r for r in json.loads(path.read_text()) if "test_kl" in r]
        steps = [r["step"] for r in records]
        if not steps or steps[-1] != summary["methods"][method]["steps"]:
            return (f"{folder.name}: {method}/along_the_run.json ends at step {steps[-1] if steps else 0}, before "
                    f"the run's last ({summary['methods'][method]['steps']}): run along_the_run.py again (it resumes)")
        offset = timing[method].get("attribution_seconds", 0.0)
        seconds = [offset + s for s in _seconds_at(timing[method], steps)]
        points = list(zip(steps, seconds, [r["test_kl"] for r in records]))
        settled = stay(points, threshold)
        row[method] = {"snapshots": len(points), "last_step": steps[-1] if steps else None,
                       "stay_step": settled[0] if settled else None, "stay_seconds": settled[1] if settled else None,
                       "total_seconds": summary["methods"][method]["total_seconds"]}
    if row["ep"]["stay_seconds"] and row["hap"]["stay_seconds"]:
        row["speed_up"] = row["ep"]["stay_seconds"] / row["hap"]["stay_seconds"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="converged.py folders, one per seed")
    parser.add_argument("--out", required=True, type=Path, help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    rows, left_out = [], []
    for folder in args.folders:
        result = one_seed(folder)
        (left_out if isinstance(result, str) else rows).append(result)
    lines = ["| seed folder | EP final test KL | within 10% | EP stays from (step, s) | HAP stays from (step, s) "
             "| speed-up (EP s / HAP s) |", "|---|---|---|---|---|---|"]

    def cell(entry: dict[str, Any]) -> str:
        if entry["stay_step"] is None:
            return f"never (last snapshot: step {entry['last_step']})"
        return f"{entry['stay_step']}, {entry['stay_seconds']:,.0f}"

    for row in rows:
        speed = f"{row['speed_up']:.1f}x" if "speed_up" in row else ""
        lines.append(f"| {row['folder']} | {row['ep_final_test_kl']:.3f} | {row['threshold']:.3f} | "
                     f"{cell(row['ep'])} | {cell(row['hap'])} | {speed} |")
    lines += [""] + [f"Left out: {reason}" for reason in left_out]
    write_atomically(args.out.with_suffix(".md"), "\n".join(lines).rstrip() + "\n")
    write_atomically(args.out.with_suffix(".json"), json.dumps({"rows": rows, "left_out": left_out}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

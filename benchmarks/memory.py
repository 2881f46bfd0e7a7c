"""Peak memory of an Edge Pruning run against the number of training examples (issue 8, item 2).

Runs ``hap discover --method ep`` in a fresh process per setting and reads its peak resident set
size from the kernel (``ru_maxrss`` of the finished child). Every run takes the same number of steps,
so the batches it visits, not the examples it could visit, decide what its cache holds:

* bounded: the default ``--reference-memory`` (references beyond it are recomputed when visited);
* unbounded: ``--reference-memory 1000`` (every visited batch is kept, as before issue 8).

Usage: .venv/bin/python benchmarks/memory.py [--examples 200,2000,20000] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_gib(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of one child process running ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("run the settings from the smallest peak to the largest, or one per process")
    return after / 2**20, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", default="200,2000,20000")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--unbounded", default="200,2000", help="example counts also run with no memory bound")
    args = parser.parse_args()
    hap = str(Path(sys.executable).with_name("hap"))
    results = []
    settings = [(int(n), None) for n in args.examples.split(",")]
    settings += [(int(n), 1000.0) for n in args.unbounded.split(",") if n]
    with tempfile.TemporaryDirectory() as folder:
        for n, memory in settings:
            argv = [hap, "discover", "--model", args.model, "--method", "ep", "--sparsity", "0.95",
                    "--n-examples", str(n), "--steps", str(args.steps), "--n-test", "16", "--monitor-examples", "8",
                    "--no-report", "--out", str(Path(folder) / f"run-{n}-{memory}")]
            if memory is not None:
                argv += ["--reference-memory", str(memory)]
            # ru_maxrss of children is the largest so far, so each setting is measured by its own interpreter.
            child = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], check=True,
                                   capture_output=True, text=True)
            peak, seconds = json.loads(child.stdout)
            label = "default budget" if memory is None else "unbounded"
            results.append((n, label, peak, seconds))
            print(f"{n:>6} examples, {label:14s}: peak RSS {peak:.2f} GiB ({seconds:.0f} s)", flush=True)
    base = {label: peak for n, label, peak, _ in results if n == min(r[0] for r in results)}
    print("\n| training examples | cache | peak RSS (GiB) | vs the same cache at the fewest examples |")
    print("| --- | --- | --- | --- |")
    for n, label, peak, _ in results:
        print(f"| {n:,} | {label} | {peak:.2f} | {peak / base[label]:.2f}x |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(peak_rss_gib(json.loads(sys.argv[2]))))
    else:
        main()

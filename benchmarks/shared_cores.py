"""An Edge Pruning step alone and beside one competing busy process: how much slower, per thread setting.

Each setting runs in a fresh process (OpenMP reads its environment once, when torch starts its
threads) that loads the model, makes one IOI batch and times ``--repeats`` Edge Pruning steps (the
middle of a run: every edge live, half of them open, as ``step_cost.py``'s "EP, middle") after one
warm-up step. It runs once alone and once while another process keeps one core busy (a Python
loop). Settings:

* ``torch default``: what torch does with no environment (one thread per host core, libgomp's
  default spin-wait);
* ``hap``: what the ``hap`` command sets (``hap.threads.prepare_threads``: the usable CPUs, threads that
  sleep at once while they wait, ``OMP_WAIT_POLICY=PASSIVE``);
* ``spin N``: as hap, but threads spin N iterations before they sleep (``GOMP_SPINCOUNT``; libgomp's
  default is 300,000);
* ``1 thread``.

Prints, per setting, the seconds per step alone and shared, the slowdown (shared / alone) and the
cost alone against torch's default; all measured in this one run. Run it with nothing else busy.

    .venv/bin/python benchmarks/shared_cores.py [--model smollm2-135m] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "torch default": {},
    "hap": {"HAP_PREPARE": "1"},
    "spin 1,000": {"HAP_PREPARE": "1", "GOMP_SPINCOUNT": "1000"},
    "spin 10,000": {"HAP_PREPARE": "1", "GOMP_SPINCOUNT": "10000"},
    "1 thread": {"HAP_PREPARE": "1", "HAP_THREADS": "1"},
}
CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "HAP_THREADS", "MKL_NUM_THREADS")


def child(model_name: str, batch_size: int, repeats: int) -> None:
    """Time the steps in this process and print one JSON line."""
    threads = None
    if os.environ.get("HAP_PREPARE"):
        from hap.threads import prepare_threads

        threads = prepare_threads()
    import torch

    import hap
    from hap.batches import ReferenceCache, TaskBatches
    from step_cost import ep_middle_log_alpha, pruning_step  # the benchmark beside this one

    model = hap.load_model(model_name)
    graph = hap.Graph.from_model(model)
    task = hap.load_task("ioi", model.tokenizer, batch_size, seed=0)
    batch = TaskBatches(model, graph, task, batch_size, cache=ReferenceCache(10**11))[0]
    scores = hap.attribute(model, task, "eap").values
    step = pruning_step(model, graph, batch, graph.real, ep_middle_log_alpha(graph, scores))
    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    print(json.dumps({"seconds": (time.perf_counter() - started) / repeats, "threads": torch.get_num_threads(),
                      "prepared": threads}), flush=True)


def measure(setting: dict[str, str], args: argparse.Namespace) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in CLEARED}
    env.update(setting)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", args.model,
               "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.batch_size, args.repeats)
        return 0
    rows = []
    for name, setting in SETTINGS.items():
        alone = measure(setting, args)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)
            shared = measure(setting, args)
        finally:
            busy.kill()
            busy.wait()
        rows.append((name, alone, shared))
        print(f"{name}: {alone['seconds']:.2f} s alone, {shared['seconds']:.2f} s shared", file=sys.stderr, flush=True)
    default_alone = rows[0][1]["seconds"]
    print(f"EP step on {args.model}, IOI batch {args.batch_size}, mean of {args.repeats}; {os.cpu_count()} cores, "
          f"one competing busy process in the 'shared' column; {time.strftime('%Y-%m-%d')}\n")
    print("| setting | threads | s/step alone | s/step shared | slowdown shared/alone | alone vs torch default |")
    print("|---|---|---|---|---|---|")
    for name, alone, shared in rows:
        print(f"| {name} | {alone['threads']} | {alone['seconds']:.2f} | {shared['seconds']:.2f} | "
              f"{shared['seconds'] / alone['seconds']:.2f}x | {alone['seconds'] / default_alone:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

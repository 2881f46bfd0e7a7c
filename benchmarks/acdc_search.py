"""What the threshold search for ACDC of a given size costs: plain bisection against ``search_threshold``.

``hap discover --method acdc --edges N`` runs several full sweeps. The plain way bisects tau on a log
scale and runs each sweep from scratch. ``hap.acdc.search_threshold`` predicts the next tau from the
nearest finished sweep's measured rises, replays the prefix a new sweep shares with an earlier one
(exact) and stops a sweep once its decided edges keep too many. Both stop at the first finished sweep
keeping N to N * (1 + tolerance) edges (the plain bisection is given that stop as well, for fairness),
at most ``--runs`` sweeps each. Counted: sweeps, test forwards (deterministic) and seconds, in one
process, one after the other; the kept edge count each ends with.

Tiny random models (their rises are about 1e-7..1e-4, hence the bracket [1e-9, 1e-3]); SmolLM2's
sweep (about 16 hours per tau on 2 cores) has not been run.

Usage: .venv/bin/python benchmarks/acdc_search.py [--runs 6] [--tolerance 0.1]
"""

from __future__ import annotations

import argparse
import math
import time

import hap
from hap.acdc import AcdcConfig, acdc, search_threshold
from hap.batches import TaskBatches
from hap.graph import Graph
from hap.tasks import load_task

LOW, HIGH = 1e-9, 1e-3


def bisection(model, task, config, data, n_edges, runs, tolerance):
    """The plain search: log-scale bisection, every sweep from scratch; (kept, sweeps, forwards)."""
    low, high, results = LOW, HIGH, []
    for _ in range(runs):
        tau = float(f"{math.sqrt(low * high):.4g}")
        state = acdc(model, task, AcdcConfig(threshold=tau, ablation=config.ablation,
                                             tests_per_forward=config.tests_per_forward), data)
        kept = int(state.kept.sum())
        results.append((kept, state.forwards))
        if n_edges <= kept <= math.floor(n_edges * (1 + tolerance)):
            break
        low, high = (tau, high) if kept > n_edges else (low, tau)
    enough = [kept for kept, _ in results if kept >= n_edges]
    return (min(enough) if enough else max(kept for kept, _ in results)), len(results), sum(f for _, f in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--tolerance", type=float, default=0.1)
    args = parser.parse_args()
    print("| model | ablation | N | bisection: sweeps · forwards · s · kept | search: sweeps · forwards · s · kept "
          "· replayed decisions | forwards ratio | seconds ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    totals = [0, 0, 0.0, 0.0]
    for name in ("tiny-gpt2", "tiny-llama"):
        model = hap.load_model(name, device="cpu", dtype="float64")
        graph = Graph.from_model(model)
        task = load_task("ioi", model.tokenizer, 8, seed=2)
        for ablation in ("interchange", "mean"):
            data = list(TaskBatches(model, graph, task, 4, ablation))
            config = AcdcConfig(threshold=0.0, ablation=ablation, tests_per_forward=8)
            for share in (0.05, 0.15, 0.3):
                n_edges = max(1, round(share * graph.n_edges))
                started = time.perf_counter()
                plain_kept, plain_sweeps, plain_forwards = bisection(model, task, config, data, n_edges, args.runs,
                                                                     args.tolerance)
                plain_seconds = time.perf_counter() - started
                started = time.perf_counter()
                _, state, sweeps = search_threshold(model, task, config, data, n_edges, runs=args.runs, low=LOW,
                                                    high=HIGH, tolerance=args.tolerance)
                seconds = time.perf_counter() - started
                forwards = sum(sweep.state.forwards for sweep in sweeps)
                replayed = sum(sweep.state.replayed for sweep in sweeps)
                totals = [totals[0] + plain_forwards, totals[1] + forwards, totals[2] + plain_seconds,
                          totals[3] + seconds]
                print(f"| {name} | {ablation} | {n_edges} | {plain_sweeps} · {plain_forwards} · {plain_seconds:.1f} · "
                      f"{plain_kept} | {len(sweeps)} · {forwards} · {seconds:.1f} · {int(state.kept.sum())} · "
                      f"{replayed} | {plain_forwards / forwards:.2f}x | {plain_seconds / seconds:.2f}x |", flush=True)
    print(f"\nall: forwards {totals[0]} against {totals[1]} ({totals[0] / totals[1]:.2f}x), seconds "
          f"{totals[2]:.1f} against {totals[3]:.1f} ({totals[2] / totals[3]:.2f}x)")


if __name__ == "__main__":
    main()

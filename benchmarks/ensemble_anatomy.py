"""What each ensemble circuit is made of, read from finished runs (no model loaded).

For the source runs (circuits of one model and task) and the ensembles built from them: each circuit's
size and held-out KL, how many of each circuit's edges every other circuit shares, and, per source,
the largest group of tied top scores and the normalised rank that group gets (ties share their mean
rank, ``hap.ensemble.normalised_ranks``). For runs that score only part of the graph (HAP scores
its candidates, 0 elsewhere): how many of each circuit's edges lie inside that part. For each
ensemble and each run it combines (read from the ensemble's ``config.runs``): how many of the
ensemble's edges that run scores above 0 and how many are in its tied top group, and for min and max
how many take their score from that run's rank.

    .venv/bin/python benchmarks/ensemble_anatomy.py \\
        --sources benchmarks/comparison/ioi/eap benchmarks/converged/ioi/eap-ig \\
                  benchmarks/converged/ioi/ep benchmarks/converged/ioi/hap \\
        --ensembles benchmarks/comparison/ioi/ensemble-mean benchmarks/comparison/ioi/ensemble-min \\
                    benchmarks/comparison/ioi/ensemble-max
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hap.circuit import Circuit
from hap.ensemble import normalised_ranks
from hap.graph import Graph


def _test_kl(circuit: Circuit) -> str:
    test = circuit.metrics.get("test", {})
    return f"{test['kl']:.3f}" if "kl" in test else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", required=True, help="run directories the ensembles combine")
    parser.add_argument("--ensembles", nargs="*", default=[], help="hap ensemble output directories")
    args = parser.parse_args()

    sources = {Path(run).name: Circuit.load(run) for run in args.sources}
    ensembles = {Path(run).name: Circuit.load(run) for run in args.ensembles}
    if len(sources) + len(ensembles) < len(args.sources) + len(args.ensembles):
        parser.error("two runs share a folder name; the tables name each run by its folder")
    everything = {**sources, **ensembles}
    graph = Graph.from_layout(next(iter(sources.values())).layout)
    real = graph.real

    print("| circuit | edges | held-out KL | " + " | ".join(f"shared with {name}" for name in everything) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in everything) + " |")
    for name, circuit in everything.items():
        kept = circuit.in_graph & real
        shared = [int((kept & other.in_graph).sum()) / max(1, int(kept.sum())) for other in everything.values()]
        cells = " | ".join(f"{share:.2f}" for share in shared)
        print(f"| {name} | {int(kept.sum()):,} | {_test_kl(circuit)} | {cells} |")

    ranks = torch.stack([normalised_ranks(graph, circuit.scores) for circuit in sources.values()])
    print("\n| source | distinct scores | largest tie at the top | its normalised rank | edges scored 0 |")
    print("| --- | --- | --- | --- | --- |")
    for (name, circuit), rank in zip(sources.items(), ranks):
        values = circuit.scores.abs()[real]
        top = values.max()
        print(f"| {name} | {len(values.unique()):,} | {int((values == top).sum()):,} | "
              f"{float(rank[real][values == top][0]):.3f} | {int((values == 0).sum()):,} |")

    restricted = {name: circuit for name, circuit in sources.items()
                  if int((real & (circuit.scores == 0)).sum()) > 0.01 * graph.n_edges}  # HAP: its candidates
    if restricted:
        print("\nRuns that score only part of the graph (HAP: its candidates), and how many of each circuit's "
              "edges lie inside that part:\n")
        print("| circuit | " + " | ".join(f"inside {name}'s scored edges" for name in restricted) + " |")
        print("| --- | " + " | ".join("---" for _ in restricted) + " |")
        for name, circuit in everything.items():
            kept = circuit.in_graph & real
            inside = [f"{int((kept & (run.scores != 0)).sum()):,} of {int(kept.sum()):,}"
                      for run in restricted.values()]
            print(f"| {name} | " + " | ".join(inside) + " |")

    print("\nPer ensemble and per run it combines: of the ensemble's edges, how many that run scores above 0, "
          "how many are in its tied top group, and (min, max) how many take their score from that run's rank "
          "(an edge where runs tie counts for each).\n")
    print("| ensemble | run | scored above 0 | in its top tie | score from its rank |")
    print("| --- | --- | --- | --- | --- |")
    for name, circuit in ensembles.items():
        how = circuit.config.get("how")
        kept = circuit.in_graph & real
        members = {Path(run).name: Circuit.load(run) for run in circuit.config.get("runs", [])}
        ranks = torch.stack([normalised_ranks(graph, member.scores)[kept] for member in members.values()])
        decisive = {"max": ranks.max(0).values, "min": ranks.min(0).values}.get(how)
        for (member_name, member), rank in zip(members.items(), ranks):
            values = member.scores.abs()
            scored, top_tie = int((kept & (values > 0)).sum()), int((kept & (values == values[real].max())).sum())
            from_it = f"{int((rank == decisive).sum()):,}" if decisive is not None else "-"
            print(f"| {name} | {member_name} | {scored:,} | {top_tie:,} | {from_it} |")


if __name__ == "__main__":
    main()

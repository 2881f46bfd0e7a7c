"""How much of other circuits HAP's candidate set can hold, per candidate margin (no model loaded).

HAP prunes only inside its candidates (the top ``--candidates`` fraction of edges by its stage-1
attribution scores, dangling ones dropped: ``hap.hybrid.select_candidates``), so an edge outside them
can never be in its circuit. This reads a HAP run's saved stage-1 scores (``attribution.pt``) and, for
several candidate fractions, counts the candidates and how many edges of each reference circuit (say,
Edge Pruning's on the same task) they contain. It says what margin a HAP run would need to be able to
find a given circuit; it says nothing about whether pruning would find it.

    .venv/bin/python benchmarks/candidate_coverage.py --hap benchmarks/converged/ioi/hap \\
        --references benchmarks/converged/ioi/ep benchmarks/converged/ioi/eap-ig
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hap.circuit import Circuit, edges_for_sparsity
from hap.graph import Graph
from hap.hybrid import select_candidates

DEFAULT_MARGINS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hap", required=True, help="a HAP run directory (holds attribution.pt and circuit.json)")
    parser.add_argument("--references", nargs="+", required=True, help="run directories of the circuits to hold")
    parser.add_argument("--margins", nargs="+", type=float, default=DEFAULT_MARGINS,
                        help="candidates per circuit edge (HAP's default is 1.5)")
    args = parser.parse_args()

    hap_run = Path(args.hap)
    saved = hap_run / "attribution.pt"
    if not saved.is_file():
        parser.error(f"{saved} is missing: --hap must be a HAP run directory that finished stage 1")
    circuit = Circuit.load(hap_run)
    graph = Graph.from_layout(circuit.layout)
    scores = torch.load(saved, map_location="cpu", weights_only=True)
    if tuple(scores.shape) != tuple(graph.real.shape):
        parser.error(f"{saved} holds scores of shape {tuple(scores.shape)}, not this graph's {tuple(graph.real.shape)}")
    sparsity = circuit.config.get("pruning", {}).get("target_sparsity", circuit.config.get("target_sparsity"))
    if sparsity is None:
        parser.error(f"{hap_run}/circuit.json does not record the target sparsity")
    target = edges_for_sparsity(graph, float(sparsity))
    references = {Path(run).name: Circuit.load(run).in_graph & graph.real for run in args.references}

    print(f"Target: {target:,} edges (sparsity {float(sparsity):g}) of {graph.n_edges:,}; "
          f"this HAP run had {circuit.config.get('n_candidates', '?'):,} candidates.\n")
    print("| margin | fraction of edges | candidates | " +
          " | ".join(f"{name}'s edges inside" for name in references) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in references) + " |")
    for margin in args.margins:
        fraction = min(1.0, margin * target / graph.n_edges)
        candidates = select_candidates(graph, scores, fraction, at_least=target)
        cells = [f"{int((kept & candidates).sum()):,} of {int(kept.sum()):,} "
                 f"({int((kept & candidates).sum()) / max(1, int(kept.sum())):.0%})" for kept in references.values()]
        print(f"| {margin:g} | {fraction:.3f} | {int(candidates.sum()):,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

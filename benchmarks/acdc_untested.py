"""How much of an ACDC sweep is decided without a forward (``hap.acdc.reaches_nothing``), estimated.

ACDC visits readers latest first; a reader whose sources have lost every out-edge by then is decided
without a test. Which readers those are depends on the circuit ACDC ends with, which on SmolLM2 at 95%
sparsity has not been run (about 19 hours on 2 cores). This estimate stands a finished circuit of the
same size in for it (default: the converged HAP circuit of benchmarks/converged/ioi) and weights each
tested edge by the measured cost of one test at its layer (acdc_cost.py, early blocks given:
interpolated between layers 2, 15 and 28). No forward is run.

Usage: .venv/bin/python benchmarks/acdc_untested.py [--circuit benchmarks/converged/ioi/hap/circuit.json]
"""

from __future__ import annotations

import argparse

import torch

from hap.acdc import reaches_nothing, sweep_order
from hap.circuit import Circuit
from hap.graph import Graph

# Seconds of one test forward (2 tests, 32 examples, 1 thread) by the reader's layer, acdc_cost.py.
MEASURED = {2: 6.004, 15: 4.111, 28: 1.473}


def cost(layer: int) -> float:
    """Linear interpolation of the measured per-forward seconds (clamped at the ends)."""
    points = sorted(MEASURED.items())
    if layer <= points[0][0]:
        return points[0][1]
    for (low, low_cost), (high, high_cost) in zip(points, points[1:]):
        if layer <= high:
            return low_cost + (high_cost - low_cost) * (layer - low) / (high - low)
    return points[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--circuit", default="benchmarks/converged/ioi/hap/circuit.json")
    args = parser.parse_args()
    circuit = Circuit.load(args.circuit)
    graph = Graph.from_layout(circuit.layout)
    feeds = graph.feeds()
    final = circuit.in_graph & graph.real
    total = tested = 0.0
    n_tested = 0
    layers = graph.layout.n_layers
    for source, reader in sweep_order(graph):
        block = int(graph.reader_block[reader])
        layer = min(layers - 1, (block - 1) // 2)
        seconds = cost(layer)
        total += seconds
        # The out-edges of the reader's sources are final when the sweep reaches it: the circuit's.
        if not reaches_nothing(graph, feeds, final, reader):
            tested += seconds
            n_tested += 1
    print(f"circuit {args.circuit}: {int(final.sum()):,} of {graph.n_edges:,} edges")
    print(f"edges tested: {n_tested:,} of {graph.n_edges:,} ({n_tested / graph.n_edges:.1%}); "
          f"cost-weighted share of the sweep: {tested / total:.1%}; speed-up {total / tested:.2f}x")


if __name__ == "__main__":
    main()

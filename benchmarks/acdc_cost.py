"""What one ACDC test forward costs on SmolLM2-135M IOI, with and without the early blocks taken as given.

ACDC tests the in-edges of one reader at a time; removing them changes only that reader's input, so the
blocks before the reader's block write the same outputs in every test of that reader. ``acdc`` records
them once per reader (``prefix_outputs``) and each test forward computes the rest. This script measures,
in one process, a test forward (k circuits of 32 examples) computing everything against one taking the
early blocks as given, at readers in early, middle and late layers, with the readers after the tested
one already decided (the circuit of the converged HAP run, if present, else a random 5% of their
edges: by then ACDC has pruned them). It also prints the recording cost per reader (the first reader
of a block runs the early blocks; the block's next readers reuse their outputs and redo only the
per-reader sums) and the whole sweep's expected ratio, weighting each layer by its readers' in-edges. Last, PAHQ on top
(``--mixed-precision int8``, the only precision faster than float32 on this CPU): the same given-prefix
forward with every block but the tested reader's on the int8 twin, its metric's distance from float32,
and the memory the twin adds.

    .venv/bin/python benchmarks/acdc_cost.py [--examples 32] [--k 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import hap
from hap.ablation import MixedPrecision
from hap.acdc import AcdcConfig, circuit_metrics, prefix_outputs
from hap.batches import TaskBatches
from hap.circuit import Circuit
from hap.precision import reduced_twin, twin_divergence
from hap.tasks import load_split, task_splits

HAP_RUN = Path(__file__).parent / "converged" / "ioi" / "hap"


def _decided_later(graph: hap.Graph, block: int, generator: torch.Generator) -> torch.Tensor:
    """The sweep's state at a reader of ``block``: readers of later blocks pruned, the rest all live."""
    if (HAP_RUN / "circuit.json").is_file():
        sparse = Circuit.load(HAP_RUN).in_graph.clone()
    else:
        sparse = (torch.rand(graph.real.shape, generator=generator) < 0.05) & graph.real
    kept = graph.real.clone()
    later = graph.reader_block > block
    kept[:, later] = sparse[:, later]
    return kept


def _seconds(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=2, help="circuits per test forward")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = hap.load_model("smollm2-135m")
    graph = hap.Graph.from_model(model)
    train_spec, _ = task_splits("ioi", model.tokenizer, args.examples, 8, 0)
    train = load_split(train_spec, model.tokenizer)
    data = list(TaskBatches(model, graph, train, args.batch_size))
    config = AcdcConfig(threshold=1e-3)
    generator = torch.Generator().manual_seed(0)
    layout = model.layout
    print(f"SmolLM2-135M IOI, {args.examples} examples in batches of {args.batch_size}, {args.k} circuits per "
          f"forward, {torch.get_num_threads()} thread(s)")
    rss_before = _rss_gib()
    twin = reduced_twin(model, "int8", check_speed=False)
    twin_gib = _rss_gib() - rss_before
    print("| reader | in-edges | everything (s) | early blocks given (s) | ratio | recording, first reader of the block (s) "
          "| next reader (s) | metric difference | + int8 twin (s) | ratio to given | metric change by int8 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios: dict[int, float] = {}
    for layer in (2, layout.n_layers // 2, layout.n_layers - 2):
        reader = graph.reader_index(f"a{layer}.h0<q>")
        block = int(graph.reader_block[reader])
        kept = _decided_later(graph, block, generator)
        sources = kept[:, reader].nonzero().flatten().flip(0)[: args.k]
        circuits, trial = [], kept.clone()
        for source in sources:
            trial[source, reader] = False
            circuits.append(trial.clone())
        plain = _seconds(lambda: circuit_metrics(model, graph, data, config, circuits, kept), args.repeats)
        holder = {}
        record = _seconds(lambda: holder.update(known=prefix_outputs(model, graph, data, config, kept, reader)), 1)
        known = holder["known"]
        again = _seconds(lambda: prefix_outputs(model, graph, data, config, kept, reader, earlier=known), 1)
        given = _seconds(lambda: circuit_metrics(model, graph, data, config, circuits, kept, known), args.repeats)
        # The two paths sum in another order (a 2-D mask when recording): equal to float rounding.
        gap = max(abs(a - b) for a, b in zip(circuit_metrics(model, graph, data, config, circuits, kept),
                                             circuit_metrics(model, graph, data, config, circuits, kept, known)))
        ratios[layer] = plain / given
        mixed = MixedPrecision(twin, block)
        known_mixed = prefix_outputs(model, graph, data, config, kept, reader, mixed)
        reduced = _seconds(lambda: circuit_metrics(model, graph, data, config, circuits, kept, known_mixed, mixed),
                           args.repeats)
        change = max(abs(a - b) for a, b in zip(circuit_metrics(model, graph, data, config, circuits, kept, known),
                                                circuit_metrics(model, graph, data, config, circuits, kept,
                                                                known_mixed, mixed)))
        print(f"| {graph.reader_names[reader]} (layer {layer}) | {int(graph.real[:, reader].sum())} | {plain:.3f} | "
              f"{given:.3f} | {plain / given:.2f}x | {record:.3f} | {again:.3f} | {gap:.1e} | {reduced:.3f} | "
              f"{given / reduced:.2f}x | {change:.1e} |", flush=True)
    # Whole sweep: a reader in layer l has about 1 + l * (heads + 1) in-edges; interpolate the measured ratio.
    def nearest(layer: int) -> float:
        return ratios[min(ratios, key=lambda measured: abs(measured - layer))]

    edges = [1 + layer * (layout.n_heads + 1) for layer in range(layout.n_layers)]
    speedup = sum(edges) / sum(n / nearest(layer) for layer, n in enumerate(edges))
    print(f"\nwhole sweep (each layer's edges at the nearest measured layer's ratio): {speedup:.2f}x")
    divergence = twin_divergence(model, twin, data[0])
    print(f"int8 twin: {twin_gib:.2f} GiB more resident memory; the whole model with int8 MLPs is KL "
          f"{divergence:.3f} nats from float32 at the answer (hap refuses a twin above 0.01)")


def _rss_gib() -> float:
    """This process's resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**30

if __name__ == "__main__":
    main()

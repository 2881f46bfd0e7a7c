"""Parallel ensembles of finished runs (Mondorf et al., MIB shared task, BlackboxNLP 2025).

Each run's edge scores are rank-normalised (|score| ranked over the graph's real edges, ties sharing
their mean rank, scaled to [0, 1]), so methods of different scales (attribution scores, keep
probabilities, ACDC's removal costs) combine; edges are ordered by the mean, min or max of their
normalised ranks, and the ensemble's score of an edge is its normalised rank in that order. Min and
max tie often (pruning methods give every fully kept edge one score, so one run's tied edges all
share a rank), and those ties are broken by the mean rank: among edges that one run keeps alike, the
ones the other runs rank higher come first. A circuit is then selected (top N, dangling edges dropped)
and measured like any other, on the runs' shared held-out split. (The sequential ensemble, attribution
first and pruning after, is HAP's warm start.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .circuit import Circuit, Scores
from .errors import HapError
from .graph import Graph

HOW = ("mean", "min", "max")


def normalised_ranks(graph: Graph, scores: Tensor) -> Tensor:
    """[S, R]: the rank of each real edge's |score| among the real edges, in [0, 1] (largest 1; ties share
    their mean rank); 0 off the real edges."""
    values = scores.abs().double()[graph.real]
    result = torch.zeros(graph.real.shape, dtype=torch.float64)
    result[graph.real] = lexicographic_ranks(values, torch.zeros_like(values))
    return result.float()


def lexicographic_ranks(primary: Tensor, secondary: Tensor) -> Tensor:
    """[N]: the rank of each entry ordered by ``primary``, ties broken by ``secondary`` (ascending; entries
    equal in both share their mean rank), scaled to [0, 1]."""
    by_secondary = secondary.double().argsort(stable=True)
    order = by_secondary[primary.double()[by_secondary].argsort(stable=True)]
    first, second = primary.double()[order], secondary.double()[order]
    new_group = torch.ones(len(order), dtype=torch.bool)
    new_group[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    group = new_group.cumsum(0) - 1
    positions = torch.arange(len(order), dtype=torch.float64)
    mean_position = torch.zeros(int(group[-1]) + 1 if len(order) else 0, dtype=torch.float64).index_add_(
        0, group, positions) / torch.bincount(group).double()
    ranks = torch.empty(len(order), dtype=torch.float64)
    ranks[order] = mean_position[group] / max(1, len(order) - 1)
    return ranks


def ensemble_scores(circuits: Sequence[Circuit], how: str = "mean") -> Scores:
    """The ensemble's scores of circuits of one model and task (``HapError`` if they are not)."""
    if how not in HOW:
        raise HapError(f"--how must be one of {', '.join(HOW)}, got {how!r}")
    if len(circuits) < 2:
        raise HapError("an ensemble needs at least two runs")
    first = circuits[0]
    for other in circuits[1:]:
        if other.model != first.model or other.layout != first.layout:
            raise HapError(f"the runs are of different models ({first.model}, {other.model}); "
                           "ensemble runs of one model")
        if other.task != first.task:
            raise HapError(f"the runs are of different tasks ({first.task}, {other.task}); ensemble runs of one task")
    graph = Graph.from_layout(first.layout)
    ranks = torch.stack([normalised_ranks(graph, circuit.scores)[graph.real].double() for circuit in circuits])
    mean = ranks.mean(0)
    primary = {"mean": mean, "min": ranks.min(0).values, "max": ranks.max(0).values}[how]
    values = torch.zeros(graph.real.shape)
    values[graph.real] = lexicographic_ranks(primary, mean).float()
    return Scores(first.model, first.task, "ensemble", first.layout, values,
                  {"how": how, "methods": [circuit.method for circuit in circuits], "loss": "kl",
                   "ties": "broken by the mean rank"})


def load_runs(runs: Sequence[str | Path]) -> list[Circuit]:
    """The circuits of run directories (or circuit.json paths)."""
    circuits = []
    for run in runs:
        path = Path(run) / "circuit.json" if Path(run).is_dir() else Path(run)
        circuits.append(Circuit.load(path))
    return circuits


def shared_splits(circuits: Sequence[Circuit]) -> dict:
    """The held-out split every run was judged on, and the training split they share (the smallest: the
    first examples of the same draw); refuses runs judged on different test splits or fitted on different
    training draws (the ensemble's held-out numbers need one test split no run was fitted on)."""
    splits = [circuit.splits for circuit in circuits]
    if any(not split or "test" not in split or "train" not in split for split in splits):
        raise HapError("a run records no train/test split (an old circuit file?); re-run it with hap discover")
    test = splits[0]["test"]

    def same(spec: dict) -> dict:
        # A split recorded before ``bos`` was (an older run) had no BOS token first: load_split reads it so.
        return {**spec, "bos": bool(spec.get("bos"))}

    def draw(spec: dict) -> dict:
        return {key: value for key, value in same(spec).items() if key != "n_examples"}

    for split in splits[1:]:
        if same(split["test"]) != same(test) or draw(split["train"]) != draw(splits[0]["train"]):
            raise HapError("the runs were fitted or judged on different splits (seed, task, files or the BOS token "
                           "differ); "
                           "an ensemble is measured on one held-out split: use runs of the same task, --seed "
                           "and --n-test")
    train = min((split["train"] for split in splits), key=lambda spec: spec["n_examples"])
    return {"train": train, "test": test}


def ensemble_run(runs: Sequence[str | Path], how: str, out: str | Path, edges: int | None = None,
                 sparsity: float | None = None, device: str | None = None, dtype: str | None = None,
                 force: bool = False, report: bool = True, command: str = "") -> Circuit:
    """``hap ensemble``: combine the runs' scores, select a circuit, measure it on the runs' held-out split
    (and in-sample on their training split, labelled), and write ``out/circuit.json`` (and the report)."""
    from .batches import TaskBatches
    from .circuit import edges_for_sparsity
    from .discovery import split_metrics
    from .models.loading import load_model
    from .tasks import TaskSpec, load_split

    if (edges is None) == (sparsity is None):
        raise HapError("give one of --edges N (edges kept) or --sparsity S (fraction removed)")
    if sparsity is not None and not 0.0 < sparsity < 1.0:
        raise HapError(f"--sparsity is the fraction of edges removed and must be in (0, 1), got {sparsity}")
    out = Path(out)
    if (out / "circuit.json").exists() and not force:
        raise HapError(f"{out} already holds a run; choose another --out or pass --force")
    circuits = load_runs(runs)
    scores = ensemble_scores(circuits, how)
    splits = shared_splits(circuits)
    ablations = {circuit.config.get("ablation", "interchange") for circuit in circuits}
    if len(ablations) > 1:
        raise HapError(f"the runs use different ablations ({', '.join(sorted(ablations))}); a circuit is measured "
                       "under one: ensemble runs of one ablation")
    ablation = ablations.pop()
    graph = Graph.from_layout(circuits[0].layout)
    n_edges = edges if edges is not None else max(1, edges_for_sparsity(graph, sparsity))
    if not 1 <= n_edges <= graph.n_edges:
        raise HapError(f"--edges must be between 1 and the model's {graph.n_edges} edges, got {n_edges}")
    model = load_model(circuits[0].model, device=device, dtype=dtype, per_head_kv_graph=circuits[0].layout.kv_ungrouped)
    circuits[0].check_fits(model.layout, str(runs[0]))
    batch_size = int(circuits[0].config.get("batch_size", 16))
    test_task = load_split(TaskSpec.from_dict(splits["test"], "test split"), model.tokenizer)
    train_task = load_split(TaskSpec.from_dict(splits["train"], "train split"), model.tokenizer)
    circuit = scores.circuit(n_edges)
    graph = Graph.from_model(model)
    circuit.metrics = split_metrics(model, circuit, TaskBatches(model, graph, train_task, batch_size, ablation),
                                    TaskBatches(model, graph, test_task, batch_size, ablation), batch_size, ablation)
    circuit.splits = splits
    circuit.config = {**circuit.config, "how": how, "runs": [str(run) for run in runs], "ablation": ablation,
                      "batch_size": batch_size, "command": command}
    out.mkdir(parents=True, exist_ok=True)
    circuit.save(out / "circuit.json")
    if report:
        from .report import write_report

        write_report(out)
    return circuit

"""Node importance: how much a circuit needs each of its heads and MLPs, on held-out examples.

A node leaves the circuit with all its kept edges: those out of it, and those into the readers that
only it reads (a head's query input, its key and value inputs where no other head shares them, an
MLP's input). Its importance is what the circuit then loses: the drop in faithfulness and the rise in
KL, measured exactly through the one ablation primitive (``evaluation.evaluate_masks``: one masked run
per node and batch). For attribution methods each node also gets the linear estimate: the sum of its
outgoing edges' scores, which estimates the change of the metric when the node is ablated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .ablation import AblationKind
from .batches import ReferenceCache, TaskBatches
from .circuit import Circuit
from .evaluation import evaluate_masks, faithfulness
from .graph import Graph
from .models.loading import Model
from .settings import ATTRIBUTION_METHODS
from .tasks import TaskData

NODES_PER_PASS = 64  # node masks evaluated per pass over the batches (each pass also runs the empty circuit)


@dataclass(frozen=True)
class NodeImportance:
    """One head or MLP of a circuit: what the circuit loses without it (``rank`` 1: the one it needs most)."""

    name: str  # "a9.h9", "m5"
    kind: str  # "head" or "mlp"
    layer: int
    n_edges: int  # kept edges that leave the circuit with the node
    faithfulness_drop: float  # faithfulness of the circuit minus that of the circuit without the node
    kl_increase: float  # KL of the circuit without the node minus the circuit's own
    attribution: float | None = None  # sum of the node's outgoing edge scores (attribution methods only)
    rank: int = 0


@dataclass(frozen=True)
class ImportanceTable:
    """Every node of a circuit with its importance, most important first, and where it was measured."""

    nodes: list[NodeImportance]
    split: str  # "test" (held out), "train" (in-sample) or "drawn"
    n_examples: int
    ablation: str
    faithfulness: float  # the whole circuit's, on the same examples
    kl: float
    attribution_method: str | None = None  # the method whose edge scores gave ``attribution``
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the TaskSpec of the examples

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["nodes"] = [asdict(node) for node in self.nodes]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImportanceTable:
        known = {name for name in NodeImportance.__dataclass_fields__}
        nodes = [NodeImportance(**{key: value for key, value in row.items() if key in known})
                 for row in values.get("nodes", [])]
        header = {key: value for key, value in values.items() if key in cls.__dataclass_fields__ and key != "nodes"}
        return cls(nodes=nodes, **header)

    def format(self, top: int | None = 20) -> str:
        """The table as text: the circuit's own numbers, then one row per node, most important first."""
        where = {"test": "held-out test", "train": "training (in-sample)"}.get(self.split, self.split)
        lines = [f"circuit on {self.n_examples} {where} examples: faithfulness {self.faithfulness:.4f}, "
                 f"KL {self.kl:.4f}; each node removed with all its edges ({self.ablation} ablation)",
                 f"{'rank':>5}  {'node':<10}{'kind':<6}{'layer':>6}{'faithfulness lost':>19}{'KL added':>10}"
                 f"{'edges':>7}" + (f"{'attribution':>13}" if self.attribution_method else "")]
        for node in self.nodes[:top]:
            row = (f"{node.rank:>5}  {node.name:<10}{node.kind:<6}{node.layer:>6}{node.faithfulness_drop:>+19.4f}"
                   f"{node.kl_increase:>+10.4f}{node.n_edges:>7}")
            if self.attribution_method:
                row += f"{node.attribution:>+13.4f}" if node.attribution is not None else f"{'':>13}"
            lines.append(row)
        if top is not None and len(self.nodes) > top:
            lines.append(f"  ... {len(self.nodes) - top} more nodes (--top N, or --json for all)")
        if self.attribution_method:
            lines.append(f"  attribution: the sum of the node's outgoing {self.attribution_method} edge scores, a "
                         "linear estimate of the change of the metric when the node is ablated")
        return "\n".join(lines)


def circuit_nodes(graph: Graph, kept: Tensor) -> list[int]:
    """Source indices of the heads and MLPs with a kept outgoing edge (not ``input``), in graph order."""
    return [source for source in range(1, graph.n_sources) if bool(kept[source].any())]


def node_edges(graph: Graph, kept: Tensor, source: int) -> Tensor:
    """[S, R] bool: the kept edges that leave the circuit with node ``source``: out of it, and into the
    readers only it reads."""
    feeds = graph.feeds()  # [R, S]
    own_readers = feeds[:, source] & (feeds.sum(1) == 1)
    edges = torch.zeros_like(kept)
    edges[source] = kept[source]
    edges[:, own_readers] |= kept[:, own_readers]
    return edges


def _kind_and_layer(name: str) -> tuple[str, int]:
    if name.startswith("m"):
        return "mlp", int(name[1:])
    return "head", int(name[1:].split(".")[0])


def node_importance(model: Model, circuit: Circuit, task: TaskData, batch_size: int = 16,
                    ablation: AblationKind | str | None = None, data: TaskBatches | None = None,
                    split: str = "test", progress: bool = False,
                    nodes_per_pass: int = NODES_PER_PASS) -> ImportanceTable:
    """How much ``circuit`` needs each of its heads and MLPs on ``task`` (a held-out split, normally).

    ``ablation`` defaults to the circuit's. ``data``: batches of ``task`` to read (a ``TaskBatches``
    keeps them for the later passes); by default they are made here and kept within the default
    reference memory. Cost: one masked forward per node and batch, plus the circuit and the empty
    circuit once per ``nodes_per_pass`` nodes.
    """
    graph = Graph.from_model(model)
    kind = AblationKind(ablation or circuit.config.get("ablation", "interchange"))
    kept = circuit.in_graph.cpu().bool() & graph.real
    data = data if data is not None else TaskBatches(model, graph, task, batch_size, kind, cache=ReferenceCache())
    sources = circuit_nodes(graph, kept)
    removed = [node_edges(graph, kept, source) for source in sources]
    measured: list[dict[str, float]] = []
    base = full = empty = None
    n = 0
    for start in range(0, max(1, len(sources)), nodes_per_pass):
        chunk = [kept & ~edges for edges in removed[start:start + nodes_per_pass]]
        label = f"node importance ({min(start + nodes_per_pass, len(sources))}/{len(sources)} nodes)"
        results, full, empty, n = evaluate_masks(model, graph, data, [kept, *chunk], kind, progress, label,
                                                 len(task))
        base = results[0]
        measured += results[1:]
    assert base is not None and full is not None and empty is not None

    def faithful(values: dict[str, float]) -> float:
        return faithfulness(values["logit_diff"], full["logit_diff"], empty["logit_diff"])

    attribution_method = circuit.method if circuit.method in ATTRIBUTION_METHODS else None
    scores = circuit.scores.cpu().float() * graph.real
    rows = []
    for source, edges, values in zip(sources, removed, measured):
        name = graph.source_names[source]
        node_kind, layer = _kind_and_layer(name)
        rows.append(NodeImportance(
            name=name, kind=node_kind, layer=layer, n_edges=int(edges.sum()),
            faithfulness_drop=faithful(base) - faithful(values), kl_increase=values["kl"] - base["kl"],
            attribution=float(scores[source].sum()) if attribution_method else None))
    rows.sort(key=lambda row: (-row.faithfulness_drop, -row.kl_increase, row.name))
    ranked = [NodeImportance(**{**asdict(row), "rank": rank}) for rank, row in enumerate(rows, start=1)]
    return ImportanceTable(ranked, split, n, kind.value, faithful(base), base["kl"], attribution_method)

"""Node importance: how much a circuit needs each of its heads and MLPs, on held-out examples.

A node leaves the circuit with all its kept edges: those out of it, and those into the readers that
only it reads (a head's query input, its key and value inputs where no other head shares them, an
MLP's input). Its importance is what the circuit then loses: the drop in faithfulness and the rise in
KL, measured exactly through the one ablation primitive (``run_masked``: one masked run per node and
batch, of the blocks from the node's own on; the circuit's run before them is recorded once per batch).
For attribution methods each node also gets the linear estimate: the sum of its outgoing edges' scores,
which estimates the change of the metric when the node is ablated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .ablation import AblationKind, ComputePlan, run_masked
from .batches import ReferenceCache, TaskBatches
from .circuit import Circuit
from .errors import HapError
from .evaluation import MetricSums, faithfulness
from .graph import Graph, node_kind_and_layer
from .known_outputs import known_until, record_outputs
from .models.loading import Model
from .progress import progress_bar
from .settings import ATTRIBUTION_METHODS
from .tasks import TaskData

COPIES_PER_FORWARD = 64  # examples per masked forward: several nodes' masks batched as per-example masks


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


def circuit_nodes(graph: Graph, kept: Tensor) -> list[int]:
    """Source indices of the heads and MLPs with a kept outgoing edge (not ``input``), in graph order."""
    return [source for source in range(1, graph.n_sources) if bool(kept[source].any())]


def node_edges(graph: Graph, kept: Tensor, source: int, feeds: Tensor | None = None) -> Tensor:
    """[S, R] bool: the kept edges that leave the circuit with node ``source``: out of it, and into the
    readers only it reads. ``feeds``: ``graph.feeds()``, when the caller has it already."""
    feeds = graph.feeds() if feeds is None else feeds  # [R, S]
    own_readers = feeds[:, source] & (feeds.sum(1) == 1)
    edges = torch.zeros_like(kept)
    edges[source] = kept[source]
    edges[:, own_readers] |= kept[:, own_readers]
    return edges


def node_importance(model: Model, circuit: Circuit, task: TaskData, batch_size: int = 16,
                    ablation: AblationKind | str | None = None, data: TaskBatches | None = None,
                    split: str = "test", progress: bool = False,
                    copies_per_forward: int = COPIES_PER_FORWARD) -> ImportanceTable:
    """How much ``circuit`` needs each of its heads and MLPs on ``task`` (a held-out split, normally).

    ``ablation`` defaults to the circuit's. ``data``: batches of ``task`` to read (a ``TaskBatches``
    keeps them); by default they are made here and kept within the default reference memory. Cost per
    batch: the circuit and the empty circuit once each; then, for each node, the blocks from the node's
    own on (removing a node changes no reader before its block, so the circuit's run up to there is
    recorded once and shared), up to ``copies_per_forward`` examples per forward (several nodes' masks
    batched as per-example masks).
    """
    graph = Graph.from_model(model)
    kind = AblationKind(ablation or circuit.config.get("ablation", "interchange"))
    kept = circuit.in_graph.cpu().bool() & graph.real
    data = data if data is not None else TaskBatches(model, graph, task, batch_size, kind, cache=ReferenceCache())
    sources = circuit_nodes(graph, kept)
    feeds = graph.feeds()
    removed = [node_edges(graph, kept, source, feeds) for source in sources]
    first_block = [int(graph.source_block[source]) for source in sources]  # its own readers' block
    plan = ComputePlan.build(graph, kept, kind)
    mask = kept.to(model.device, model.dtype)
    empty = torch.zeros_like(mask)
    empty_plan = ComputePlan.build(graph, torch.zeros_like(kept), kind)
    base, full, nothing = MetricSums(), MetricSums(), MetricSums()
    without = [MetricSums() for _ in sources]
    by_block: dict[int, list[int]] = {}
    for index, block in enumerate(first_block):
        by_block.setdefault(block, []).append(index)
    n = 0
    with torch.no_grad(), progress_bar(total=len(task) * len(sources), desc="node importance", unit="ex",
                                       disable=not progress) as bar:
        for batch in data:
            size = len(batch.clean)
            n += size
            full.add(batch, batch.clean_logits)
            recorded = record_outputs(model, graph, batch.clean, batch.reference, mask, graph.n_blocks - 1, plan)
            # the circuit itself: only its unembedding is left to compute after the recording
            base.add(batch, run_masked(model, graph, batch.clean, batch.reference, mask, plan, batch.positions,
                                       known=recorded))
            nothing.add(batch, run_masked(model, graph, batch.clean, batch.reference, empty, empty_plan,
                                          batch.positions))
            per_forward = max(1, copies_per_forward // size)
            for block, members in by_block.items():
                known = known_until(graph, recorded, block)
                for start in range(0, len(members), per_forward):
                    chunk = members[start:start + per_forward]
                    k = len(chunk)
                    masks = torch.stack([(kept & ~removed[i]) for i in chunk]).to(model.device, model.dtype)
                    if k == 1:  # one node: its mask for the whole batch
                        logits = run_masked(model, graph, batch.clean, batch.reference, masks[0], plan,
                                            batch.positions, known=known)
                    else:
                        logits = run_masked(model, graph, batch.clean.repeat(k, 1), batch.reference.of_copies(k),
                                            masks.repeat_interleave(size, dim=0), plan, batch.positions.repeat(k),
                                            known=known)
                    for copy, i in enumerate(chunk):
                        without[i].add(batch, logits[copy * size:(copy + 1) * size])
                    bar.update(k * size)
    if n == 0:
        raise HapError("node importance needs at least one example; the task or split is empty")
    full_m, base_m, empty_m = full.means(n), base.means(n), nothing.means(n)

    def faithful(values: dict[str, float]) -> float:
        return faithfulness(values["logit_diff"], full_m["logit_diff"], empty_m["logit_diff"])

    attribution_method = circuit.method if circuit.method in ATTRIBUTION_METHODS else None
    scores = circuit.scores.cpu().float() * graph.real
    rows = []
    for source, edges, sums in zip(sources, removed, without):
        values = sums.means(n)
        name = graph.source_names[source]
        node_kind, layer = node_kind_and_layer(name)
        rows.append(NodeImportance(
            name=name, kind=node_kind, layer=layer, n_edges=int(edges.sum()),
            faithfulness_drop=faithful(base_m) - faithful(values), kl_increase=values["kl"] - base_m["kl"],
            attribution=float(scores[source].sum()) if attribution_method else None))
    rows.sort(key=lambda row: (-row.faithfulness_drop, -row.kl_increase, row.name))
    ranked = [NodeImportance(**{**asdict(row), "rank": rank}) for rank, row in enumerate(rows, start=1)]
    return ImportanceTable(ranked, split, n, kind.value, faithful(base_m), base_m["kl"], attribution_method)

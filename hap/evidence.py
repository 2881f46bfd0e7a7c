"""What each head and MLP does, measured on a task's named positions (``TaskData.named``).

Three kinds of evidence, all on the full model's clean run of the given examples (a held-out split,
normally), so they say what a component does in the model, whichever circuit keeps it:

* **attention** (heads): the mean weight from each named position to each other one (IOI: from
  ``END`` to ``IO`` is what a name mover does), over the examples that have both positions; and, for
  one example, the whole row of weights from each named position, for a picture;
* **direct effect**: the node's output at the answer position through the final norm with the norm's
  scale frozen at the full run's (a LayerNorm also centres it), then the unembedding, projected on
  the gradient of the task metric with respect to the normed residual: direct logit attribution, the
  linear estimate of what the node adds to the metric by its direct path alone. For a logit-difference
  metric and a plain unembedding it is exact, and the effects of all sources sum to the metric (less
  the final norm's bias);
* **readers** (needs a circuit): the kept nodes that read the node, by the input they read it through
  (``q``, ``k``, ``v``, ``mlp`` or ``logits``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .ablation import trace
from .errors import HapError
from .graph import Graph, node_kind_and_layer, reader_kind
from .models.adapter import rms_norm_shares
from .models.loading import Model
from .tasks import TaskData

EXAMPLE_DIGITS = 3  # the example's attention rows are rounded to this many decimals


@dataclass(frozen=True)
class NodeEvidence:
    """What one head or MLP does. ``attention[from][to]``: mean weight (heads only); ``direct_effect``:
    mean direct logit attribution on the task metric; ``readers``: input kind -> the kept readers
    (empty without a circuit); ``example_attention[from]``: the weights from that position over the
    example's tokens (heads only)."""

    name: str
    kind: str  # "head" or "mlp"
    layer: int
    direct_effect: float
    attention: dict[str, dict[str, float]] | None = None
    readers: dict[str, list[str]] = field(default_factory=dict)
    example_attention: dict[str, list[float]] | None = None

    def attends(self, source: str, target: str) -> float:
        """Mean attention from position ``source`` to ``target`` (0 when not measured)."""
        return (self.attention or {}).get(source, {}).get(target, 0.0)


@dataclass(frozen=True)
class EvidenceTable:
    """The evidence of every head and MLP of a model (graph order), and where it was measured."""

    nodes: list[NodeEvidence]
    positions: list[str]  # the named positions, END last
    split: str
    n_examples: int
    full_metric: float  # the full model's mean task metric on the same examples
    example_tokens: list[str]  # the tokens of the example whose attention rows are kept
    example_positions: dict[str, int]  # its named positions
    input_direct_effect: float = 0.0  # the embedding's direct effect (with the nodes': the metric, for a plain
    # logit difference, less the final norm's bias)

    def node(self, name: str) -> NodeEvidence:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in the evidence")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["nodes"] = [asdict(node) for node in self.nodes]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvidenceTable:
        nodes = [NodeEvidence(**node) for node in values["nodes"]]
        return cls(nodes=nodes, **{key: value for key, value in values.items() if key != "nodes"})


def frozen_norm_shares(norm: torch.nn.Module | None, total: Tensor, parts: Tensor) -> Tensor:
    """What each of ``parts`` [n, B, D] becomes through ``norm`` with its scale frozen at ``total``'s
    [B, D]: a LayerNorm centres each part and divides by the total's deviation, times its weight; an
    RMS norm divides by the total's root mean square, times its gain. Biases go to no part."""
    if norm is None:
        return parts
    if isinstance(norm, torch.nn.LayerNorm) or type(norm).__name__.endswith("LayerNorm") and hasattr(norm, "bias"):
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))
        centred = parts - parts.mean(-1, keepdim=True)
        scale = torch.rsqrt(total.var(-1, unbiased=False, keepdim=True) + eps)
        weight = norm.weight if getattr(norm, "weight", None) is not None else 1.0
        return centred * scale * weight
    rest = total - parts.sum(0)
    return rms_norm_shares(norm, torch.cat([parts, rest[None]]))[:-1]


def node_readers(graph: Graph, kept: Tensor, source: int) -> dict[str, list[str]]:
    """The kept readers of ``source`` by input kind: ``{"q": ["a20.h3"], "v": ["a21.g1"], "mlp": ["m22"]}``."""
    readers: dict[str, list[str]] = {}
    for reader in kept[source].nonzero().flatten().tolist():
        name = graph.reader_names[reader]
        readers.setdefault(reader_kind(name), []).append(name.split("<")[0])
    return readers


def node_evidence(model: Model, task: TaskData, batch_size: int = 16, kept: Tensor | None = None,
                  split: str = "test") -> EvidenceTable:
    """Attention between ``task``'s named positions and the direct effect of every head and MLP, on the
    full model's clean run of ``task``; ``kept`` [S, R] bool (a circuit's edges) adds each node's readers.
    Cost: one plain forward per batch, plus each layer's queries and keys once more."""
    if len(task) == 0:
        raise HapError("evidence needs at least one example")
    graph = Graph.from_model(model)
    adapter, layout = model.adapter, model.layout
    named = task.named()
    labels = list(named)
    n_labels = len(labels)
    n_sources = graph.n_sources
    heads = layout.n_heads
    attention = torch.zeros(layout.n_layers, heads, n_labels, n_labels, dtype=torch.float64, device=model.device)
    counts = torch.zeros(n_labels, n_labels, dtype=torch.float64)
    direct = torch.zeros(n_sources, dtype=torch.float64)
    metric_sum = 0.0
    example_rows: list[Tensor] = []  # per layer [H, n_labels, T] for example 0
    group = torch.arange(heads, device=model.device) // layout.heads_per_group
    norm = adapter.final_norm()
    start = 0
    for batch in task.batches(batch_size):
        ids = batch.clean_ids.to(model.device)
        rows = torch.arange(len(batch), device=model.device)
        answer = batch.answer_positions.to(model.device)
        with torch.no_grad():
            recorded = trace(model, ids, logits=False)
        final = recorded.block_inputs[-1][rows, answer]  # [B, D]
        parts = recorded.outputs[:, rows, answer]  # [S, B, D]
        with torch.no_grad():
            normed = norm(final) if norm is not None else final
        normed.requires_grad_(True)
        metric = batch.logit_diff(adapter.logits_from_normed(normed))
        metric_sum += float(metric.detach().double().sum())
        (direction,) = torch.autograd.grad(metric.sum(), normed)
        with torch.no_grad():
            shares = frozen_norm_shares(norm, final, parts)
            direct += (shares * direction).sum(-1).double().sum(1).cpu()
            where = torch.stack([named[label][start:start + len(batch)] for label in labels]).to(model.device)
            present = where >= 0  # [n_labels, B]
            pair = (present[:, None] & present[None]).to(torch.float64)  # [from, to, B]
            counts += pair.sum(-1).cpu()
            safe = where.clamp(min=0)
            ctx = adapter.prepare(ids)
            for layer in range(layout.n_layers):
                x = recorded.block_inputs[graph.base_block(2 * layer + 1)][None]
                q = adapter.queries(layer, x, ctx)
                k = adapter.keys(layer, x, ctx).index_select(1, group)
                pattern = adapter.attention_pattern(layer, q, k, ctx)  # [B, H, T, T]
                at_from = pattern[rows[None, :], :, safe]  # [n_labels, B, H, T]
                picked = _pick(at_from, safe)  # [from, to, B, H]
                attention[layer] += (picked.double() * pair[..., None]).sum(2).permute(2, 0, 1)
                if start == 0:
                    example_rows.append(at_from[:, 0].permute(1, 0, 2).cpu())  # [H, n_labels, T]
        start += len(batch)
    n = len(task)
    attention = attention.cpu() / counts.clamp(min=1)
    direct = direct / n
    first_length = int(task.lengths[0])
    tokens = [model.tokenizer.decode([token]) for token in task.clean_ids[0, :first_length].tolist()]
    first_positions = {label: int(named[label][0]) for label in labels}
    nodes = []
    kept_edges = kept.cpu().bool() & graph.real if kept is not None else None
    for source in range(1, n_sources):
        name = graph.source_names[source]
        kind, layer = node_kind_and_layer(name)
        readers = node_readers(graph, kept_edges, source) if kept_edges is not None else {}
        if kind == "mlp":
            nodes.append(NodeEvidence(name, kind, layer, float(direct[source]), readers=readers))
            continue
        head = int(name.split(".h")[1])
        table = {source_label: {target: float(attention[layer, head, i, j]) for j, target in enumerate(labels)
                                if counts[i, j] > 0}
                 for i, source_label in enumerate(labels)}
        example = {label: [round(float(weight), EXAMPLE_DIGITS) for weight in example_rows[layer][head, i, :first_length]]
                   for i, label in enumerate(labels) if first_positions[label] >= 0}
        nodes.append(NodeEvidence(name, kind, layer, float(direct[source]), table, readers, example))
    return EvidenceTable(nodes, labels, split, n, metric_sum / n, tokens, first_positions, float(direct[0]))


def _pick(at_from: Tensor, where: Tensor) -> Tensor:
    """at_from [from, B, H, T] (each from-position's attention row), where [to, B] -> [from, to, B, H]."""
    n_from, batch, heads, _ = at_from.shape
    index = where.T[None, :, None, :].expand(n_from, batch, heads, -1)  # [from, B, H, to]
    return at_from.gather(-1, index).permute(0, 3, 1, 2)

"""Attribution methods: one score per real edge, all through the ablation primitive.

Score of edge (s -> r) = the estimated change in the loss L when the edge is
ablated, (z~_s - z_s) . dL/d(input of r). Ranking uses |score|.

* ``eap`` (Syed et al. 2023): the gradient at the clean run; one corrupted
  forward (the reference), one clean forward and one backward per batch.
* ``eap-ig-inputs`` (Hanna et al. 2024): the gradient averaged over ``ig_steps``
  runs whose input embedding is interpolated from corrupted to clean,
  a = k/m for k = 0..m-1 (as in EAP-IG's code; m = 5 in EAP-IG and MIB).
* ``eap-ig-activations`` (EAP-IG): the gradient averaged over runs in which one
  block's outputs (the embedding, one layer's heads, or one MLP) are
  interpolated between corrupted and clean, a = k/m for k = 1..m, the rest
  running on the clean prompt: (2L + 1) * m runs. Gradients pass straight
  through the interpolated block (EAP-IG's hooks cut them there), so on a model
  that is linear in its activations every method here equals ``exact``.
* ``exact``: ablate one edge at a time and measure the change in L; one
  forward per edge and batch (small models, or ``edges_subset``).

The loss is the task's metric (logit difference; probability difference for
greater-than) averaged over examples, or ``kl``: KL(clean || run) at the
answer position, whose gradient vanishes at the clean run, so ``eap`` refuses it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Sequence

import torch
from torch import Tensor

from .ablation import AblationKind, run_masked, trace
from .batches import Batch, Loss, TaskBatches, loss_function
from .circuit import Scores
from .distributed import Ranks
from .errors import HapError
from .graph import Graph
from .models.loading import Model
from .precision import PRECISIONS, ReducedTwin, reduced_twin
from .probes import run_with_probes
from .progress import progress_bar
from .tasks import TaskData
from .twin import MixedPrecision


class Method(str, Enum):
    """The attribution methods (their CLI names)."""

    EAP = "eap"
    EAP_IG_INPUTS = "eap-ig-inputs"
    EAP_IG_ACTIVATIONS = "eap-ig-activations"
    EXACT = "exact"


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of an attribution run; the defaults are EAP-IG's published ones."""

    method: Method = Method.EAP_IG_INPUTS
    ig_steps: int = 5
    loss: Loss = Loss.METRIC
    ablation: AblationKind = AblationKind.INTERCHANGE
    batch_size: int = 16
    edges_subset: tuple[str, ...] | None = None  # exact only: score just these edges
    per_head_kv: bool = False  # also score each query head's own copy of its group's k/v input (MIB's graph)
    mixed_precision: str | None = None  # exact only (PAHQ): a ``hap.precision.PRECISIONS`` kind, None = off

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.method))
        object.__setattr__(self, "loss", Loss(self.loss))
        object.__setattr__(self, "ablation", AblationKind(self.ablation))
        if self.ig_steps < 1:
            raise HapError(f"--ig-steps must be at least 1, got {self.ig_steps}")
        if self.batch_size < 1:
            raise HapError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.method is Method.EAP and self.loss is Loss.KL:
            raise HapError(
                "eap with --loss kl scores every edge 0: KL(clean || clean) has zero gradient at the clean run; "
                "use --method eap-ig-inputs or eap-ig-activations, or --loss logit-diff"
            )
        if self.edges_subset is not None:
            object.__setattr__(self, "edges_subset", tuple(self.edges_subset))
        if self.per_head_kv and self.method is Method.EXACT:
            raise HapError("--per-head-kv applies to the gradient methods (eap, eap-ig-*), not exact")
        if self.mixed_precision is not None and self.method is not Method.EXACT:
            raise HapError("--mixed-precision applies to the patching methods (exact, acdc): gradient methods "
                           "need the model in full precision")
        if self.mixed_precision is not None and self.mixed_precision not in PRECISIONS:
            raise HapError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")

    def to_dict(self) -> dict:
        values = asdict(self)
        for key in ("method", "loss", "ablation"):
            values[key] = values[key].value
        values["edges_subset"] = list(self.edges_subset) if self.edges_subset else None
        return values


# Layers whose probes share one score product (see _probe_scores): more layers, fewer passes over the
# sources' differences, at the cost of products over rows downstream of a probe's block (left out after).
SCORE_CHUNK_LAYERS = 4


def _probe_scores(graph: Graph, differences: Tensor, probes, positions: Tensor, scores: Tensor, weight: float,
                  kv_per_head: Tensor | None = None) -> None:
    """scores[s, r] += weight * sum over b, t, d of (z~_s - z_s) * dL/d(input_r). A per-head k/v probe's
    rows add to their group's reader (the heads' gradients sum to the group's) and to ``kv_per_head``
    [S, L, H, 2] (k, v) at their head.

    The probes of ``SCORE_CHUNK_LAYERS`` consecutive layers share one matrix product over the sources
    upstream of the last of them (a product per probe would read those rows once per probe, a few
    readers at a time: memory-bound); each probe then keeps the rows upstream of its own block."""
    rows = torch.arange(differences.shape[1], device=differences.device)
    groups: list[list] = []
    for probe in probes:
        block = int(graph.reader_block[probe.readers[0]])
        at_answer = probe.tensor.shape[2] == 1 and differences.shape[2] != 1  # the logits, read at answers
        chunk = -1 if at_answer else (block - 1) // (2 * SCORE_CHUNK_LAYERS)
        if groups and not at_answer and groups[-1][0][2] == chunk:
            groups[-1].append((probe, block, chunk))
        else:
            groups.append([(probe, block, chunk)])
    for group in groups:
        upstream = [graph.sources_of_block(block - 1).stop if block > 0 else 0 for _, block, _ in group]
        diff = differences[: max(upstream)]
        if group[0][2] == -1:
            diff = diff[:, rows, positions][:, :, None]
        grads = [probe.tensor.grad.reshape(len(probe.readers), -1) for probe, _, _ in group]
        together = grads[0] if len(grads) == 1 else torch.cat(grads)
        product = weight * (diff.reshape(len(diff), -1) @ together.transpose(0, 1)).float().cpu()
        for (probe, _, _), part, up in zip(group, product.split([len(g) for g in grads], 1), upstream):
            part = part[:up]
            readers = probe.readers.cpu()
            scores[:up].index_add_(1, readers, part)  # index_add: a group's reader repeats once per head
            if probe.heads is not None and kv_per_head is not None:
                layer, port = (int(graph.reader_block[readers[0]]) - 1) // 2, _kv_port(graph, int(readers[0]))
                kv_per_head[:up, layer, probe.heads.cpu(), port] += part


def _kv_port(graph: Graph, reader: int) -> int:
    """0 for a key reader, 1 for a value reader (names end in <k> / <v>)."""
    return {"k": 0, "v": 1}[graph.reader_names[reader][-2]]


def _interpolation_points(graph: Graph, config: AttributionConfig) -> list[Tensor]:
    """Per-source output scales [S] of every run whose gradients the method averages."""
    steps = config.ig_steps
    ones = torch.ones(graph.n_sources)
    if config.method is Method.EAP:
        return [ones]
    points = []
    if config.method is Method.EAP_IG_INPUTS:
        for step in range(steps):
            scale = ones.clone()
            scale[0] = step / steps
            points.append(scale)
        return points
    for block in range(graph.n_blocks - 1):
        for step in range(1, steps + 1):
            scale = ones.clone()
            scale[graph.sources_of_block(block)] = step / steps
            points.append(scale)
    return points


def _gradient_scores(model: Model, graph: Graph, batch: Batch, config: AttributionConfig, scores: Tensor,
                     weight: float, kv_per_head: Tensor | None = None) -> None:
    """(z~ - z) . mean gradient over the method's runs, for one batch."""
    loss_of = loss_function(config.loss, batch)
    summed: list[Tensor] | None = None
    clean_outputs = None
    points = _interpolation_points(graph, config)
    for scale in points:
        at_clean = clean_outputs is None and bool((scale == 1).all())
        logits, probes, outputs = run_with_probes(model, graph, batch.clean, batch.reference,
                                                  positions=batch.positions, output_scale=scale, record=at_clean,
                                                  per_head_kv=config.per_head_kv)
        loss_of(logits).backward()
        grads = [probe.tensor.grad for probe in probes]
        summed = grads if summed is None else [a + b for a, b in zip(summed, grads)]
        clean_outputs = outputs if outputs is not None else clean_outputs
    if clean_outputs is None:  # no run was at the clean point
        with torch.no_grad():
            clean_outputs = trace(model, batch.clean, logits=False).outputs
    if len(points) > 1:
        for probe, total in zip(probes, summed):
            probe.tensor.grad = total / len(points)
    reference = batch.reference.fit(*batch.clean.shape)  # mean/zero: one reference cut to this batch's width
    # in place: the run's record is this function's own
    differences = torch.sub(reference.outputs.expand_as(clean_outputs), clean_outputs, out=clean_outputs)
    _probe_scores(graph, differences, probes, batch.positions, scores, weight, kv_per_head)


def _exact_scores(model: Model, graph: Graph, batch: Batch, config: AttributionConfig, scores: Tensor,
                  weight: float, edges: list[tuple[int, int]], twin: ReducedTwin | None = None) -> None:
    """Ablate one edge at a time: L(without the edge) - L(full model). With a reduced-precision ``twin``
    (PAHQ), every block but the edge's reader's runs on the twin, the full model's loss likewise."""
    loss_of = loss_function(config.loss, batch)
    mask = torch.ones(graph.real.shape, device=model.device, dtype=model.dtype)
    full_of: dict[int | None, float] = {}  # the full model's loss per investigated block

    def loss(precision: MixedPrecision | None) -> float:
        return float(loss_of(run_masked(model, graph, batch.clean, batch.reference, mask, positions=batch.positions,
                                        precision=precision)))

    with torch.no_grad():
        for source, reader in edges:
            block = int(graph.reader_block[reader]) if twin is not None else None
            precision = MixedPrecision(twin, block) if twin is not None else None
            if block not in full_of:
                full_of[block] = loss(precision)
            mask[source, reader] = 0.0
            ablated = loss(precision)
            mask[source, reader] = 1.0
            scores[source, reader] += weight * (ablated - full_of[block])


def attribute(
    model: Model,
    task: TaskData,
    method: Method | str | None = None,
    config: AttributionConfig | None = None,
    progress: bool = False,
    data: Sequence[Batch] | None = None,
    twin: ReducedTwin | None = None,
    ranks: Ranks | None = None,
) -> Scores:
    """Score every real edge of ``model``'s graph on ``task`` with ``method``.

    Returns ``Scores`` whose ``values`` [S, R] are the mean over examples of the
    estimated change in the loss when the edge is ablated (``exact``: measured).
    ``config`` carries the other settings; ``method``, when given, overrides its
    method (default: ``eap-ig-inputs``). ``data``: batches already prepared
    (with their references) for this task, so they are not computed again.
    ``twin``: the reduced-precision model of ``config.mixed_precision``
    (default: built here, and refused where it is not faster). ``ranks``: in a
    data-parallel run, this process scores its share of the batches and
    every process returns the sum over all of them.
    """
    ranks = ranks or Ranks()
    config = config or AttributionConfig()
    if method is not None:
        config = AttributionConfig(**{**config.to_dict(), "method": Method(method)})
    if config.edges_subset is not None and config.method is not Method.EXACT:
        raise HapError("--edges-subset only applies to --method exact")
    graph = Graph.from_model(model)
    scores = torch.zeros(graph.real.shape)
    layout = model.layout
    kv_per_head = torch.zeros(graph.n_sources, layout.n_layers, layout.n_heads, 2) if config.per_head_kv else None
    edges = None
    if config.mixed_precision is None:
        twin = None
    if config.method is Method.EXACT:
        names = config.edges_subset or graph.edge_names()
        try:
            edges = [graph.edge_index(name) for name in names]
        except KeyError as error:
            raise HapError(f"--edges-subset: {error.args[0]}; edge names look like a3.h1->m5") from error
    started = time.perf_counter()
    n_total = len(task)
    if data is None:
        data = TaskBatches(model, graph, task, config.batch_size, config.ablation, config.loss is Loss.KL)
    if config.mixed_precision is not None and twin is None:
        twin = reduced_twin(model, config.mixed_precision, sample=data[0])
    shown = progress and ranks.is_main
    with progress_bar(total=n_total, desc=f"attribution ({config.method.value})", unit="ex", disable=not shown) as bar:
        for index in ranks.mine(len(data)):
            batch = data[index]
            weight = len(batch.clean) / n_total
            if config.method is Method.EXACT:
                _exact_scores(model, graph, batch, config, scores, weight, edges, twin)
            else:
                _gradient_scores(model, graph, batch, config, scores, weight, kv_per_head)
            bar.update(min(len(batch.clean) * ranks.world_size, n_total - bar.n))  # all ranks' batches, as one
    scores = ranks.sum(scores) * graph.real
    if kv_per_head is not None:
        kv_per_head = ranks.sum(kv_per_head)
    return Scores(
        model=model.name,
        task=task.name,
        method=config.method.value,
        layout=model.layout,
        values=scores,
        config=config.to_dict(),
        runtime_s={"attribution": time.perf_counter() - started},
        kv_per_head=kv_per_head,
    )

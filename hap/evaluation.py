"""Evaluation: how well a circuit reproduces the full model on a task.

For a circuit C (its edges kept, every other edge ablated), at each example's
answer position:

* ``kl``: KL(full model || circuit), mean over examples (for a model with one
  numerical output, the squared error: ``hap.batches.divergence``);
* ``logit_diff``: the task metric (answer minus wrong logit; probability
  difference for greater-than), mean over examples;
* ``accuracy``: fraction of examples where the answer beats the wrong token;
* ``faithfulness``: (m(C) - m(empty)) / (m(full) - m(empty)), m the mean metric.

The faithfulness curve (MIB) evaluates the top fraction k of edges for k in
``MIB_FRACTIONS``: ranked by |score| for CMD (area of |1 - f|, 0 best) and by
signed importance for CPR (area of f, higher better). Importance is the score
with the sign that means "helps": -score for metric-loss attributions (a score
is the change in the metric when the edge is ablated), +score for KL.
Areas are trapezoids over the fractions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from .ablation import AblationKind, ComputePlan, run_masked
from .batches import Batch, ReferenceCache, TaskBatches, batches, divergence, kl_divergence  # noqa: F401 (kl_divergence re-exported)
from .circuit import Circuit, Scores
from .display import metrics_html
from .errors import HapError, WeakModelError
from .graph import Graph
from .models.loading import Model
from .plain_run import answer_logits
from .progress import progress_bar
from .tasks import Metric, TaskData

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
CHANCE_ACCURACY = 0.5  # the answer against one wrong answer (or good against bad years): a coin's accuracy
FULL_MODEL_CHECK_EXAMPLES = 64  # per split, before any work: the batches are those the run uses first


@dataclass(frozen=True)
class Metrics:
    """A circuit's scores on a task, with the full model and the empty circuit for reference."""

    kl: float
    logit_diff: float
    accuracy: float
    faithfulness: float
    n_examples: int
    n_edges: int
    full_model: dict[str, float] = field(default_factory=dict)
    empty_circuit: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _repr_html_(self) -> str:
        """Jupyter's view: the scores beside the full model's and the empty circuit's (``hap.display``)."""
        return metrics_html(self)


@dataclass(frozen=True)
class Curve:
    """The MIB faithfulness curve of one score ranking, with its areas."""

    fractions: list[float]
    faithfulness_signed: list[float]
    faithfulness_abs: list[float]
    cpr: float
    cmd: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trapezoid(xs: list[float], ys: list[float]) -> float:
    """Area under the piecewise-linear curve through (xs, ys)."""
    return float(sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])))


def cpr_cmd(fractions: list[float], signed: list[float], absolute: list[float]) -> tuple[float, float]:
    """CPR = area under f (signed ranking); CMD = area under |1 - f| (absolute ranking)."""
    return trapezoid(fractions, signed), trapezoid(fractions, [abs(1.0 - f) for f in absolute])


@dataclass
class MetricSums:
    """Running sums of a circuit's KL to the full model, task metric and correct answers over batches."""

    kl: float = 0.0
    metric: float = 0.0
    correct: float = 0.0

    def add(self, batch: Batch, logits: Tensor) -> None:
        self.kl += float(divergence(batch.clean_logits, logits).sum())
        self.add_metric(batch.task, logits)

    def add_metric(self, task: TaskData, logits: Tensor) -> None:
        """The task's metric and correct answers only (no reference to take a KL to)."""
        self.metric += float(task.logit_diff(logits).sum())
        self.correct += float(task.correct(logits).float().sum())

    def means(self, n: int) -> dict[str, float]:
        return {"kl": self.kl / n, "logit_diff": self.metric / n, "accuracy": self.correct / n}


def _masks(graph: Graph, kept: list[Tensor], kind: AblationKind, device, dtype) -> list[tuple[Tensor, ComputePlan]]:
    return [(mask.to(device, dtype), ComputePlan.build(graph, mask.bool(), kind)) for mask in kept]


def evaluate_masks(model: Model, graph: Graph, data: Iterable[Batch], kept: list[Tensor], kind: AblationKind,
                    progress: bool, label: str, n_examples: int | None = None,
                    ) -> tuple[list[dict[str, float]], dict[str, float], dict[str, float], int]:
    """Metrics (``kl``, ``logit_diff``, ``accuracy``) of several edge sets [S, R] bool on the same batches, then
    those of the full model and of the empty circuit, and the number of examples. ``data`` is read once
    (batches may be made on the fly); every set costs one masked forward per batch."""
    empty = torch.zeros(graph.real.shape, dtype=torch.bool)
    runs = _masks(graph, [*kept, empty], kind, model.device, model.dtype)
    sums = [MetricSums() for _ in runs]
    full = MetricSums()
    n = 0
    total_examples = None if n_examples is None else n_examples * len(runs)
    with torch.no_grad(), progress_bar(total=total_examples, desc=label, unit="ex", disable=not progress) as bar:
        for batch in data:
            n += len(batch.clean)
            full.add(batch, batch.clean_logits)
            for (mask, plan), total in zip(runs, sums):
                total.add(batch, run_masked(model, graph, batch.clean, batch.reference, mask, plan, batch.positions))
                bar.update(len(batch.clean))
    if n == 0:
        raise HapError("evaluation needs at least one example; the task or split is empty")
    return [total.means(n) for total in sums[:-1]], full.means(n), sums[-1].means(n), n


@dataclass(frozen=True)
class FullModelCheck:
    """How well the full model does the task on the first examples of one split."""

    split: str
    n_examples: int
    accuracy: float
    logit_diff: float  # the task's metric, mean over the examples
    metric: Metric = Metric.LOGIT_DIFF

    @property
    def weak(self) -> bool:
        """At or below chance, or wrong on average: no circuit of this model explains the task."""
        return is_weak(self.accuracy, self.logit_diff)

    def describe(self) -> str:
        """E.g. "accuracy 0.10 (chance 0.50), mean logit difference -5.22 on 64 test examples"."""
        name = {Metric.LOGIT_DIFF: "logit difference", Metric.PROB_DIFF: "probability difference",
                Metric.VALUE: "value metric"}[self.metric]
        return (f"accuracy {self.accuracy:.2f} (chance {CHANCE_ACCURACY:.2f}), mean {name} {self.logit_diff:+.3g} "
                f"on {self.n_examples} {self.split} examples")


def is_weak(accuracy: float, mean_metric: float) -> bool:
    """The one rule for a full model that fails the task: accuracy at or below chance, or a negative mean
    metric."""
    return accuracy <= CHANCE_ACCURACY or mean_metric < 0


def fails_task(full_model: Any) -> bool:
    """Whether recorded full-model metrics (``Metrics.full_model``: ``accuracy``, ``logit_diff``) fail the task
    (``is_weak``; False when they are missing)."""
    if not isinstance(full_model, dict):
        return False
    accuracy, metric = full_model.get("accuracy"), full_model.get("logit_diff")
    return isinstance(accuracy, (int, float)) and isinstance(metric, (int, float)) and is_weak(accuracy, metric)


def check_full_model(model: Model, data: TaskData | Iterable[Batch], split: str = "test",
                     n_examples: int | None = FULL_MODEL_CHECK_EXAMPLES, batch_size: int = 16) -> FullModelCheck:
    """The full model's accuracy and mean metric on the first ``n_examples`` (None: all) examples.

    ``data``: a task (clean forwards only, ``batch_size`` at a time) or its batches, whose full-model logits
    are read (a ``TaskBatches`` keeps the batches it makes, for the run to reuse).
    """
    if isinstance(data, TaskData):
        task = data if n_examples is None else data.slice(0, min(n_examples, len(data)))
        parts = [(part, answer_logits(model, part.clean_ids.to(model.device), part.answer_positions.to(model.device)))
                 for part in task.batches(batch_size)]
    else:
        if n_examples is not None and isinstance(data, TaskBatches):
            data = data.head(n_examples)
        parts = []
        for batch in data:
            parts.append((batch.task, batch.clean_logits))
            if n_examples is not None and sum(len(part) for part, _ in parts) >= n_examples:
                break
    if not parts:
        raise HapError(f"the {split} split has no examples to measure the full model on")
    sums = MetricSums()
    for part, logits in parts:
        sums.add_metric(part, logits)
    n = sum(len(part) for part, _ in parts)
    means = sums.means(n)
    return FullModelCheck(split, n, means["accuracy"], means["logit_diff"], parts[0][0].metric)


def require_capable_model(checks: Iterable[FullModelCheck], bos: bool, allow_weak_model: bool = False,
                          model_name: str = "the model") -> list[FullModelCheck]:
    """Raise ``WeakModelError`` (one line naming the likely causes and ``--allow-weak-model``) when the full
    model fails the task on any of ``checks``; with ``allow_weak_model``, return the failed checks instead."""
    failed = [check for check in checks if check.weak]
    if failed and not allow_weak_model:
        bos_cause = ("the prompts lack the BOS token the model may expect (try --bos)" if not bos else
                     "a BOS token the model does not expect (try --no-bos)")
        raise WeakModelError(
            f"the full model {model_name} fails the task: {'; '.join(check.describe() for check in failed)}; a "
            f"circuit of it would explain a broken behaviour. Likely causes: {bos_cause}, a prompt format the "
            "model was not trained on (an instruction or chat model may need its template), or the wrong answer "
            "tokens; fix the task, or pass --allow-weak-model to study it anyway")
    return failed


def faithfulness(value: float, full: float, empty: float) -> float:
    """(m(C) - m(empty)) / (m(full) - m(empty)); NaN when the full model and the empty circuit tie."""
    gap = full - empty
    return (value - empty) / gap if gap != 0 else float("nan")


def evaluate(
    model: Model,
    circuit: Circuit | Tensor,
    task: TaskData,
    batch_size: int = 16,
    ablation: AblationKind | str = AblationKind.INTERCHANGE,
    progress: bool = False,
    data: Iterable[Batch] | None = None,
    label: str = "evaluate",
) -> Metrics:
    """Score a circuit (or an edge mask [S, R] bool) on ``task``; every other edge is ablated.

    ``data``: batches of ``task`` (with full-model logits), e.g. a ``TaskBatches``
    sharing a cache; by default they are made one at a time and not kept, so
    memory does not grow with the number of examples.
    """
    graph = Graph.from_model(model)
    kept = circuit.in_graph if isinstance(circuit, Circuit) else circuit
    kept = kept.cpu().bool() & graph.real
    data = data if data is not None else batches(model, graph, task, batch_size, AblationKind(ablation))
    [metrics], full, empty, n = evaluate_masks(model, graph, data, [kept], AblationKind(ablation), progress, label,
                                                len(task))
    return Metrics(
        kl=metrics["kl"],
        logit_diff=metrics["logit_diff"],
        accuracy=metrics["accuracy"],
        faithfulness=faithfulness(metrics["logit_diff"], full["logit_diff"], empty["logit_diff"]),
        n_examples=n,
        n_edges=int(kept.sum()),
        full_model=full,
        empty_circuit=empty,
    )


def signed_importance(scores: Scores) -> Tensor:
    """Scores with the sign that means 'the edge helps' (see the module docstring)."""
    return scores.values if scores.config.get("loss") == "kl" else -scores.values


def faithfulness_curve(
    model: Model,
    scores: Scores,
    task: TaskData,
    fractions: tuple[float, ...] = MIB_FRACTIONS,
    batch_size: int = 16,
    ablation: AblationKind | str = AblationKind.INTERCHANGE,
    progress: bool = False,
    data: Iterable[Batch] | None = None,
) -> Curve:
    """The MIB curve: faithfulness of the top fraction k of edges, by signed and by absolute score."""
    graph = Graph.from_model(model)
    real = graph.real
    importance = signed_importance(scores).cpu()
    kept = []
    for ranking in (importance, scores.values.cpu().abs()):
        order = torch.where(real, ranking.float(), torch.tensor(float("-inf"))).flatten().argsort(descending=True)
        for fraction in fractions:
            chosen = torch.zeros(real.numel(), dtype=torch.bool)
            chosen[order[: max(1, round(fraction * graph.n_edges))]] = True
            kept.append(chosen.view(real.shape) & real)
    data = data if data is not None else batches(model, graph, task, batch_size, AblationKind(ablation))
    results, full, empty, _ = evaluate_masks(model, graph, data, kept, AblationKind(ablation), progress, "curve",
                                              len(task))
    values = [faithfulness(r["logit_diff"], full["logit_diff"], empty["logit_diff"]) for r in results]
    signed, absolute = values[: len(fractions)], values[len(fractions):]
    cpr, cmd = cpr_cmd(list(fractions), signed, absolute)
    return Curve(list(fractions), signed, absolute, cpr, cmd)


@dataclass(frozen=True)
class HeldOutMonitor:
    """A fixed batch of held-out examples on which a training run measures its current circuit.

    Built once (the batch's reference, kept compact, and the full model and the
    empty circuit on it); ``measure`` then costs one masked forward that skips
    what the circuit cannot change.
    """

    data: TaskBatches  # one batch
    kind: AblationKind
    full: dict[str, float]
    empty: dict[str, float]

    @classmethod
    def build(cls, model: Model, task: TaskData, n_examples: int = 32,
              ablation: AblationKind | str = AblationKind.INTERCHANGE) -> HeldOutMonitor:
        """The first ``n_examples`` of ``task`` (a test split) as one batch."""
        graph = Graph.from_model(model)
        kind = AblationKind(ablation)
        part = task.slice(0, min(n_examples, len(task)))
        data = TaskBatches(model, graph, part, len(part), kind, cache=ReferenceCache(memory_budget=2**62),
                           name="monitor")
        _, full, empty, _ = evaluate_masks(model, graph, data, [], kind, False, "monitor")
        return cls(data, kind, full, empty)

    @property
    def n_examples(self) -> int:
        return self.data.n_examples

    def measure(self, model: Model, kept: Tensor) -> dict[str, float]:
        """``test_kl``, ``test_logit_diff``, ``test_accuracy``, ``test_faithfulness`` of the edges ``kept`` [S, R]."""
        graph = Graph.from_model(model)
        kept = kept.cpu().bool() & graph.real
        plan = ComputePlan.build(graph, kept, self.kind)
        batch = self.data[0]
        with torch.no_grad():
            logits = run_masked(model, graph, batch.clean, batch.reference, kept.to(model.device, model.dtype), plan,
                                batch.positions)
        sums = MetricSums()
        sums.add(batch, logits)
        means = sums.means(len(batch.clean))
        f = faithfulness(means["logit_diff"], self.full["logit_diff"], self.empty["logit_diff"])
        return {"test_kl": means["kl"], "test_logit_diff": means["logit_diff"], "test_accuracy": means["accuracy"],
                "test_faithfulness": f}

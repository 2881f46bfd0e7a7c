"""Task batches on the model's device, each with its ablation reference and the
full model's logits, and the loss attribution and pruning explain.

``TaskBatches`` makes a batch when it is first asked for and keeps it only while
a ``ReferenceCache`` has room (a memory budget, and optionally a folder on disk
beyond it); any other batch is made again when needed: one no-grad forward on
its corrupted prompts (the reference) and one on its clean prompts (the logits
KL compares with, at the answer positions only). So the memory a run holds is
bounded by the budget, whatever the number of examples. Interchange references
are kept compact (``CompactReference``: attention values before the output
projection) and expanded, exactly, when a batch is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ablation import mean_reference, zero_reference
from .errors import HapError
from .graph import Graph
from .models.loading import Model
from .plain_run import answer_logits
from .reference import AblationKind, CompactReference, Reference, interchange_reference
from .settings import DEFAULT_REFERENCE_MEMORY_GIB
from .tasks import TaskData

GIB = 2**30


class Loss(str, Enum):
    """What attribution explains."""

    METRIC = "logit-diff"  # the task's own metric (probability difference for greater-than)
    KL = "kl"


@dataclass(frozen=True)
class Batch:
    """One batch of a task on the model's device, with its ablation reference."""

    clean: Tensor  # [B, T]
    positions: Tensor  # [B] answer positions
    task: TaskData
    reference: Reference
    clean_logits: Tensor | None  # [B, V] full model at the answer positions (None if not asked for)



def make_reference(model: Model, graph: Graph, task: TaskData, corrupted: Tensor, kind: AblationKind) -> Reference:
    """The reference for a batch: its corrupted prompts, the task's mean, or zero."""
    if kind is AblationKind.INTERCHANGE:
        return interchange_reference(model, corrupted)
    if kind is AblationKind.MEAN:
        return mean_reference(model, graph, task.clean_ids, task.lengths)
    return zero_reference(model, graph, task.clean_ids.shape[1])


def make_batch(model: Model, graph: Graph, part: TaskData, kind: AblationKind, clean_logits: bool = True,
               shared: Reference | None = None) -> Batch:
    """One batch of ``part`` with its reference (``shared`` for mean/zero) and, if asked, the full model's
    logits at the answer positions."""
    clean = part.clean_ids.to(model.device)
    positions = part.answer_positions.to(model.device)
    reference = shared or make_reference(model, graph, part, part.corrupted_ids.to(model.device), kind)
    logits = answer_logits(model, clean, positions) if clean_logits else None
    return Batch(clean, positions, part, reference, logits)


def batches(model: Model, graph: Graph, task: TaskData, batch_size: int, kind: AblationKind,
            clean_logits: bool = True) -> Iterator[Batch]:
    """Task batches made one at a time (nothing kept), with references (mean/zero: one for all).

    ``clean_logits``: also run the full model once per batch (KL and evaluation need it).
    """
    shared = None if kind is AblationKind.INTERCHANGE else make_reference(model, graph, task, task.corrupted_ids, kind)
    for part in task.batches(batch_size):
        yield make_batch(model, graph, part, kind, clean_logits, shared)


@dataclass(frozen=True)
class _Stored:
    """A made batch as the cache keeps it: the reference compact when it is an interchange one;
    ``shared`` when it is the task's one mean/zero reference (held once, not per batch)."""

    reference: Reference | CompactReference
    clean_logits: Tensor | None
    shared: bool = False

    @property
    def nbytes(self) -> int:
        ref = self.reference
        if self.shared:
            size = 0
        elif isinstance(ref, CompactReference):
            size = ref.nbytes
        else:
            size = sum(t.numel() * t.element_size() for t in (ref.outputs, ref.block_inputs))
            if ref.fixed_outputs.data_ptr() != ref.outputs.data_ptr():
                size += ref.fixed_outputs.numel() * ref.fixed_outputs.element_size()
        if self.clean_logits is not None:
            size += self.clean_logits.numel() * self.clean_logits.element_size()
        return size


@dataclass
class ReferenceCache:
    """Made batches kept by key while they fit in ``memory_budget`` bytes.

    With a ``folder``, a batch that does not fit is written there and
    memory-mapped back (the operating system pages it in when a step reads it),
    so nothing is made twice; without one it is simply not kept. First come,
    first kept: nothing is evicted, so a run's cache settles after the first
    pass and stays deterministic.
    """

    memory_budget: int = int(DEFAULT_REFERENCE_MEMORY_GIB * GIB)
    folder: Path | None = None
    held: int = 0
    _stored: dict[tuple, _Stored] = field(default_factory=dict)

    def get(self, key: tuple) -> _Stored | None:
        return self._stored.get(key)

    def put(self, key: tuple, stored: _Stored) -> None:
        """Keep ``stored`` if there is room (in memory, else on disk)."""
        size = stored.nbytes
        if self.held + size <= self.memory_budget:
            self.held += size
            self._stored[key] = stored
        elif self.folder is not None:
            name = "-".join(str(part) for part in key)
            self._stored[key] = _offload(stored, self.folder / f"batch-{name}.pt")


class TaskBatches(Sequence[Batch]):
    """The batches of a task in order, made on demand and kept within a ``ReferenceCache``.

    Batch i holds examples ``[i * batch_size, (i + 1) * batch_size)`` (of a ``shard``, its share of
    them). Several ``TaskBatches`` (train and test, or a ``head``) may share one cache; ``name`` keeps
    their keys apart. Mean/zero references are made once for the whole task.
    """

    def __init__(self, model: Model, graph: Graph, task: TaskData, batch_size: int,
                 kind: AblationKind | str = AblationKind.INTERCHANGE, clean_logits: bool = True,
                 cache: ReferenceCache | None = None, name: str = "task",
                 bounds: list[tuple[int, int]] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.graph, self.task = model, graph, task
        self.batch_size, self.kind, self.clean_logits = batch_size, AblationKind(kind), clean_logits
        self.cache = cache if cache is not None else ReferenceCache(memory_budget=0)
        self.name = name
        whole = [(start, min(start + batch_size, len(task))) for start in range(0, len(task), batch_size)]
        self.whole_sizes = [stop - start for start, stop in whole]  # examples in each batch, all shares together
        self._bounds = whole if bounds is None else bounds
        self._parts = [task.slice(start, stop) for start, stop in self._bounds]
        self._shared: Reference | None = None

    def shard(self, rank: int, world_size: int) -> TaskBatches:
        """This process's share of every batch (data parallel): batch i of the shard holds the ``rank``-th of
        ``world_size`` near-equal consecutive pieces of batch i; ``whole_sizes`` still counts the whole
        batch, so a loss summed over the share and divided by it adds up, over the processes, to the
        batch's mean. Every process needs an example of every batch."""
        if world_size == 1:
            return self
        smallest = min(self.whole_sizes)
        if smallest < world_size:
            raise HapError(f"data parallel over {world_size} processes: a batch of {smallest} examples cannot give "
                           "each process one; choose --batch-size and --n-examples so that every batch (the last "
                           f"included) has at least {world_size}")
        bounds = []
        for index, size in enumerate(self.whole_sizes):
            start = index * self.batch_size
            cuts = [start + size * k // world_size for k in range(world_size + 1)]
            bounds.append((cuts[rank], cuts[rank + 1]))
        shard = TaskBatches(self.model, self.graph, self.task, self.batch_size, self.kind, self.clean_logits,
                            self.cache, self.name, bounds)
        shard._shared = self._shared
        return shard

    def __len__(self) -> int:
        return len(self._parts)

    @property
    def n_examples(self) -> int:
        return len(self.task)

    def __getitem__(self, index: int) -> Batch:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        part = self._parts[index]
        start, stop = self._bounds[index]
        key = (self.name, start, stop)
        stored = self.cache.get(key)
        if stored is None or (self.clean_logits and stored.clean_logits is None):
            stored = self._make(part)
            self.cache.put(key, stored)
        reference = stored.reference
        if isinstance(reference, CompactReference):
            reference = reference.expand(self.model)
        clean = part.clean_ids.to(self.model.device)
        return Batch(clean, part.answer_positions.to(self.model.device), part, reference, stored.clean_logits)

    def _make(self, part: TaskData) -> _Stored:
        model = self.model
        if self.kind is AblationKind.INTERCHANGE:
            reference: Reference | CompactReference = CompactReference.of(model, part.corrupted_ids.to(model.device))
        else:
            if self._shared is None:
                self._shared = make_reference(model, self.graph, self.task, self.task.corrupted_ids, self.kind)
            reference = self._shared
        logits = None
        if self.clean_logits:
            logits = answer_logits(model, part.clean_ids.to(model.device), part.answer_positions.to(model.device))
        return _Stored(reference, logits, shared=self.kind is not AblationKind.INTERCHANGE)

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))

    def head(self, n_examples: int) -> TaskBatches:
        """The first ``n_examples`` examples as batches of the same size, sharing this cache where they coincide."""
        if n_examples >= len(self.task):
            return self
        head = TaskBatches(self.model, self.graph, self.task.slice(0, n_examples), self.batch_size, self.kind,
                           self.clean_logits, self.cache, self.name)
        head._shared = self._shared
        return head


def kl_divergence(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(reference || logits) per example, [N, V] -> [N]."""
    reference = F.log_softmax(reference_logits.float(), -1)
    kl = (reference.exp() * (reference - F.log_softmax(logits.float(), -1))).sum(-1)
    return kl.clamp_min(0.0)  # rounding can give -1e-8 for identical distributions


def divergence(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """How far a run is from the full model per example, [N, V] -> [N]: KL(reference || run) when the
    model outputs a distribution; for one numerical output (V = 1: tracr's numerical programs, where a
    softmax is constant and KL always 0) the squared error. Metrics report it as ``kl``."""
    if logits.shape[-1] == 1:
        return (logits.float() - reference_logits.float()).square()[:, 0]
    return kl_divergence(reference_logits, logits)


def loss_function(loss: Loss, batch: Batch) -> Callable[[Tensor], Tensor]:
    """L(logits [B, V]) -> scalar, the mean over the batch (``Loss.KL``: of ``divergence``)."""
    if loss is Loss.KL and batch.clean_logits.shape[-1] == 1:
        return lambda logits: divergence(batch.clean_logits, logits).mean()
    if loss is Loss.KL:
        clean_log_probs = F.log_softmax(batch.clean_logits.float(), dim=-1)

        def kl(logits: Tensor) -> Tensor:
            return F.kl_div(F.log_softmax(logits.float(), -1), clean_log_probs, log_target=True,
                            reduction="batchmean")

        return kl
    return lambda logits: batch.task.logit_diff(logits).mean()


def _offload(stored: _Stored, path: Path) -> _Stored:
    """``stored`` written to ``path`` and memory-mapped back: the operating system pages it in as steps
    need it, so a run is not limited by memory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    reference = stored.reference
    if stored.shared:
        tensors = {}
    elif isinstance(reference, CompactReference):
        tensors = {"mixed": reference.mixed, "others": reference.others, "block_inputs": reference.block_inputs}
    else:
        tensors = {"outputs": reference.outputs, "block_inputs": reference.block_inputs,
                   "fixed_outputs": reference.fixed_outputs}
    if stored.clean_logits is not None:
        tensors["clean_logits"] = stored.clean_logits
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save({name: value.cpu().contiguous() for name, value in tensors.items()}, temporary)
    temporary.replace(path)
    loaded = torch.load(path, mmap=True, weights_only=True)
    device = stored.clean_logits.device if stored.clean_logits is not None else reference.block_inputs.device
    mapped = {name: value.to(device) for name, value in loaded.items()}
    if stored.shared:
        kept: Reference | CompactReference = reference
    elif isinstance(reference, CompactReference):
        kept = CompactReference(mapped["mixed"], mapped["others"], mapped["block_inputs"])
    else:
        kept = Reference(reference.kind, mapped["outputs"], mapped["block_inputs"], mapped["fixed_outputs"])
    return _Stored(kept, mapped.get("clean_logits"), stored.shared)

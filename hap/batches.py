"""Task batches on the model's device, each with its ablation reference and the
full model's logits, and the loss attribution and pruning explain.

``TaskBatches`` makes a batch when it is first asked for and keeps it only while
a ``ReferenceCache`` has room (a memory budget, and optionally a folder on disk
beyond it); any other batch is made again when needed: one no-grad forward on
its corrupted prompts (the reference) and one on its clean prompts (the logits
KL compares with). So the memory a run holds is bounded by the budget, whatever
the number of examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ablation import AblationKind, Reference, interchange_reference, mean_reference, zero_reference
from .graph import Graph
from .models.loading import Model
from .tasks import TaskData

GIB = 2**30
DEFAULT_REFERENCE_MEMORY_GIB = 2.0


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

    @property
    def nbytes(self) -> int:
        """Bytes held by the reference and the logits (what caching this batch costs)."""
        ref = self.reference
        tensors = [ref.outputs, ref.block_inputs]
        if ref.fixed_outputs.data_ptr() != ref.outputs.data_ptr():
            tensors.append(ref.fixed_outputs)
        if self.clean_logits is not None:
            tensors.append(self.clean_logits)
        return sum(t.numel() * t.element_size() for t in tensors)


def make_reference(model: Model, graph: Graph, task: TaskData, corrupted: Tensor, kind: AblationKind) -> Reference:
    """The reference for a batch: its corrupted prompts, the task's mean, or zero."""
    if kind is AblationKind.INTERCHANGE:
        return interchange_reference(model, corrupted)
    if kind is AblationKind.MEAN:
        return mean_reference(model, graph, task.clean_ids, task.lengths)
    return zero_reference(model, graph, task.clean_ids.shape[1])


def full_model_logits(model: Model, clean: Tensor, positions: Tensor) -> Tensor:
    """The full model's logits [B, V] at each row's answer position (no gradient)."""
    with torch.no_grad():
        # Right padding never reaches the answer positions; the all-ones mask only silences a warning.
        logits = model.hf_model(clean, attention_mask=torch.ones_like(clean)).logits
    return logits[torch.arange(len(clean), device=clean.device), positions]


def make_batch(model: Model, graph: Graph, part: TaskData, kind: AblationKind, clean_logits: bool = True,
               shared: Reference | None = None) -> Batch:
    """One batch of ``part`` with its reference (``shared`` for mean/zero) and, if asked, the full model's logits."""
    clean = part.clean_ids.to(model.device)
    positions = (part.lengths - 1).to(model.device)
    reference = shared or make_reference(model, graph, part, part.corrupted_ids.to(model.device), kind)
    logits = full_model_logits(model, clean, positions) if clean_logits else None
    return Batch(clean, positions, part, reference, logits)


def batches(model: Model, graph: Graph, task: TaskData, batch_size: int, kind: AblationKind,
            clean_logits: bool = True) -> Iterator[Batch]:
    """Task batches made one at a time (nothing kept), with references (mean/zero: one for all).

    ``clean_logits``: also run the full model once per batch (KL and evaluation need it).
    """
    shared = None if kind is AblationKind.INTERCHANGE else make_reference(model, graph, task, task.corrupted_ids, kind)
    for part in task.batches(batch_size):
        yield make_batch(model, graph, part, kind, clean_logits, shared)


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
    _batches: dict[tuple, Batch] = field(default_factory=dict)

    def get(self, key: tuple) -> Batch | None:
        return self._batches.get(key)

    def put(self, key: tuple, batch: Batch) -> Batch:
        """Keep ``batch`` if there is room (in memory, else on disk); returns the batch to use."""
        size = batch.nbytes
        if self.held + size <= self.memory_budget:
            self.held += size
            self._batches[key] = batch
        elif self.folder is not None:
            name = "-".join(str(part) for part in key)
            batch = offload(batch, self.folder / f"batch-{name}.pt")
            self._batches[key] = batch
        return batch


class TaskBatches(Sequence[Batch]):
    """The batches of a task in order, made on demand and kept within a ``ReferenceCache``.

    Batch i holds examples ``[i * batch_size, (i + 1) * batch_size)``. Several
    ``TaskBatches`` (train and test, or a ``head``) may share one cache; ``name``
    keeps their keys apart. Mean/zero references are made once for the task.
    """

    def __init__(self, model: Model, graph: Graph, task: TaskData, batch_size: int,
                 kind: AblationKind | str = AblationKind.INTERCHANGE, clean_logits: bool = True,
                 cache: ReferenceCache | None = None, name: str = "task") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.graph, self.task = model, graph, task
        self.batch_size, self.kind, self.clean_logits = batch_size, AblationKind(kind), clean_logits
        self.cache = cache if cache is not None else ReferenceCache(memory_budget=0)
        self.name = name
        self._parts = list(task.batches(batch_size))
        self._shared: Reference | None = None

    def __len__(self) -> int:
        return len(self._parts)

    @property
    def n_examples(self) -> int:
        return len(self.task)

    def __getitem__(self, index: int) -> Batch:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start = index * self.batch_size
        key = (self.name, start, start + len(self._parts[index]))
        batch = self.cache.get(key)
        if batch is None or (self.clean_logits and batch.clean_logits is None):
            if self.kind is not AblationKind.INTERCHANGE and self._shared is None:
                self._shared = make_reference(self.model, self.graph, self.task, self.task.corrupted_ids, self.kind)
            batch = make_batch(self.model, self.graph, self._parts[index], self.kind, self.clean_logits, self._shared)
            batch = self.cache.put(key, batch)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))

    def head(self, n_examples: int) -> TaskBatches:
        """The first ``n_examples`` examples as batches of the same size, sharing this cache where they coincide."""
        if n_examples >= len(self.task):
            return self
        part = self.task.slice(0, n_examples)
        head = TaskBatches(self.model, self.graph, part, self.batch_size, self.kind, self.clean_logits, self.cache,
                           self.name)
        head._shared = self._shared
        return head


def loss_function(loss: Loss, batch: Batch) -> Callable[[Tensor], Tensor]:
    """L(logits [B, V]) -> scalar, the mean over the batch."""
    if loss is Loss.KL:
        clean_log_probs = F.log_softmax(batch.clean_logits.float(), dim=-1)

        def kl(logits: Tensor) -> Tensor:
            return F.kl_div(F.log_softmax(logits.float(), -1), clean_log_probs, log_target=True,
                            reduction="batchmean")

        return kl
    return lambda logits: batch.task.logit_diff(logits).mean()


def offload(batch: Batch, path: Path) -> Batch:
    """The batch with its reference and logits kept in a file and memory-mapped back.

    The operating system pages the corrupted activations in as steps need them,
    so a run is not limited by memory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    reference = batch.reference
    tensors = {"outputs": reference.outputs, "block_inputs": reference.block_inputs,
               "fixed_outputs": reference.fixed_outputs}
    if batch.clean_logits is not None:
        tensors["clean_logits"] = batch.clean_logits
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save({name: value.cpu().contiguous() for name, value in tensors.items()}, temporary)
    temporary.replace(path)
    loaded = torch.load(path, mmap=True, weights_only=True)
    device = batch.clean.device
    mapped = Reference(reference.kind, loaded["outputs"].to(device), loaded["block_inputs"].to(device),
                       loaded["fixed_outputs"].to(device))
    logits = loaded["clean_logits"].to(device) if "clean_logits" in loaded else None
    return Batch(batch.clean, batch.positions, batch.task, mapped, logits)

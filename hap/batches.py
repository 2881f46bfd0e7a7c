"""Task batches on the model's device, each with its ablation reference, and the
loss attribution and pruning explain. Built once per batch and reused."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .ablation import AblationKind, Reference, interchange_reference, mean_reference, zero_reference
from .graph import Graph
from .models.loading import Model
from .tasks import TaskData


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


def batches(model: Model, graph: Graph, task: TaskData, batch_size: int, kind: AblationKind,
            clean_logits: bool = True) -> Iterable[Batch]:
    """Task batches with references built once each (mean/zero: once for all).

    ``clean_logits``: also run the full model once per batch (KL and evaluation need it).
    """
    shared = None if kind is AblationKind.INTERCHANGE else make_reference(model, graph, task, task.corrupted_ids, kind)
    for part in task.batches(batch_size):
        clean = part.clean_ids.to(model.device)
        positions = (part.lengths - 1).to(model.device)
        reference = shared or make_reference(model, graph, part, part.corrupted_ids.to(model.device), kind)
        logits = None
        if clean_logits:
            with torch.no_grad():
                # Right padding never reaches the answer positions; the all-ones mask only silences a warning.
                logits = model.hf_model(clean, attention_mask=torch.ones_like(clean)).logits
                logits = logits[torch.arange(len(part), device=model.device), positions]
        yield Batch(clean, positions, part, reference, logits)


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

    For ``--cache-dir``: the operating system pages the corrupted activations in
    as steps need them, so a run is not limited by memory.
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

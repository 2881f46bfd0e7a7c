"""Data parallel over torch.distributed: which batches a process takes, and summing what they found.

Launched with ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous), each
process takes every ``world_size``-th batch, starting at its rank, and the per-rank sums are added with
one all-reduce. Only the main process (rank 0) writes files and prints. Backend: NCCL on CUDA, gloo on
CPU. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import HapError


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world_size`` data-parallel processes."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run: the model's device under NCCL, else CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> range:
        """The indices, of ``n`` batches, this process takes."""
        return range(self.rank, n, self.world_size)

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over all processes (the tensor itself alone); every process gets it."""
        if self.world_size == 1:
            return tensor
        summed = tensor.to(self.device).contiguous()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(tensor.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def leave(self) -> None:
        """Leave the process group (a no-op alone): a process that exits still in it can abort in gloo's
        threads at interpreter exit, and torchrun then stops the others."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this is the process that prints and writes: rank 0 of a ``torchrun`` launch, or the only one.
    Read from the environment, so it joins no process group."""
    return int(os.environ.get("RANK", "0")) == 0


def ranks_from_env(device: torch.device | None = None) -> Ranks:
    """Join the process group ``torchrun`` describes in the environment (NCCL for a CUDA ``device``, gloo
    otherwise); one process alone when it describes none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks()
    nccl = device is not None and device.type == "cuda"
    on_this_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if nccl and on_this_machine > torch.cuda.device_count():
        raise HapError(f"torchrun started {on_this_machine} processes on this machine, which has "
                       f"{torch.cuda.device_count()} GPU(s), and NCCL needs one GPU per process: use "
                       f"--nproc_per_node {torch.cuda.device_count()}, or --device cpu (gloo)")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if nccl else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device if nccl else torch.device("cpu"))

"""The parts of a masked run (``hap.ablation.MaskedRun``) that other modules replace.

The core forms each reader's input as base_b plus the masked sum of the deltas, and computes every
block with the model. Three parts of that can change, each a class here whose behaviour is the plain
masked run's, subclassed where the change is made:

* ``EarlyBlocks``: blocks taken as given instead of computed (``hap.known_outputs``: ACDC's recorded
  blocks, read through ``GivenBlocks``);
* ``BlockPrecision``: who computes each block (``hap.twin``: PAHQ's reduced-precision twin);
* ``Probing``: what readers read and sources write on top (``hap.probes``: attribution's probes).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .graph import Graph
from .models.adapter import ModelAdapter, RunContext


class EarlyBlocks:
    """Blocks a run takes as given instead of computing them. This base: none, every block is computed.

    The run computes no block before ``until_block`` and keeps no delta rows for the first ``n_sources``
    sources, theirs; ``inputs`` is what those sources add to some readers' inputs.
    """

    until_block: int = 0
    n_sources: int = 0

    def inputs(self, readers: Tensor) -> tuple[Tensor, Tensor] | None:
        """What the early blocks add to these readers' inputs: (their positions in ``readers`` [u], sums
        [u, B, T, D]), or None when nothing."""
        return None


class GivenBlocks(Protocol):
    """Early blocks as a run is given them (``hap.known_outputs.KnownOutputs``): ``check`` refuses a run
    they do not fit; ``for_run`` is their reading by a run under ``mask`` ([S, R] or [B, S, R]; entries
    off the ``live`` [S, R] edges count as 0) on a batch of ``batch`` examples."""

    def check(self, graph: Graph, input_ids: Tensor) -> None: ...

    def for_run(self, mask: Tensor, live: Tensor, batch: int) -> EarlyBlocks: ...


class BlockPrecision:
    """The adapter, run context and dtype that compute each block's sources. This base: the model's own."""

    def __init__(self, adapter: ModelAdapter, ctx: RunContext, dtype: torch.dtype) -> None:
        self.full = (adapter, ctx, dtype)

    def computing(self, block: int) -> tuple[ModelAdapter, RunContext, torch.dtype]:
        return self.full


class Probing:
    """What readers read and sources write on top of the masked mix. This base: nothing."""

    def read(self, x: Tensor, readers: Tensor, heads: Tensor | None = None) -> Tensor:
        """What ``readers`` [n] read, given their inputs x [1|n, B, T, D] (``heads`` [n]: per-head copies of
        key/value inputs, the query head of each row)."""
        return x

    def interpolates(self, sources: slice) -> bool:
        """Whether some of these sources write something other than what they compute."""
        return False

    def written(self, sources: Tensor | slice, computed: Tensor) -> Tensor:
        """What ``sources`` write, given what they computed [n, B, T, D]."""
        return computed

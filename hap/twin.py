"""A reduced-precision twin of the model, and the blocks of a masked run it computes (PAHQ).

``ReducedTwin`` is a second adapter over a reduced copy of the model (built and checked by
``hap.precision``). ``MixedPrecision`` names the block a test investigates; in a run given it, every other
block's sources are computed by the twin, inputs cast down and outputs cast back up (``TwinBlocks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .models.adapter import ModelAdapter, RunContext
from .run_parts import BlockPrecision


@dataclass(frozen=True)
class ReducedTwin:
    """A reduced-precision adapter next to the model's own: ``kind`` (int8, bfloat16, float16) and the
    dtype its blocks compute in (float32 for int8: only the weights of its linear layers are quantised)."""

    kind: str
    adapter: ModelAdapter
    dtype: torch.dtype
    divergence: float | None = None  # KL(model || twin) on the task's first examples, where measured


@dataclass(frozen=True)
class MixedPrecision:
    """Compute every block but ``full_block`` (the investigated one) with a reduced-precision twin of the
    model (``hap.precision.reduced_twin``); gradients do not pass through the twin."""

    twin: ReducedTwin
    full_block: int

    def for_run(self, adapter: ModelAdapter, ctx: RunContext, dtype: torch.dtype, input_ids: Tensor) -> TwinBlocks:
        """Who computes each block of a run on ``input_ids`` [B, T] (on the model's device), given the
        model's own adapter, run context and dtype."""
        return TwinBlocks(self, adapter, ctx, dtype, self.twin.adapter.prepare(input_ids))


class TwinBlocks(BlockPrecision):
    """The model computes the investigated block, the twin every other."""

    def __init__(self, precision: MixedPrecision, adapter: ModelAdapter, ctx: RunContext, dtype: torch.dtype,
                 twin_ctx: RunContext) -> None:
        super().__init__(adapter, ctx, dtype)
        self.full_block = precision.full_block
        self.reduced = (precision.twin.adapter, twin_ctx, precision.twin.dtype)

    def computing(self, block: int) -> tuple[ModelAdapter, RunContext, torch.dtype]:
        return self.full if block == self.full_block else self.reduced

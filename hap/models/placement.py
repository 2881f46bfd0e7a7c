"""Models larger than one device, and half-precision weights: blocks run where (and in the dtype) their
weights are; the bookkeeping stays on one device, in float32.

A model loaded with a ``device_map`` (``hap.load_model(..., device_map="auto")``, through accelerate)
keeps each layer's weights on its own device. ``PlacedAdapter`` wraps the family's adapter so that every
block runs where its weights are: a block's inputs (reader inputs, queries, keys, values, the run's
rotary tables and masks) move to that device, and what the block writes (head and MLP outputs, logits)
comes back to the *home* device, the embedding's. Everything the ablation primitive keeps across blocks
(the delta buffer, the references, the masks and their gradients) stays on the home device, so the
engine itself is unchanged; moves are differentiable, so attribution and pruning gradients cross devices.

Half-precision weights (``--dtype bfloat16``/``float16``) go through the same wrapper: each block computes
in the weights' dtype, and what the engine keeps (the deltas, references, masked sums, masks) stays in
float32, where summing hundreds of deltas would otherwise lose the small ones (``Model.dtype`` is that
bookkeeping dtype, ``Model.weights_dtype`` the weights').

What moves per block is its readers' inputs there and its sources' outputs back ([n, B, T, D] each way);
the weights never move. A GPU user should check that the home device has room for the bookkeeping
(benchmarks/README.md, step_memory.py: the delta buffer and references are S + 2C rows of B x T x D).
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from .adapter import ModelAdapter, RunContext


def context_on(ctx: RunContext, device: torch.device) -> RunContext:
    """The run context with its tensors on ``device``."""
    def moved(value: object) -> object:
        if isinstance(value, Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(moved(item) for item in value)
        return value

    return replace(ctx, **{f.name: moved(getattr(ctx, f.name)) for f in fields(ctx)})


class PlacedAdapter(ModelAdapter):
    """``inner`` (a family adapter over a model spread across devices, or with half-precision weights), run
    block by block where each block's weights are, in their dtype; results on ``home`` in ``dtype``."""

    def __init__(self, inner: ModelAdapter, home: torch.device, dtype: torch.dtype | None = None) -> None:
        super().__init__(inner.hf_model)
        self.inner, self.home = inner, home
        self.weights_dtype = next(inner.hf_model.parameters()).dtype
        self.dtype = dtype if dtype is not None else self.weights_dtype
        self.layout, self.attention = inner.layout, inner.attention

    # -- where each block runs ----------------------------------------------
    def attention_device(self, layer: int) -> torch.device:
        return self.inner.attention[layer].w_q.device

    def mlp_device(self, layer: int) -> torch.device:
        return self.inner.mlp_device(layer)

    def unembed_device(self) -> torch.device:
        return self.inner.unembed_device()

    def embed_device(self) -> torch.device:
        return self.inner.embed_device()

    def block_devices(self) -> list[torch.device]:
        """The device of every block, in block order (embedding, attention 0, MLP 0, ..., unembedding)."""
        devices = [self.embed_device()]
        for layer in range(self.layout.n_layers):
            devices += [self.attention_device(layer), self.mlp_device(layer)]
        return devices + [self.unembed_device()]

    def _context(self, ctx: RunContext, device: torch.device) -> RunContext:
        return context_on(ctx, device)  # rotary tables and masks: [1, 1, T, K] and [1, 1, T, T], cheap to move

    def _back(self, x: Tensor) -> Tensor:
        return x.to(self.home, self.dtype)

    def _there(self, x: Tensor, device: torch.device) -> Tensor:
        return x.to(device, self.weights_dtype)

    # -- the blocks, delegated ---------------------------------------------
    def prepare(self, input_ids: Tensor) -> RunContext:
        return context_on(self.inner.prepare(input_ids.to(self.embed_device())), self.home)

    def embed(self, ctx: RunContext) -> Tensor:
        return self._back(self.inner.embed(self._context(ctx, self.embed_device())))

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        return self._back(self.inner.mlp(layer, self._there(x, self.mlp_device(layer))))

    def unembed(self, x: Tensor) -> Tensor:
        return self._back(self.inner.unembed(self._there(x, self.unembed_device())))

    def final_norm(self) -> torch.nn.Module | None:
        return self.inner.final_norm()

    def logits_from_normed(self, y: Tensor) -> Tensor:
        return self._back(self.inner.logits_from_normed(self._there(y, self.unembed_device())))

    def attention_pattern(self, layer: int, q: Tensor, k: Tensor, ctx: RunContext) -> Tensor:
        device = self.attention_device(layer)
        return self.inner.attention_pattern(layer, self._there(q, device), self._there(k, device),
                                            self._context(ctx, device)).to(self.home)

    def queries(self, layer: int, x: Tensor, ctx: RunContext, heads: Tensor | None = None) -> Tensor:
        device = self.attention_device(layer)
        return self._back(self.inner.queries(layer, self._there(x, device), self._context(ctx, device), _on(heads, device)))

    def keys(self, layer: int, x: Tensor, ctx: RunContext, groups: Tensor | None = None) -> Tensor:
        device = self.attention_device(layer)
        return self._back(self.inner.keys(layer, self._there(x, device), self._context(ctx, device), _on(groups, device)))

    def values(self, layer: int, x: Tensor, ctx: RunContext, groups: Tensor | None = None) -> Tensor:
        device = self.attention_device(layer)
        return self._back(self.inner.values(layer, self._there(x, device), self._context(ctx, device), _on(groups, device)))

    def head_inputs(self, layer: int, x: Tensor, ctx: RunContext, heads: Tensor,
                    groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        device = self.attention_device(layer)
        q, k, v = self.inner.head_inputs(layer, self._there(x, device), self._context(ctx, device),
                                         _on(heads, device), _on(groups, device))
        return self._back(q), self._back(k), self._back(v)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: RunContext) -> Tensor:
        device = self.attention_device(layer)
        return self._back(self.inner.attend(layer, self._there(q, device), self._there(k, device), self._there(v, device),
                                             self._context(ctx, device)))

    def head_outputs(self, layer: int, mixed: Tensor, heads: Tensor | None = None) -> Tensor:
        device = self.attention_device(layer)
        return self._back(self.inner.head_outputs(layer, self._there(mixed, device), _on(heads, device)))

    def layer_output(self, layer: int, mixed: Tensor) -> Tensor:
        return self._back(self.inner.layer_output(layer, self._there(mixed, self.attention_device(layer))))

    def ungrouped(self) -> ModelAdapter:
        return PlacedAdapter(self.inner.ungrouped(), self.home, self.dtype)


def _on(index: Tensor | None, device: torch.device) -> Tensor | None:
    return None if index is None else index.to(device)


HALF = (torch.bfloat16, torch.float16)


def placed(adapter: ModelAdapter, home: torch.device | None = None) -> ModelAdapter:
    """``adapter`` itself when its model's weights share one device and are not half precision, else a
    ``PlacedAdapter`` (float32 bookkeeping for half-precision weights) with its results on ``home``
    (default: the embedding's device)."""
    parameters = list(adapter.hf_model.parameters())
    devices = {parameter.device for parameter in parameters}
    half = parameters[0].dtype in HALF
    if len(devices) <= 1 and not half:
        return adapter
    return PlacedAdapter(adapter, home if home is not None else adapter.embed_device(),
                         torch.float32 if half else None)

"""The plain forward pass: every edge on, through the adapter, cut at the sources.

Each reader reads the full residual, which is updated in the Hugging Face module's own order, so the
logits equal its forward's bit for bit (``hap verify`` checks this). It records what every source
writes (``trace``: the interchange reference is one such run on the corrupted prompts) and, with
``hap.probes.ReaderProbes``, is attribution's fast path: each reader reads the residual plus a zero probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .models.adapter import ModelAdapter
from .models.loading import Model
from .run_parts import Probing


@dataclass(frozen=True)
class Trace:
    """One plain forward pass, cut at the sources.

    ``outputs`` [S, B, T, D]: what every source wrote (without gradient); ``block_inputs``
    [n_blocks, B, T, D]: the residual each block's readers read (index 0, the
    embedding, reads nothing and is zero); ``logits`` [B, T, V] (None when not
    asked for); ``mixed`` [L, B, H, T, K]: each layer's attention values before
    the output projection (only when asked for).
    """

    outputs: Tensor
    block_inputs: Tensor
    logits: Tensor | None
    mixed: Tensor | None = None


def group_of_heads(adapter: ModelAdapter, device: torch.device) -> Tensor:
    """The key/value group of each query head [H]."""
    layout = adapter.layout
    return torch.arange(layout.n_heads, device=device) // layout.heads_per_group


def trace(model: Model, input_ids: Tensor, logits: bool = True, mixed: bool = False) -> Trace:
    """Run the model on token ids [B, T] through the adapter, recording every source.

    All edges are on: each reader reads the full residual, which is updated in
    the Hugging Face module's own order, so the logits equal its forward's
    bit for bit (``hap verify`` checks this). ``logits=False`` skips the
    unembedding; ``mixed=True`` also keeps each layer's attention values.
    """
    return plain_run(model, input_ids, want_logits=logits, keep_mixed=mixed)


def answer_logits(model: Model, input_ids: Tensor, positions: Tensor) -> Tensor:
    """The full model's logits [B, V] at one position per row, without recording anything (no gradient)."""
    with torch.no_grad():
        return plain_run(model, input_ids, positions=positions, record=False).logits


def plain_run(
    model: Model,
    input_ids: Tensor,
    probes: Probing | None = None,
    positions: Tensor | None = None,
    record: bool = True,
    want_logits: bool = True,
    keep_mixed: bool = False,
    per_head_kv: bool = False,
) -> Trace:
    """The all-edges-on forward pass, optionally with probes and interpolated sources.

    With ``probes`` (``hap.probes.ReaderProbes``), every reader reads the residual
    plus a zero probe of its own, whose gradient is dL/d(reader input), and sources
    are interpolated towards the reference; with ``per_head_kv`` every query head
    reads its own copy of its group's key and value inputs (as TransformerLens'
    ungrouped attention does), each with its own probe. ``positions`` [B]: logits
    only at those positions ([B, V]). ``record=False`` keeps no source outputs or
    block inputs (the trace's are then empty).
    """
    adapter = model.adapter
    layout = adapter.layout
    device = model.device
    batch, length = input_ids.shape
    ctx = adapter.prepare(input_ids.to(device))
    group_of_head = group_of_heads(adapter, device)
    per_layer = layout.n_heads + 2 * layout.n_kv_heads + 1
    scaling = probes is not None and probes.interpolates(slice(None))

    def read(x: Tensor, first_reader: int, n: int) -> Tensor:
        if probes is None:
            return x[None]
        return probes.read(x[None], torch.arange(first_reader, first_reader + n, device=device))

    def read_per_head(x: Tensor, first_reader: int) -> Tensor:
        return probes.read(x[None], first_reader + group_of_head, torch.arange(layout.n_heads, device=device))

    def scaled(first: int, values: Tensor) -> tuple[Tensor, bool]:
        sources = slice(first, first + len(values))
        if probes is None or not probes.interpolates(sources):
            return values, False
        return probes.written(sources, values), True

    x, _ = scaled(0, adapter.embed(ctx)[None])
    x = x[0]
    # what every source writes, written in place as the run goes (no gradient: every caller reads it as data)
    recorded = x.new_empty(1 + layout.n_layers * (layout.n_heads + 1), *x.shape) if record else None

    def keep(first: int, values: Tensor) -> None:
        if recorded is not None:
            recorded[first : first + len(values)] = values.detach()

    keep(0, x[None])
    block_inputs = [torch.zeros_like(x)]
    kept_mixed = []
    for layer in range(layout.n_layers):
        block_inputs.append(x)
        first_reader = layer * per_layer
        first_head = 1 + layer * (layout.n_heads + 1)
        xq = read(x, first_reader, layout.n_heads)
        q = adapter.queries(layer, xq, ctx)
        if per_head_kv and probes is not None:  # each head projects its own copy with its group's weights
            k = adapter.keys(layer, read_per_head(x, first_reader + layout.n_heads), ctx, group_of_head)
            v = adapter.values(layer, read_per_head(x, first_reader + layout.n_heads + layout.n_kv_heads), ctx,
                               group_of_head)
        else:
            xk = read(x, first_reader + layout.n_heads, layout.n_kv_heads)
            xv = read(x, first_reader + layout.n_heads + layout.n_kv_heads, layout.n_kv_heads)
            k = adapter.keys(layer, xk, ctx).index_select(1, group_of_head)
            v = adapter.values(layer, xv, ctx).index_select(1, group_of_head)
        mixed = adapter.attend(layer, q, k, v, ctx)
        if keep_mixed:
            kept_mixed.append(mixed)
        beside = x  # what a parallel MLP reads: the residual before this layer's attention
        if record or scaling:
            heads, interpolated = scaled(first_head, adapter.head_outputs(layer, mixed))
            keep(first_head, heads)
            x = x + (heads.sum(0) if interpolated else adapter.layer_output(layer, mixed))
        else:
            x = x + adapter.layer_output(layer, mixed)
        mlp_input = beside if layout.parallel_attn_mlp else x
        block_inputs.append(mlp_input)
        mlp, _ = scaled(first_head + layout.n_heads,
                        adapter.mlp(layer, read(mlp_input, first_reader + per_layer - 1, 1)[0])[None])
        keep(first_head + layout.n_heads, mlp)
        x = x + mlp[0]
    block_inputs.append(x)
    logits = None
    if want_logits:
        final = x
        if positions is not None:
            final = x[torch.arange(batch, device=device), positions.to(device)][:, None]  # [B, 1, D]
        logits = adapter.unembed(read(final, layout.n_layers * per_layer, 1)[0])
        if positions is not None:
            logits = logits[:, 0]
    if not record:
        return Trace(x.new_zeros(0), x.new_zeros(0), logits)
    return Trace(recorded, torch.stack(block_inputs), logits, torch.stack(kept_mixed) if keep_mixed else None)

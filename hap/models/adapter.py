"""The adapter contract: a Hugging Face causal LM seen as sources and readers.

An adapter never copies or forks the model: it holds *views* of the module's own
parameters and calls its own norms, MLPs and rotary embedding. What it adds is
the split of the residual stream into per-source outputs, which is what edge
masking needs:

* sources (writers): the embedding (``input``), every attention head, every MLP;
* readers: every head's query input, every key/value group's key and value
  input, every MLP input, and the final ``logits``.

A reader's input is a sum of source outputs; the reader applies its own norm.
Shapes below: ``B`` batch, ``T`` tokens, ``D`` model width, ``H`` query heads,
``G`` key/value groups, ``K`` head width, ``n`` the number of readers being
formed (a leading ``1`` means "one residual shared by all of them").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnsupportedArchitectureError
from .normed import rms_normed_projection, rms_parameters


@dataclass(frozen=True)
class Layout:
    """The shape of a model as far as the edge graph is concerned."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    head_dim: int
    vocab_size: int
    parallel_attn_mlp: bool = False  # layer l's MLP reads the residual beside its attention (GPT-NeoX, Phi-2)
    heads_normed_together: bool = False  # the attention output is normed before the residual (Gemma-2/3, OLMo-2)
    kv_ungrouped: bool = False  # every query head reads its own copy of its group's k/v input (MIB's graph)

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class AttentionWeights:
    """Views of one attention layer's parameters, laid out per head.

    ``w_q``: [D, H, K]; ``w_k``/``w_v``: [D, G, K]; ``w_o``: [D, H, K] (maps a
    head's K-dim result back to D). Biases are [H, K] / [G, K] or None;
    ``b_o_share`` is the output bias divided by H, so that each head owns an
    equal share of it and the heads' outputs still sum to the layer's output.
    ``out_proj`` is the module's own output projection ([B, T, H*K] -> [B, T, D]).
    """

    norm: Callable[[Tensor], Tensor]
    out_proj: Callable[[Tensor], Tensor]
    w_q: Tensor
    w_k: Tensor
    w_v: Tensor
    w_o: Tensor
    b_q: Tensor | None
    b_k: Tensor | None
    b_v: Tensor | None
    b_o_share: Tensor | None
    scale: float
    q_norm: Callable[[Tensor], Tensor] | None = None  # norm of the projected queries (Qwen3), before RoPE
    k_norm: Callable[[Tensor], Tensor] | None = None  # and of the keys
    qk_norm_spans_heads: bool = False  # q/k norms over all heads' projections at once (OLMo-2), not per head
    post_norm: torch.nn.Module | None = None  # RMSNorm of the layer's output before the residual (Gemma-2/3, OLMo-2)
    softcap: float | None = None  # attention scores become softcap * tanh(scores / softcap) (Gemma-2)


@dataclass(frozen=True)
class RunContext:
    """Per-call facts every block needs: the tokens; for RoPE, cos/sin [1, T, K]; and,
    where attention is not plain causal, which keys each query may see ([B|1, 1, T, T] bool):
    ``attention_mask`` for every layer, or ``layer_masks`` per layer (None: causal), e.g. the
    sliding-window layers of Mistral or Qwen2. ``layer_rope``: cos/sin per layer, where layers
    differ (Gemma-3's local and global layers)."""

    input_ids: Tensor
    rope: tuple[Tensor, Tensor] | None = None
    attention_mask: Tensor | None = None
    layer_masks: tuple[Tensor | None, ...] | None = None
    layer_rope: tuple[tuple[Tensor, Tensor], ...] | None = None


def _project(x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor | None) -> Tensor:
    """Project normed reader inputs x [n|1, B, T, D] onto heads -> [B, n', T, K].

    With a shared input (leading 1) this is one matrix product for all selected
    heads; with one input per head (leading n == len(index)) each head reads its
    own row.
    """
    if index is not None:
        weight = weight.index_select(1, index)
        bias = bias.index_select(0, index) if bias is not None else None
    if x.shape[0] == 1:
        out = torch.einsum("btd,dhk->bhtk", x[0], weight)
    else:
        out = torch.einsum("hbtd,dhk->bhtk", x, weight)
    if bias is not None:
        out = out + bias[None, :, None, :]
    return out


class ModelAdapter:
    """Base class: everything that is the same for every family lives here.

    A family subclass fills ``layout``, ``attention`` (one ``AttentionWeights``
    per layer) and implements ``prepare``, ``embed``, ``mlp`` and ``unembed``;
    it may override ``_rope`` for rotary families.
    """

    layout: Layout
    attention: list[AttentionWeights]

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.hf_model = hf_model
        self._rms_found: dict[tuple, tuple[Tensor, float] | None] = {}  # _rms_parameters' answers

    # -- family-specific blocks -------------------------------------------
    def prepare(self, input_ids: Tensor) -> RunContext:
        """Per-call context for token ids [B, T]."""
        raise NotImplementedError

    def embed(self, ctx: RunContext) -> Tensor:
        """Output of the ``input`` source: [B, T, D]."""
        raise NotImplementedError

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """Output of source ``m{layer}`` for its un-normed reader input x [..., D]."""
        raise NotImplementedError

    def unembed(self, x: Tensor) -> Tensor:
        """Logits [..., V] for the un-normed ``logits`` reader input x [..., D]."""
        raise NotImplementedError

    def final_norm(self) -> torch.nn.Module | None:
        """The norm the ``logits`` reader applies before the unembedding (None: the model has none)."""
        raise NotImplementedError

    def logits_from_normed(self, y: Tensor) -> Tensor:
        """Logits [..., V] of the normed final residual y [..., D]: ``unembed(x)`` is
        ``logits_from_normed(final_norm()(x))``."""
        raise NotImplementedError

    def _rope(self, x: Tensor, ctx: RunContext, layer: int) -> Tensor:
        return x

    # -- where the blocks' weights are (models spread over devices: ``placement``) ----
    def embed_device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def mlp_device(self, layer: int) -> torch.device:
        return self.embed_device()

    def unembed_device(self) -> torch.device:
        return self.embed_device()

    def ungrouped(self) -> ModelAdapter:
        """This adapter on MIB's graph: under grouped-query attention every query head reads its own copy
        of its group's key and value input (as TransformerLens' ``ungroup_grouped_query_attention``), so
        the k/v readers are ``a{l}.h{h}<k>``/``<v>``, one per head. The heads project their copies with
        their group's weights; with every edge on the model computes what it computed before."""
        layout = self.layout
        if layout.n_kv_heads == layout.n_heads:
            return self
        if any(w.k_norm is not None and w.qk_norm_spans_heads for w in self.attention):
            raise UnsupportedArchitectureError("the per-head k/v graph needs per-head key norms; this model norms "
                                               "all key groups at once: use the grouped graph")
        group = torch.arange(layout.n_heads) // layout.heads_per_group

        def per_head(weights: AttentionWeights) -> AttentionWeights:
            index = group.to(weights.w_k.device)
            return replace(weights, w_k=weights.w_k.index_select(1, index), w_v=weights.w_v.index_select(1, index),
                           b_k=None if weights.b_k is None else weights.b_k.index_select(0, index),
                           b_v=None if weights.b_v is None else weights.b_v.index_select(0, index))

        other = copy.copy(self)
        other.layout = replace(layout, n_kv_heads=layout.n_heads, kv_ungrouped=True)
        other.attention = [per_head(weights) for weights in self.attention]
        return other

    # -- attention, shared by all families ----------------------------------
    def queries(self, layer: int, x: Tensor, ctx: RunContext, heads: Tensor | None = None) -> Tensor:
        """Queries [B, n', T, K] of the selected heads from reader inputs x [n|1, B, T, D]."""
        w = self.attention[layer]
        q = self._reader_projection(layer, x, w.w_q, w.b_q, heads, w.q_norm)
        return self._rope(q, ctx, layer)

    def keys(self, layer: int, x: Tensor, ctx: RunContext, groups: Tensor | None = None) -> Tensor:
        """Keys [B, n', T, K] of the selected key/value groups."""
        w = self.attention[layer]
        k = self._reader_projection(layer, x, w.w_k, w.b_k, groups, w.k_norm)
        return self._rope(k, ctx, layer)

    def values(self, layer: int, x: Tensor, ctx: RunContext, groups: Tensor | None = None) -> Tensor:
        """Values [B, n', T, K] of the selected key/value groups."""
        w = self.attention[layer]
        return self._reader_projection(layer, x, w.w_v, w.b_v, groups, None)

    def head_inputs(self, layer: int, x: Tensor, ctx: RunContext, heads: Tensor,
                    groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries of the selected heads and keys and values of the selected groups, [B, n', T, K] each, from
        reader inputs x [H' + 2G', B, T, D] (the heads' q readers, then the groups' k, then v) or one shared
        input [1, B, T, D]: as ``queries``, ``keys`` and ``values`` on the three parts. Where the layer's
        norm is an RMS norm, the per-reader inputs are normed and projected in one product (and x gets
        its gradient whole, not as three parts put together again)."""
        w = self.attention[layer]
        n_heads, n_groups = len(heads), len(groups)
        rms = None if x.shape[0] == 1 else self._rms_parameters(layer, x)
        spanning = w.qk_norm_spans_heads and (w.q_norm is not None or w.k_norm is not None)
        if rms is None or spanning:
            xq, xk, xv = (x, x, x) if x.shape[0] == 1 else x.split([n_heads, n_groups, n_groups])
            return self.queries(layer, xq, ctx, heads), self.keys(layer, xk, ctx, groups), \
                self.values(layer, xv, ctx, groups)
        weight = torch.cat([w.w_q.index_select(1, heads), w.w_k.index_select(1, groups),
                            w.w_v.index_select(1, groups)], dim=1)
        parts = ((w.b_q, heads), (w.b_k, groups), (w.b_v, groups))
        bias = None if all(b is None for b, _ in parts) else torch.cat(
            [weight.new_zeros(len(index), weight.shape[-1]) if b is None else b.index_select(0, index)
             for b, index in parts])
        q, k, v = rms_normed_projection(x, *rms, weight, bias).split([n_heads, n_groups, n_groups], dim=1)
        if w.q_norm is not None:
            q = w.q_norm(q)
        if w.k_norm is not None:
            k = w.k_norm(k)
        return self._rope(q, ctx, layer), self._rope(k, ctx, layer), v

    def _reader_projection(self, layer: int, x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor | None,
                           head_norm: Callable[[Tensor], Tensor] | None) -> Tensor:
        """The layer's norm of reader inputs x [n|1, B, T, D], projected onto the selected heads of ``weight``
        [D, H, K], then ``head_norm`` (a q/k norm): [B, n', T, K]. An RMS norm runs fused with the
        projection (``hap.models.normed``) where the readers have inputs of their own (or probed copies of
        one); one shared input, and any other norm, through the module, so that the plain run's logits stay
        Hugging Face's bit for bit."""
        w = self.attention[layer]
        rms = None if x.shape[0] == 1 else self._rms_parameters(layer, x)
        if rms is None or (head_norm is not None and w.qk_norm_spans_heads):
            return _normed_projection(w.norm(x), weight, bias, index, head_norm, w.qk_norm_spans_heads)
        if index is not None:
            weight = weight.index_select(1, index)
            bias = bias.index_select(0, index) if bias is not None else None
        out = rms_normed_projection(x, *rms, weight, bias)
        return head_norm(out) if head_norm is not None else out

    def _rms_parameters(self, layer: int, x: Tensor) -> tuple[Tensor, float] | None:
        """The gain and eps of the layer's attention norm if it is an RMS norm (see ``rms_parameters``),
        found once per layer, device and dtype."""
        key = (layer, x.device, x.dtype)
        if key not in self._rms_found:
            self._rms_found[key] = rms_parameters(self.attention[layer].norm, x.shape[-1], x.device, x.dtype)
        return self._rms_found[key]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: RunContext) -> Tensor:
        """Attention of each head: q, k, v [B, n, T, K] -> mixed values [B, n, T, K].

        Causal, unless ``ctx.attention_mask`` says which keys each query sees. k and v
        are already matched head by head (a group's k/v repeated for each of its heads).
        """
        w = self.attention[layer]
        mask = ctx.layer_masks[layer] if ctx.layer_masks is not None else ctx.attention_mask
        if w.softcap is not None:
            return _softcapped_attention(q, k, v, mask, w.scale, w.softcap)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=w.scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=w.scale)

    def attention_pattern(self, layer: int, q: Tensor, k: Tensor, ctx: RunContext) -> Tensor:
        """The weights [B, n, T, T] (query x key; at least float32) with which ``attend`` mixes the values of
        q, k [B, n, T, K]: the same scale, soft cap and mask. A query that may see no key (a padded row of
        a tracr model) gets all zeros."""
        w = self.attention[layer]
        dtype = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * w.scale
        if w.softcap is not None:
            scores = torch.tanh(scores / w.softcap) * w.softcap
        mask = ctx.layer_masks[layer] if ctx.layer_masks is not None else ctx.attention_mask
        if mask is None:
            length = q.shape[-2]
            mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return torch.nan_to_num(weights, nan=0.0)

    def head_outputs(self, layer: int, mixed: Tensor, heads: Tensor | None = None) -> Tensor:
        """Each selected head's share of the layer's output: [B, n, T, K] -> [n, B, T, D].

        Without a post-norm, the head's share of the output projection. With one (Gemma-2/3, OLMo-2), the
        layer writes RMSNorm(sum of the heads' projections): a head's output is then its projection times
        the layer's shared scale, gain / rms(sum), so the heads still sum to what the layer writes; that
        needs every head of the layer (``heads`` None or all of them)."""
        w = self.attention[layer]
        w_o = w.w_o if heads is None else w.w_o.index_select(1, heads)
        out = torch.einsum("bhtk,dhk->hbtd", mixed, w_o)
        if w.b_o_share is not None:
            out = out + w.b_o_share
        if w.post_norm is not None:
            if out.shape[0] != self.layout.n_heads:
                raise ValueError("a post-normed layer's heads share one scale: compute all of them together")
            out = rms_norm_shares(w.post_norm, out)
        return out

    def layer_output(self, layer: int, mixed: Tensor) -> Tensor:
        """The attention layer's summed output [B, T, D] from all heads' mixed values, computed by the
        module's own projection (bit-for-bit the Hugging Face residual update).

        A post-normed layer writes the sum of its heads' shares instead, so that what a reader reads is
        always the sum of what its sources wrote; Hugging Face computes those norms in float32 even in a
        float64 model, so the two agree to float32 rounding (about 1e-6 on the logits of a tiny model)."""
        w = self.attention[layer]
        if w.post_norm is not None:
            return self.head_outputs(layer, mixed).sum(0)
        batch, n_heads, length, width = mixed.shape
        return w.out_proj(mixed.transpose(1, 2).reshape(batch, length, n_heads * width))


def _normed_projection(x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor | None,
                       norm: Callable[[Tensor], Tensor] | None, spans_heads: bool) -> Tensor:
    """``_project`` followed by the q/k norm: per head ([..., K]), or over all heads' projections of
    the same input at once (OLMo-2's [..., H*K] norm; each input row is then projected onto every head,
    normed, and its own head kept)."""
    if norm is None or not spans_heads:
        out = _project(x, weight, bias, index)
        return norm(out) if norm is not None else out
    n_heads, width = weight.shape[1:]
    everyone = torch.einsum("nbtd,dhk->nbthk", x, weight)
    if bias is not None:
        everyone = everyone + bias
    everyone = norm(everyone.flatten(-2)).unflatten(-1, (n_heads, width)).permute(0, 1, 3, 2, 4)  # [n, B, H, T, K]
    if x.shape[0] == 1:
        return everyone[0] if index is None else everyone[0].index_select(1, index)
    rows = torch.arange(x.shape[0], device=x.device)
    return everyone[rows, :, rows if index is None else index].transpose(0, 1)


def _softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, cap: float) -> Tensor:
    """Attention whose scores are soft-capped before the softmax, as Gemma-2 computes it (softmax in float32)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        length = q.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def rms_norm_shares(norm: torch.nn.Module, parts: Tensor) -> Tensor:
    """Split RMSNorm(sum of ``parts``) [n, ..., D] into one share per part: gain * part / rms(sum).

    The shares sum to the norm of the sum. ``gain`` is read off the module itself (its output on a
    vector of ones times sqrt(1 + eps)), so Gemma's (1 + w) and the plain w norms are both covered."""
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", None)))
    total = parts.sum(0)
    width = total.shape[-1]
    ones = torch.ones(width, dtype=total.dtype, device=total.device)
    gain = norm(ones) * (1 + eps) ** 0.5
    scale = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)
    return parts * scale * gain

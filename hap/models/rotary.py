"""Rotary decoder adapter: every Hugging Face family built from RoPE attention, an MLP and norms.

Covers ``llama`` (SmolLM2, Llama 2/3), ``qwen2``, ``mistral``, ``qwen3``, ``gemma`` (1), ``gemma2``,
``gemma3_text``, ``phi3``, ``starcoder2``, ``olmo2``, ``gpt_neox`` (Pythia) and ``phi`` (Phi-1/2) checkpoints,
by structural feature rather than by family. A family is a ``Wiring``: where its layer keeps its norms,
whether attention and MLP run side by side, what its parts are called. The rest are features read off
the modules themselves:

* sliding-window attention (Mistral and StarCoder2 in every layer when ``sliding_window`` is set;
  Qwen2/Qwen3/Gemma-2/Gemma-3 ``layer_types`` with ``sliding_attention`` layers): those layers' queries
  see the last ``sliding_window`` keys up to themselves, as the module's own masks;
* q/k norms applied by the query and key readers to their projected vectors, before RoPE: per head
  (Qwen3 and Gemma-3 ``q_norm``/``k_norm``, Phi's ``q_layernorm``), or over all heads' projections at
  once (OLMo-2: each head's query is then its own slice of the normed projection of its own input);
* fused projections viewed per head: Phi-3's ``qkv_proj`` (query rows, then key, then value rows),
  GPT-NeoX's ``query_key_value`` (per head: its query, key and value rows); Phi-3's fused gate-up MLP
  is its own module; partial rotary embeddings turn the first dimensions of each head;
* Gemma's differences live in its own modules, which the adapter calls: the embedding scaled by
  sqrt(d_model) (``input`` is the scaled embedding), the (1 + w) RMSNorm, the GeGLU MLP; Gemma-2's
  attention scores are soft-capped (``attn_logit_softcapping``) and its logits too
  (``final_logit_softcapping``); its query scale is the module's (``query_pre_attn_scalar``); Gemma-3
  turns local and global layers with their own rotary frequencies.

Residual decomposition
----------------------
* ``input`` = the model's input embedding of the ids; there are no learned positions, so the source
  is the token embedding alone. RoPE is applied by the query and key readers to their projected
  vectors, so positions never sit in the residual.
* ``a{l}.h{h}`` = softmax(q_h k_g^T) v_g @ W_O[:, h], plus the output bias / H when the checkpoint has
  one; the heads of a layer sum to the layer's attention output exactly. **Post-normed layers**
  (Gemma-2/3 ``post_attention_layernorm``, OLMo-2's): the layer writes RMSNorm(sum of the heads), so a
  head's output is the *normed* value, its projection times the layer's shared gain / rms(sum); the
  heads of such a layer are computed together (``Layout.heads_normed_together``).
* q/k/v biases stay inside the reader's projection: they are applied after the reader's norm, so they
  belong to the reader, not to any source.
* ``m{l}`` = ``mlp(mlp_norm(x))``, then the MLP's post-norm where the family has one (Gemma-2/3's
  ``post_feedforward_layernorm``, OLMo-2's): the source's output is the normed value. MLP biases
  (``mlp_bias``, StarCoder2, GPT-NeoX, Phi) stay inside the MLP source's output, as the module computes it.
* Norms: every reader applies its own block's pre-norm to its own input sum (q, k and v readers of a
  layer all use the attention norm; ``m{l}`` the MLP norm, which for Phi is the same ``input_layernorm``;
  ``logits`` the final norm). LayerNorm biases (StarCoder2, GPT-NeoX, Phi) belong to the reader. OLMo-2
  has no pre-norms: its readers read the residual itself.
* Parallel attention and MLP (GPT-NeoX with ``use_parallel_residual``, Phi): the MLP of layer l reads
  the residual from before layer l's attention, so the graph has no edge from layer l's heads to
  ``m{l}`` (``Layout.parallel_attn_mlp``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import UnsupportedArchitectureError
from .adapter import AttentionWeights, Layout, ModelAdapter, RunContext

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Wiring:
    """Where one family's decoder layer keeps its parts (attribute names; None: the family has no such norm)."""

    layers: str = "layers"
    attention: str = "self_attn"
    out_proj: str = "o_proj"
    attn_norm: str | None = "input_layernorm"  # read by the q/k/v readers
    attn_post_norm: str | None = None  # applied to the attention output before the residual
    mlp_norm: str | None = "post_attention_layernorm"
    mlp_post_norm: str | None = None
    final_norm: str = "norm"
    parallel: bool = False  # the MLP reads the residual beside the attention, not after it


_PRE_NORM = Wiring()
_GEMMA2 = Wiring(attn_post_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                 mlp_post_norm="post_feedforward_layernorm")
WIRINGS: dict[str, Wiring] = {
    **{kind: _PRE_NORM for kind in ("llama", "qwen2", "mistral", "qwen3", "gemma", "phi3", "starcoder2")},
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "olmo2": Wiring(attn_norm=None, attn_post_norm="post_attention_layernorm", mlp_norm=None,
                    mlp_post_norm="post_feedforward_layernorm"),
    "gpt_neox": Wiring(attention="attention", out_proj="dense", final_norm="final_layer_norm", parallel=True),
    "phi": Wiring(out_proj="dense", mlp_norm="input_layernorm", final_norm="final_layernorm", parallel=True),
    "falcon": Wiring(layers="h", attention="self_attention", out_proj="dense", mlp_norm="input_layernorm",
                     final_norm="ln_f", parallel=True),
}
ROTARY_MODEL_TYPES = tuple(WIRINGS)
_SLIDING_IN_EVERY_LAYER = ("mistral", "phi3", "starcoder2")  # these slide in every layer when the window is set


def wiring_for(config: PretrainedConfig) -> Wiring:
    """The family's wiring; GPT-NeoX runs attention and MLP side by side only with ``use_parallel_residual``."""
    wiring = WIRINGS[config.model_type]
    if config.model_type == "gpt_neox":
        wiring = replace(wiring, parallel=bool(config.use_parallel_residual))
    if config.model_type == "falcon":
        if config.alibi:
            raise UnsupportedArchitectureError(
                "this Falcon checkpoint uses ALiBi positions (a per-head bias on attention scores), which the rotary "
                "adapter does not model; Falcon checkpoints with rotary positions (Falcon-7B/40B/180B) are supported")
        if config.new_decoder_architecture:  # Falcon-40B/180B: attention and MLP side by side, own norms or one
            two_norms = config.num_ln_in_parallel_attn in (None, 2)
            wiring = replace(wiring, attn_norm="ln_attn" if two_norms else "input_layernorm",
                             mlp_norm="ln_mlp" if two_norms else "input_layernorm")
        elif not config.parallel_attn:
            wiring = replace(wiring, mlp_norm="post_attention_layernorm", parallel=False)
    return wiring


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window (None: full causal attention), as the Hugging Face module masks it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise UnsupportedArchitectureError(
                f"{config.model_type} checkpoint has {', '.join(unknown)} layers, which the rotary adapter does not "
                "model (it models full and sliding-window attention)")
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    if config.model_type in _SLIDING_IN_EVERY_LAYER and window is not None:
        return [window] * config.num_hidden_layers
    return [None] * config.num_hidden_layers


def _qkv_views(attn: torch.nn.Module, n_heads: int, n_kv: int, head_dim: int, d_model: int) -> dict[str, Tensor | None]:
    """w_q [D, H, K], w_k/w_v [D, G, K] and their biases [H|G, K], as views of separate q/k/v projections, of
    Phi-3's fused ``qkv_proj`` (rows: the H query heads, then the G key groups, then the G value groups) or of
    GPT-NeoX's ``query_key_value`` (rows: for each head, its query, key and value)."""
    if hasattr(attn, "query_key_value"):
        weight, bias = attn.query_key_value.weight, attn.query_key_value.bias
        if getattr(attn, "new_decoder_architecture", False):  # Falcon-40B: per group, its queries, key, value
            shape = (n_kv, n_heads // n_kv + 2, head_dim)
            # A group's queries are not one stride away from the next group's: the query weights are a copy.
            pick = {"q": lambda t: t[:, :-2].reshape(n_heads, *t.shape[2:]), "k": lambda t: t[:, -2],
                    "v": lambda t: t[:, -1]}
        elif getattr(attn, "multi_query", False):  # Falcon-7B: all queries, then the one key and value
            shape = (n_heads + 2, head_dim)
            pick = {"q": lambda t: t[:n_heads], "k": lambda t: t[n_heads:-1], "v": lambda t: t[-1:]}
        else:  # GPT-NeoX and older Falcon: per head, its query, key and value
            shape = (n_heads, 3, head_dim)
            pick = {name: (lambda t, i=i: t[:, i]) for i, name in enumerate("qkv")}
        rows, row_bias = weight.view(*shape, d_model), None if bias is None else bias.view(shape)
        return {**{f"w_{name}": part(rows).permute(2, 0, 1) for name, part in pick.items()},
                **{f"b_{name}": None if bias is None else part(row_bias) for name, part in pick.items()}}
    if hasattr(attn, "qkv_proj"):
        weight, bias = attn.qkv_proj.weight, attn.qkv_proj.bias
        cuts = (0, n_heads * head_dim, (n_heads + n_kv) * head_dim, (n_heads + 2 * n_kv) * head_dim)
        parts = {name: (weight[start:stop], None if bias is None else bias[start:stop], n)
                 for name, start, stop, n in zip("qkv", cuts, cuts[1:], (n_heads, n_kv, n_kv))}
    else:
        parts = {name: (proj.weight, proj.bias, n)
                 for name, proj, n in zip("qkv", (attn.q_proj, attn.k_proj, attn.v_proj), (n_heads, n_kv, n_kv))}
    views: dict[str, Tensor | None] = {}
    for name, (weight, bias, n) in parts.items():
        # nn.Linear weights are [out, in]; view them as [in, heads, head_dim].
        views[f"w_{name}"] = weight.view(n, head_dim, d_model).permute(2, 0, 1)
        views[f"b_{name}"] = None if bias is None else bias.view(n, head_dim)
    return views


def _qk_norms(attn: torch.nn.Module, n_heads: int, n_kv: int, head_dim: int) -> dict:
    """The module's q/k norms and whether they span all heads (OLMo-2) or act per head (Qwen3, Gemma-3, Phi)."""
    q_norm = getattr(attn, "q_norm", None) or getattr(attn, "q_layernorm", None)
    k_norm = getattr(attn, "k_norm", None) or getattr(attn, "k_layernorm", None)
    if q_norm is None:
        return {}
    width = q_norm.weight.numel()
    if width not in (head_dim, n_heads * head_dim):
        raise UnsupportedArchitectureError(f"q norm of width {width} is neither per head ({head_dim}) nor over all "
                                           f"{n_heads} heads ({n_heads * head_dim})")
    return {"q_norm": q_norm, "k_norm": k_norm, "qk_norm_spans_heads": width != head_dim}


def _identity(x: Tensor) -> Tensor:
    return x


class RotaryAdapter(ModelAdapter):
    """Adapter for the rotary decoder families (see the module docstring)."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__(hf_model)
        config = hf_model.config
        self.wiring = wiring = wiring_for(config)
        self.windows = layer_windows(config)
        self.body = body = hf_model.base_model
        self.layers = layers = getattr(body, wiring.layers)
        n_heads = config.num_attention_heads
        # Falcon says it per attention module (1 for multi-query); the others in the config.
        n_kv = (getattr(getattr(layers[0], wiring.attention), "num_kv_heads", None)
                or getattr(config, "num_key_value_heads", None) or n_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        d_model = config.hidden_size
        self.layout = Layout(
            family=config.model_type,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            d_model=d_model,
            head_dim=head_dim,
            vocab_size=hf_model.get_output_embeddings().out_features,
            parallel_attn_mlp=wiring.parallel,
            heads_normed_together=wiring.attn_post_norm is not None,
        )
        self.attention = []
        for block in layers:
            attn = getattr(block, wiring.attention)
            out_proj = getattr(attn, wiring.out_proj)
            self.attention.append(
                AttentionWeights(
                    norm=getattr(block, wiring.attn_norm) if wiring.attn_norm else _identity,
                    out_proj=out_proj,
                    **_qkv_views(attn, n_heads, n_kv, head_dim, d_model),
                    w_o=out_proj.weight.view(d_model, n_heads, head_dim),
                    b_o_share=None if out_proj.bias is None else out_proj.bias / n_heads,
                    scale=float(getattr(attn, "scaling", head_dim ** -0.5)),  # Falcon: the SDPA default
                    **_qk_norms(attn, n_heads, n_kv, head_dim),
                    post_norm=getattr(block, wiring.attn_post_norm) if wiring.attn_post_norm else None,
                    softcap=getattr(attn, "attn_logit_softcapping", None),
                )
            )
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        # The model's own rotate_half, so RoPE is exactly the module's.
        attention_module = getattr(layers[0], wiring.attention)
        self._rotate_half = importlib.import_module(type(attention_module).__module__).rotate_half
        # Gemma-3 turns each layer type with its own frequencies: the rotary module takes the layer type.
        self._rope_per_layer_type = "layer_type" in inspect.signature(body.rotary_emb.forward).parameters

    def prepare(self, input_ids: Tensor) -> RunContext:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        probe = self.hf_model.get_input_embeddings().weight[:1]  # dtype/device carrier for the rotary module
        rope, layer_rope = None, None
        if self._rope_per_layer_type:
            types = self.hf_model.config.layer_types
            turned = {kind: self.body.rotary_emb(probe, positions, kind) for kind in set(types)}
            layer_rope = tuple((turned[kind][0][:, None], turned[kind][1][:, None]) for kind in types)
        else:
            cos, sin = self.body.rotary_emb(probe, positions)
            rope = (cos[:, None], sin[:, None])
        layer_masks = None
        if any(window is not None for window in self.windows):
            query, key = positions[0][:, None], positions[0][None, :]
            masks = {window: ((key <= query) & (key > query - window))[None, None]
                     for window in set(self.windows) if window is not None}
            layer_masks = tuple(None if window is None else masks[window] for window in self.windows)
        return RunContext(input_ids=input_ids, rope=rope, layer_masks=layer_masks, layer_rope=layer_rope)

    def _rope(self, x: Tensor, ctx: RunContext, layer: int) -> Tensor:
        cos, sin = ctx.layer_rope[layer] if ctx.layer_rope is not None else ctx.rope
        rotary = cos.shape[-1]
        if rotary < x.shape[-1]:  # partial rotary (Phi-3, GPT-NeoX, Phi): the rest of each head passes through
            turned = x[..., :rotary]
            return torch.cat([turned * cos + self._rotate_half(turned) * sin, x[..., rotary:]], dim=-1)
        return x * cos + self._rotate_half(x) * sin

    def embed(self, ctx: RunContext) -> Tensor:
        return self.hf_model.get_input_embeddings()(ctx.input_ids)

    def embed_device(self) -> torch.device:
        return self.hf_model.get_input_embeddings().weight.device

    def mlp_device(self, layer: int) -> torch.device:
        return next(self.layers[layer].mlp.parameters()).device

    def unembed_device(self) -> torch.device:
        return self.hf_model.get_output_embeddings().weight.device

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block, wiring = self.layers[layer], self.wiring
        out = block.mlp(getattr(block, wiring.mlp_norm)(x) if wiring.mlp_norm else x)
        return getattr(block, wiring.mlp_post_norm)(out) if wiring.mlp_post_norm else out

    def unembed(self, x: Tensor) -> Tensor:
        return self.logits_from_normed(self.final_norm()(x))

    def final_norm(self) -> torch.nn.Module:
        return getattr(self.body, self.wiring.final_norm)

    def logits_from_normed(self, y: Tensor) -> Tensor:
        logits = self.hf_model.get_output_embeddings()(y)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

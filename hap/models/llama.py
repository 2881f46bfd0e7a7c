"""Llama-style adapter: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.

Covers Hugging Face ``llama`` (SmolLM2, Llama 2/3), ``qwen2``, ``mistral``, ``qwen3``, ``gemma``
(Gemma 1) and ``phi3`` checkpoints, by feature rather than by family:

* sliding-window attention (Mistral's ``sliding_window``; Qwen2/Qwen3 ``layer_types`` with
  ``sliding_attention`` layers): those layers' queries see the last ``sliding_window`` keys up to
  themselves, the rest are causal, as the module's own masks;
* per-head query/key norms (Qwen3's ``q_norm``/``k_norm``, RMSNorm over the head width): applied by
  the query and key readers to their projected vectors, before RoPE, as the module does;
* Phi-3's fused ``qkv_proj`` is viewed per head (query rows, then key, then value rows); its fused
  gate-up MLP is its own module; partial rotary embeddings turn the first dimensions of each head;
* Gemma 1's differences all live in its own modules, which the adapter calls: the embedding scaled
  by sqrt(d_model) (``input`` is the scaled embedding), the (1 + w) RMSNorm, the GeGLU MLP.

Residual decomposition
----------------------
* ``input`` = ``embed_tokens(ids)``; there are no learned positions, so the
  source is the token embedding alone. RoPE is applied by the query and key
  readers to their projected vectors, so positions never sit in the residual.
* ``a{l}.h{h}`` = softmax(q_h k_g^T) v_g @ W_O[:, h], plus ``o_proj.bias / H``
  when the checkpoint has one (Llama with ``attention_bias``); the heads of a
  layer sum to the layer's attention output exactly.
* q/k/v biases (Qwen2) stay inside the reader's projection: they are applied
  after the reader's RMSNorm, so they belong to the reader, not to any source.
* ``m{l}`` = ``mlp(post_attention_layernorm(x))``; SwiGLU has no bias here
  (``mlp_bias`` checkpoints keep their down-projection bias inside the MLP
  source's output, as the module computes it).
* Norms: every reader applies its own block's RMSNorm to its own input sum
  (q, k and v readers of a layer all use ``input_layernorm``; ``m{l}`` uses
  ``post_attention_layernorm``; ``logits`` uses the final ``norm``).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ..errors import UnsupportedArchitectureError
from .adapter import AttentionWeights, Layout, ModelAdapter, RunContext

LLAMA_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3", "gemma", "phi3")


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full causal attention), as the Hugging Face module masks it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise UnsupportedArchitectureError(
                f"{config.model_type} checkpoint has {', '.join(unknown)} layers, which the Llama adapter does not "
                "model (it models full and sliding-window attention)")
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    if config.model_type in ("mistral", "phi3") and window is not None:
        return [window] * config.num_hidden_layers  # these slide in every layer when the window is set
    return [None] * config.num_hidden_layers


def _qkv_views(attn: torch.nn.Module, n_heads: int, n_kv: int, head_dim: int, d_model: int) -> dict[str, Tensor | None]:
    """w_q [D, H, K], w_k/w_v [D, G, K] and their biases [H|G, K], as views of separate q/k/v projections or
    of Phi-3's fused ``qkv_proj`` (rows: the H query heads, then the G key groups, then the G value groups)."""
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


class LlamaAdapter(ModelAdapter):
    """Adapter for ``LlamaForCausalLM``-shaped models (see the module docstring)."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__(hf_model)
        config = hf_model.config
        self.windows = layer_windows(config)
        body = hf_model.model
        n_heads = config.num_attention_heads
        n_kv = config.num_key_value_heads or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        d_model = config.hidden_size
        self.layout = Layout(
            family="llama",
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            d_model=d_model,
            head_dim=head_dim,
            vocab_size=hf_model.lm_head.out_features,
        )
        self.attention = []
        for block in body.layers:
            attn = block.self_attn
            self.attention.append(
                AttentionWeights(
                    norm=block.input_layernorm,
                    out_proj=attn.o_proj,
                    # nn.Linear weights are [out, in]; view them as [in, heads, head_dim].
                    **_qkv_views(attn, n_heads, n_kv, head_dim, d_model),
                    w_o=attn.o_proj.weight.view(d_model, n_heads, head_dim),
                    b_o_share=None if attn.o_proj.bias is None else attn.o_proj.bias / n_heads,
                    scale=float(attn.scaling),
                    q_norm=getattr(attn, "q_norm", None),
                    k_norm=getattr(attn, "k_norm", None),
                )
            )
        # The model's own rotate_half, so RoPE is exactly the module's.
        self._rotate_half = importlib.import_module(type(body.layers[0].self_attn).__module__).rotate_half

    def prepare(self, input_ids: Tensor) -> RunContext:
        body = self.hf_model.model
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        probe = body.embed_tokens.weight[:1]  # dtype/device carrier for the rotary module
        cos, sin = body.rotary_emb(probe, positions)
        layer_masks = None
        if any(window is not None for window in self.windows):
            query, key = positions[0][:, None], positions[0][None, :]
            masks = {window: ((key <= query) & (key > query - window))[None, None]
                     for window in set(self.windows) if window is not None}
            layer_masks = tuple(None if window is None else masks[window] for window in self.windows)
        return RunContext(input_ids=input_ids, rope=(cos[:, None], sin[:, None]), layer_masks=layer_masks)

    def _rope(self, x: Tensor, ctx: RunContext) -> Tensor:
        cos, sin = ctx.rope
        rotary = cos.shape[-1]
        if rotary < x.shape[-1]:  # partial rotary (Phi-3 with partial_rotary_factor < 1): the rest passes through
            turned = x[..., :rotary]
            return torch.cat([turned * cos + self._rotate_half(turned) * sin, x[..., rotary:]], dim=-1)
        return x * cos + self._rotate_half(x) * sin

    def embed(self, ctx: RunContext) -> Tensor:
        return self.hf_model.model.embed_tokens(ctx.input_ids)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.hf_model.model.layers[layer]
        return block.mlp(block.post_attention_layernorm(x))

    def unembed(self, x: Tensor) -> Tensor:
        return self.hf_model.lm_head(self.hf_model.model.norm(x))

"""GPT-2 adapter: LayerNorm, learned positions, GELU MLP, multi-head attention.

Residual decomposition
----------------------
* ``input`` = ``wte(ids) + wpe(positions)``: token and position embeddings are
  one source, as in EAP-IG and MIB.
* ``a{l}.h{h}`` = softmax(q_h k_h^T) v_h @ W_O[h] plus ``c_proj.bias / H``: the
  output bias is shared equally by the layer's heads, so the heads sum to the
  attention output exactly. The value bias needs no special care: attention
  weights sum to one, so it reaches the output through W_O inside the head.
* q/k/v biases (``c_attn.bias``) are applied after the reader's LayerNorm, so
  they belong to the reader's projection.
* ``m{l}`` = ``mlp(ln_2(x))`` including both MLP biases (``c_proj.bias`` is
  the MLP source's own).
* Norms: each reader applies its own LayerNorm (q/k/v: ``ln_1``; ``m{l}``:
  ``ln_2``; ``logits``: ``ln_f``) to its own input sum. LayerNorm's affine
  bias is part of the reader, not of the residual.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adapter import AttentionWeights, Layout, ModelAdapter, RunContext

GPT2_MODEL_TYPES = ("gpt2",)


class GPT2Adapter(ModelAdapter):
    """Adapter for ``GPT2LMHeadModel`` (see the module docstring)."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__(hf_model)
        config = hf_model.config
        n_heads, d_model = config.n_head, config.n_embd
        head_dim = d_model // n_heads
        self.layout = Layout(
            family="gpt2",
            n_layers=config.n_layer,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_model=d_model,
            head_dim=head_dim,
            vocab_size=hf_model.lm_head.out_features,
        )
        self.attention = []
        for block in hf_model.transformer.h:
            attn = block.attn
            # Conv1D weights are [in, out]; c_attn's out is [q | k | v].
            w_qkv = attn.c_attn.weight.unflatten(1, (3, n_heads, head_dim))
            b_qkv = attn.c_attn.bias.view(3, n_heads, head_dim)
            self.attention.append(
                AttentionWeights(
                    norm=block.ln_1,
                    out_proj=attn.c_proj,
                    w_q=w_qkv[:, 0],
                    w_k=w_qkv[:, 1],
                    w_v=w_qkv[:, 2],
                    w_o=attn.c_proj.weight.view(n_heads, head_dim, d_model).permute(2, 0, 1),
                    b_q=b_qkv[0],
                    b_k=b_qkv[1],
                    b_v=b_qkv[2],
                    b_o_share=attn.c_proj.bias / n_heads,
                    scale=float(attn.scaling),
                )
            )

    def prepare(self, input_ids: Tensor) -> RunContext:
        return RunContext(input_ids=input_ids)

    def embed(self, ctx: RunContext) -> Tensor:
        body = self.hf_model.transformer
        positions = torch.arange(ctx.input_ids.shape[1], device=ctx.input_ids.device)
        return body.wte(ctx.input_ids) + body.wpe(positions)[None]

    def embed_device(self) -> torch.device:
        return self.hf_model.transformer.wte.weight.device

    def mlp_device(self, layer: int) -> torch.device:
        return self.hf_model.transformer.h[layer].mlp.c_fc.weight.device

    def unembed_device(self) -> torch.device:
        return self.hf_model.lm_head.weight.device

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self.hf_model.transformer.h[layer]
        return block.mlp(block.ln_2(x))

    def unembed(self, x: Tensor) -> Tensor:
        return self.hf_model.lm_head(self.hf_model.transformer.ln_f(x))

    def final_norm(self) -> torch.nn.Module:
        return self.hf_model.transformer.ln_f

    def logits_from_normed(self, y: Tensor) -> Tensor:
        return self.hf_model.lm_head(y)

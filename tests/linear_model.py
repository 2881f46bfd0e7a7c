"""A model whose logits are linear in every activation: EAP is exact on it.

Built as a ``ModelAdapter`` subclass with random weights: no norms, attention
replaced by a fixed causal average of the values plus linear terms in q and k,
a linear MLP and a linear unembedding. Used to check attribution against
one-edge-at-a-time patching.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

import hap
from hap.ablation import trace
from hap.models.adapter import AttentionWeights, Layout, ModelAdapter, RunContext
from hap.models.tiny import tiny_tokenizer


class LinearAdapter(ModelAdapter):
    def __init__(self, module: torch.nn.Module, layout: Layout) -> None:
        super().__init__(module)
        self.layout = layout
        self.attention = []
        for layer in range(layout.n_layers):
            w_o = getattr(module, f"w_o{layer}")
            self.attention.append(AttentionWeights(
                norm=lambda x: x,
                out_proj=lambda mixed, w_o=w_o: torch.einsum("btk,dk->btd", mixed, w_o.flatten(1)),
                w_q=getattr(module, f"w_q{layer}"), w_k=getattr(module, f"w_k{layer}"),
                w_v=getattr(module, f"w_v{layer}"), w_o=w_o,
                b_q=None, b_k=None, b_v=None, b_o_share=None, scale=1.0,
            ))

    def prepare(self, input_ids: Tensor) -> RunContext:
        return RunContext(input_ids=input_ids)

    def embed(self, ctx: RunContext) -> Tensor:
        return self.hf_model.embedding[ctx.input_ids]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, ctx: RunContext) -> Tensor:
        length = v.shape[2]
        causal_mean = torch.tril(torch.ones(length, length, dtype=v.dtype)) / torch.arange(1, length + 1)[:, None]
        return torch.einsum("ts,bhsk->bhtk", causal_mean, v) + 0.5 * q + 0.25 * k

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        return x @ getattr(self.hf_model, f"w_mlp{layer}")

    def unembed(self, x: Tensor) -> Tensor:
        return x @ self.hf_model.unembedding


class _LinearModule(torch.nn.Module):
    def __init__(self, layout: Layout, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        d, h, g, k, v = layout.d_model, layout.n_heads, layout.n_kv_heads, layout.head_dim, layout.vocab_size

        def weight(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=generator, dtype=torch.float64) / shape[0] ** 0.5,
                                      requires_grad=False)

        self.embedding = weight(v, d)
        self.unembedding = weight(d, v)
        for layer in range(layout.n_layers):
            setattr(self, f"w_q{layer}", weight(d, h, k))
            setattr(self, f"w_k{layer}", weight(d, g, k))
            setattr(self, f"w_v{layer}", weight(d, g, k))
            setattr(self, f"w_o{layer}", weight(d, h, k))
            setattr(self, f"w_mlp{layer}", weight(d, d))
        self.owner: hap.Model | None = None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=trace(self.owner, input_ids).logits)


def linear_model(seed: int = 0) -> hap.Model:
    """A float64 linear model over the tiny tokenizer (2 layers, 4 heads in 2 groups)."""
    tokenizer = tiny_tokenizer()
    layout = Layout(family="linear", n_layers=2, n_heads=4, n_kv_heads=2, d_model=16, head_dim=4,
                    vocab_size=len(tokenizer))
    module = _LinearModule(layout, seed)
    model = hap.Model("linear", module, tokenizer, LinearAdapter(module, layout), "built-in")
    module.owner = model
    return model

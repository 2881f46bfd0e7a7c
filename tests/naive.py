"""Slow, obviously-correct twins of the fast paths, used only by the tests.

``naive_masked_logits`` forms every reader's input literally as
sum_s m[s, r] * z_s + (1 - m[s, r]) * z~_s over the real edges (so a parallel
MLP never reads its own layer's heads), one source at a time, and runs each
head on its own. It shares only the adapter's blocks (checked against Hugging
Face separately) with the library.
"""

from __future__ import annotations

import torch

import hap


def naive_masked_logits(
    model: hap.Model, graph: hap.Graph, ids: torch.Tensor, ablated: torch.Tensor, mask: torch.Tensor,
    kv_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B, T, V]; ``ablated`` z~ [S, B|1, T, D]; ``mask`` [S, R] or [B, S, R]. With ``kv_mask``
    [S, L, H, 2] (k, v), each query head reads its *own* copy of its group's key and value inputs, edge
    (s -> head h's k or v) weighted by ``kv_mask`` instead of the group's entry of ``mask``."""
    adapter = model.adapter
    layout = model.layout
    ctx = adapter.prepare(ids)
    outputs: dict[int, torch.Tensor] = {0: adapter.embed(ctx)}

    def reader_input(reader: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        total = torch.zeros_like(outputs[0])
        for source in range(graph.n_sources):
            if not graph.real[source, reader]:
                continue
            m = mask[..., source, reader] if weights is None else weights[source]
            m = m.reshape(-1, 1, 1) if m.dim() == 1 else m
            total = total + m * outputs[source] + (1 - m) * ablated[source]
        return total

    def own(layer: int, head: int, port: int) -> torch.Tensor | None:
        return None if kv_mask is None else kv_mask[:, layer, head, port]

    for layer in range(layout.n_layers):
        readers = graph.readers_of_block(2 * layer + 1)
        sources = graph.sources_of_block(2 * layer + 1)
        mixed = []
        for head in range(layout.n_heads):
            group = head // layout.heads_per_group
            one_head, one_group = torch.tensor([head]), torch.tensor([group])
            q = adapter.queries(layer, reader_input(readers.start + head)[None], ctx, one_head)
            k_reader = readers.start + layout.n_heads + group
            v_reader = readers.start + layout.n_heads + layout.n_kv_heads + group
            k = adapter.keys(layer, reader_input(k_reader, own(layer, head, 0))[None], ctx, one_group)
            v = adapter.values(layer, reader_input(v_reader, own(layer, head, 1))[None], ctx, one_group)
            mixed.append(adapter.attend(layer, q, k, v, ctx))
        # Each head attends on its own inputs; the projection back is per head, except that a post-normed
        # layer (Gemma-2/3, OLMo-2) scales all its heads by the norm of their sum.
        heads = adapter.head_outputs(layer, torch.cat(mixed, dim=1))
        for head in range(layout.n_heads):
            outputs[sources.start + head] = heads[head]
        mlp_source = graph.sources_of_block(2 * layer + 2).start
        mlp_reader = graph.readers_of_block(2 * layer + 2).start
        outputs[mlp_source] = adapter.mlp(layer, reader_input(mlp_reader))
    return adapter.unembed(reader_input(graph.n_readers - 1))


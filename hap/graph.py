"""The edge graph: sources x readers as tensors, with MIB / EAP-IG names.

Everything the forward pass computes is cut into *blocks*, numbered in order:
block 0 is the embedding, block 2l+1 is attention layer l, block 2l+2 is MLP
layer l, block 2L+1 is the unembedding. A source is written by one block and a
reader is read by one block; the edge (s -> r) is real exactly when the source's
block comes before the reader's. That one rule gives every count in
REFERENCE.md (GPT-2 small: 157 sources, 445 readers, 32,491 edges). Where
attention and MLP run side by side (``Layout.parallel_attn_mlp``: GPT-NeoX,
Phi-2), MLP l reads the residual from before attention l, so the edges from
layer l's heads to ``m{l}`` are not real (Pythia-160M: 32,347 edges).

Order inside an attention block: readers are the H query inputs, then the G key
inputs, then the G value inputs; sources are the H heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from .models.adapter import Layout


class HasLayout(Protocol):
    """A loaded ``hap.Model``, or anything else that carries a model's ``Layout``."""

    @property
    def layout(self) -> Layout: ...


def _source_names(layout: Layout) -> list[str]:
    names = ["input"]
    for layer in range(layout.n_layers):
        names += [f"a{layer}.h{head}" for head in range(layout.n_heads)]
        names.append(f"m{layer}")
    return names


def _reader_names(layout: Layout) -> list[str]:
    # With grouped-query attention the k/v readers belong to a group, not a head.
    kv = "g" if layout.n_kv_heads < layout.n_heads else "h"
    names = []
    for layer in range(layout.n_layers):
        names += [f"a{layer}.h{head}<q>" for head in range(layout.n_heads)]
        names += [f"a{layer}.{kv}{group}<k>" for group in range(layout.n_kv_heads)]
        names += [f"a{layer}.{kv}{group}<v>" for group in range(layout.n_kv_heads)]
        names.append(f"m{layer}")
    names.append("logits")
    return names


def node_kind_and_layer(name: str) -> tuple[str, int]:
    """``"a9.h3"`` -> ("head", 9); ``"m5"`` -> ("mlp", 5)."""
    if name.startswith("m"):
        return "mlp", int(name[1:])
    return "head", int(name[1:].split(".")[0])


def reader_kind(name: str) -> str:
    """The input a reader is: ``"q"``, ``"k"``, ``"v"`` (``a4.h2<q>``), ``"mlp"`` (``m5``) or ``"logits"``."""
    if name == "logits":
        return "logits"
    return name[-2] if name.endswith(">") else "mlp"


@dataclass
class Graph:
    """Tensor-backed edge graph of one model shape.

    ``real`` [S, R] marks the edges that exist; ``scores`` [S, R] and
    ``in_graph`` [S, R] are what methods fill in (zero / False off ``real``).
    Names follow EAP-IG and MIB: sources ``input``, ``a3.h1``, ``m5``; readers
    ``a4.h2<q>``, ``a4.g0<k>`` (``a4.h0<k>`` without GQA), ``m5``, ``logits``;
    edges ``a3.h1->m5``.
    """

    layout: Layout
    source_names: list[str]
    reader_names: list[str]
    source_block: Tensor
    reader_block: Tensor
    real: Tensor
    scores: Tensor = field(repr=False)
    in_graph: Tensor = field(repr=False)
    _source_lookup: dict[str, int] = field(init=False, repr=False, compare=False)
    _reader_lookup: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._source_lookup = {name: i for i, name in enumerate(self.source_names)}
        self._reader_lookup = {name: i for i, name in enumerate(self.reader_names)}

    @classmethod
    def from_layout(cls, layout: Layout) -> Graph:
        """The full graph of a model shape, all real edges in the graph, scores zero."""
        n, h, g = layout.n_layers, layout.n_heads, layout.n_kv_heads
        source_block = [0]
        reader_block = []
        for layer in range(n):
            source_block += [2 * layer + 1] * h + [2 * layer + 2]
            reader_block += [2 * layer + 1] * (h + 2 * g) + [2 * layer + 2]
        reader_block.append(2 * n + 1)
        source_block_t = torch.tensor(source_block)
        reader_block_t = torch.tensor(reader_block)
        real = source_block_t[:, None] < reader_block_t[None, :]
        if layout.parallel_attn_mlp:
            real &= ~((reader_block_t[None, :] % 2 == 0) & (source_block_t[:, None] == reader_block_t[None, :] - 1))
        return cls(
            layout=layout,
            source_names=_source_names(layout),
            reader_names=_reader_names(layout),
            source_block=source_block_t,
            reader_block=reader_block_t,
            real=real,
            scores=torch.zeros(real.shape),
            in_graph=real.clone(),
        )

    @classmethod
    def from_model(cls, model: HasLayout) -> Graph:
        """The full graph of a loaded ``hap.Model`` (or anything with ``.layout``)."""
        return cls.from_layout(model.layout)

    # -- sizes and names -----------------------------------------------------
    @property
    def n_sources(self) -> int:
        return len(self.source_names)

    @property
    def n_readers(self) -> int:
        return len(self.reader_names)

    @property
    def n_edges(self) -> int:
        """Number of real edges."""
        return int(self.real.sum())

    @property
    def n_blocks(self) -> int:
        return 2 * self.layout.n_layers + 2

    def source_index(self, name: str) -> int:
        return self._source_lookup[name]

    def reader_index(self, name: str) -> int:
        return self._reader_lookup[name]

    def edge_index(self, name: str) -> tuple[int, int]:
        """(source, reader) indices of an edge named ``src->reader``."""
        source, _, reader = name.partition("->")
        if reader not in self._reader_lookup or source not in self._source_lookup:
            raise KeyError(f"no edge named '{name}' in this graph")
        s, r = self.source_index(source), self.reader_index(reader)
        if not self.real[s, r]:
            raise KeyError(f"'{name}' is not a real edge: a source can only feed readers after it")
        return s, r

    def edge_names(self) -> list[str]:
        """Names of all real edges, in (source, reader) row-major order."""
        sources, readers = self.real.nonzero(as_tuple=True)
        return [f"{self.source_names[s]}->{self.reader_names[r]}" for s, r in zip(sources.tolist(), readers.tolist())]

    # -- block structure (used by the ablation primitive) --------------------
    def base_block(self, block: int) -> int:
        """The block whose input the readers of ``block`` read: ``block`` itself, or, for an MLP running
        beside its layer's attention (``parallel_attn_mlp``), that attention block."""
        parallel_mlp = self.layout.parallel_attn_mlp and 0 < block < self.n_blocks - 1 and block % 2 == 0
        return block - 1 if parallel_mlp else block

    def sources_of_block(self, block: int) -> slice:
        """Index range of the sources written by ``block`` (empty for the unembedding)."""
        h = self.layout.n_heads
        if block == 0:
            return slice(0, 1)
        if block == self.n_blocks - 1:
            return slice(self.n_sources, self.n_sources)
        layer, is_mlp = divmod(block - 1, 2)
        start = 1 + layer * (h + 1)
        return slice(start + h, start + h + 1) if is_mlp else slice(start, start + h)

    def feeds(self) -> Tensor:
        """[R, S] bool: reader r is an input of source s (q/k/v of a head, a group's k/v of
        each head in the group, an MLP's input of that MLP). ``logits`` feeds no source."""
        layout = self.layout
        h, g = layout.n_heads, layout.n_kv_heads
        feeds = torch.zeros(self.n_readers, self.n_sources, dtype=torch.bool)
        group = torch.arange(h) // layout.heads_per_group
        for layer in range(layout.n_layers):
            readers, heads = self.readers_of_block(2 * layer + 1), self.sources_of_block(2 * layer + 1)
            head_index = torch.arange(heads.start, heads.stop)
            feeds[readers.start + torch.arange(h), head_index] = True
            for offset in (h, h + g):  # k readers, then v readers
                feeds[readers.start + offset + group, head_index] = True
            mlp_reader, mlp = self.readers_of_block(2 * layer + 2), self.sources_of_block(2 * layer + 2)
            feeds[mlp_reader, mlp] = True
        return feeds

    def readers_of_block(self, block: int) -> slice:
        """Index range of the readers read by ``block`` (empty for the embedding)."""
        h, g = self.layout.n_heads, self.layout.n_kv_heads
        per_layer = h + 2 * g + 1
        if block == 0:
            return slice(0, 0)
        if block == self.n_blocks - 1:
            return slice(self.n_readers - 1, self.n_readers)
        layer, is_mlp = divmod(block - 1, 2)
        start = layer * per_layer
        return slice(start + h + 2 * g, start + per_layer) if is_mlp else slice(start, start + h + 2 * g)

"""What an ablated edge reads instead of its source's output: the ``Reference`` of a batch.

An ablated edge (s -> r) carries z~_s: under interchange ablation what s writes on the corrupted prompt,
under mean ablation its mean output over a reference set, under zero ablation nothing. A ``Reference``
holds z~ of every source, their sums upstream of each block (the ``base_b`` every reader starts from)
and z^, what each source writes when all its readers read that base. ``interchange_reference`` and
``CompactReference`` are made here from one plain run, and the mean outputs from plain runs over a
reference set; ``mean_reference`` and ``zero_reference`` are in ``hap.ablation``, since their z^ takes one
masked run with every edge ablated.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from .errors import InvalidMaskError
from .graph import Graph
from .models.loading import Model
from .plain_run import trace


class AblationKind(str, Enum):
    """What an ablated edge carries instead of the source's output."""

    INTERCHANGE = "interchange"  # the source's output on the corrupted prompt
    MEAN = "mean"  # the source's mean output over a reference set, per position
    ZERO = "zero"  # nothing


@dataclass(frozen=True)
class Reference:
    """What ablated edges read, precomputed once per batch.

    ``outputs`` z~ [S, B|1, T, D]; ``block_inputs`` [n_blocks, B|1, T, D], the
    sum of z~ upstream of each block; ``fixed_outputs`` z^ [S, B|1, T, D], what
    each source writes when all its readers read ``block_inputs`` (equal to
    ``outputs`` under interchange ablation). A leading batch size of 1
    broadcasts over any batch; mean/zero references cover any length up to T.
    ``copies``: the run's batch is this many copies of the reference's batch,
    one after another (ACDC's batched tests), read without repeating the
    tensors (``of_copies``).
    """

    kind: AblationKind
    outputs: Tensor
    block_inputs: Tensor
    fixed_outputs: Tensor
    copies: int = 1

    def of_copies(self, copies: int) -> Reference:
        """This reference for a batch made of ``copies`` copies of its own batch."""
        return Reference(self.kind, self.outputs, self.block_inputs, self.fixed_outputs, copies)

    def fit(self, batch: int, length: int) -> Reference:
        """This reference cut to a batch of ``batch`` x ``length`` tokens."""
        ref_batch, ref_length = self.outputs.shape[1], self.outputs.shape[2]
        if ref_batch != 1 and ref_batch * self.copies != batch:
            copies = f" ({self.copies} copies of it)" if self.copies > 1 else ""
            raise InvalidMaskError(
                f"the reference was built for a batch of {ref_batch} examples{copies} but the run has {batch}; "
                "build one reference per batch (interchange needs the batch's own corrupted prompts)"
            )
        if length > ref_length:
            raise InvalidMaskError(
                f"the reference covers {ref_length} tokens but the run has {length}; build it from "
                "prompts at least as long"
            )
        if length == ref_length:
            return self
        cut = slice(0, length)
        return Reference(self.kind, self.outputs[:, :, cut], self.block_inputs[:, :, cut], self.fixed_outputs[:, :, cut],
                         self.copies)

    def rows(self, values: Tensor) -> Tensor:
        """A tensor of this reference [n, B|1, T, D] with one row per example of the run's batch: broadcast
        when B is 1, repeated for copies (a copy only then)."""
        if values.shape[1] == 1 or self.copies == 1:
            return values
        return values.repeat(1, self.copies, 1, 1)

    def subtract(self, values: Tensor, sources: Tensor | slice) -> Tensor:
        """values [n, batch, T, D] minus the reference's outputs of ``sources`` ([n] indices, or a slice of
        n: a view, nothing copied), broadcast over copies (nothing repeated)."""
        reference = self.outputs[sources] if isinstance(sources, slice) else self.outputs.index_select(0, sources)
        if reference.shape[1] == 1 or self.copies == 1:
            return values - reference
        n, _, length, width = values.shape
        return (values.view(n, self.copies, -1, length, width) - reference[:, None]).view(values.shape)


def interchange_reference(model: Model, corrupted_ids: Tensor) -> Reference:
    """Reference for interchange ablation: one plain run on the corrupted prompts [B, T]."""
    with torch.no_grad():
        corrupted = trace(model, corrupted_ids, logits=False)
    return Reference(AblationKind.INTERCHANGE, corrupted.outputs, corrupted.block_inputs, corrupted.outputs)


@dataclass(frozen=True)
class CompactReference:
    """An interchange reference kept small between uses: each layer's attention values
    before the output projection instead of every head's output.

    ``mixed`` [L, B, H, T, K]; ``others`` [1 + L, B, T, D]: the ``input`` and MLP
    outputs; ``block_inputs`` as in ``Reference``. ``expand`` recomputes the
    heads' outputs with the same operation the forward pass used, so the
    expanded reference equals the one ``interchange_reference`` makes, bit for
    bit. On SmolLM2 this is a third of the memory.
    """

    mixed: Tensor
    others: Tensor
    block_inputs: Tensor

    @classmethod
    def of(cls, model: Model, corrupted_ids: Tensor) -> CompactReference:
        """One plain run on the corrupted prompts [B, T], kept compact."""
        with torch.no_grad():
            corrupted = trace(model, corrupted_ids, logits=False, mixed=True)
        layout = model.layout
        heads_per_layer = layout.n_heads + 1
        mlp_rows = [0] + [1 + layer * heads_per_layer + layout.n_heads for layer in range(layout.n_layers)]
        others = corrupted.outputs[mlp_rows]
        return cls(corrupted.mixed, others, corrupted.block_inputs)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mixed, self.others, self.block_inputs))

    def expand(self, model: Model) -> Reference:
        """The full ``Reference`` (every source's output [S, B, T, D])."""
        layout = model.layout
        others = self.others
        outputs = others.new_empty(1 + layout.n_layers * (layout.n_heads + 1), *others.shape[1:])
        outputs[0] = others[0]
        with torch.no_grad():
            for layer in range(layout.n_layers):
                first = 1 + layer * (layout.n_heads + 1)
                outputs[first : first + layout.n_heads] = model.adapter.head_outputs(layer, self.mixed[layer])
                outputs[first + layout.n_heads] = others[1 + layer]
        return Reference(AblationKind.INTERCHANGE, outputs, self.block_inputs, outputs)


def mean_outputs(model: Model, graph: Graph, reference_ids: Tensor, lengths: Tensor | None = None,
                 batch_size: int = 16) -> Tensor:
    """Each source's mean output per position [S, 1, T, D] over ``reference_ids`` [N, T] (right-padded;
    ``lengths`` [N] real tokens per row, default all T): position t averages the rows that reach it."""
    n, length = reference_ids.shape
    if n == 0:
        raise InvalidMaskError("mean ablation needs at least one reference example")
    if lengths is None:
        lengths = torch.full((n,), length)
    total = torch.zeros(graph.n_sources, length, model.layout.d_model, device=model.device, dtype=model.dtype)
    count = torch.zeros(length, device=model.device, dtype=model.dtype)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            ids = reference_ids[start : start + batch_size].to(model.device)
            valid = (torch.arange(length)[None] < lengths[start : start + batch_size, None]).to(model.device, model.dtype)
            total += torch.einsum("sbtd,bt->std", trace(model, ids).outputs, valid)
            count += valid.sum(0)
    if bool((count == 0).any()):
        raise InvalidMaskError("mean ablation: some positions have no reference example; pass lengths or shorter T")
    return (total / count[:, None])[:, None]


def block_sums(graph: Graph, outputs: Tensor) -> Tensor:
    """block_inputs from per-source outputs: the sum of the sources before each block (before its
    ``base_block``: a parallel MLP reads what its layer's attention reads)."""
    before = [torch.zeros_like(outputs[0])]
    for block in range(graph.n_blocks - 1):
        before.append(before[-1] + outputs[graph.sources_of_block(block)].sum(0))
    return torch.stack([before[graph.base_block(block)] for block in range(graph.n_blocks)])

"""The one place edge masks are applied.

For every reader r and mask m in [0, 1] over the real edges:

    input_r = sum_s  m[s, r] * z_s + (1 - m[s, r]) * z~_s
            = base_b + sum_s m[s, r] * (z_s - z~_s)          (b = r's block)

where z_s is what source s writes in this (circuit) run, z~_s what it writes in
the *reference* (the corrupted run, the dataset mean, or zero) and
base_b = sum of z~_s over the sources upstream of block b, cached once per
batch. The second form is what runs: a reader whose live in-edges all come
from sources with z = z~ reads base_b, and is never formed.

``ComputePlan`` says which edges are *live* (may have a mask other than 0;
every other edge is fixed ablated) and derives what must be computed:

* a source *contributes* when z_s - z~_s can be non-zero: ``input`` always; a
  head or MLP when it is *active*; under mean/zero ablation every source, since
  a source whose readers all read base_b writes a fixed z^_s that differs from
  the mean (z^ is precomputed in the ``Reference``).
* a reader is *formed* when it has a live in-edge from a contributing source;
* a source is *active* (recomputed) when one of its readers is formed; in a
  post-normed attention layer (``heads_normed_together``) all its heads are
  active when one is, since they share the norm's scale.

Under interchange ablation an inactive source writes exactly its corrupted
output, so HAP's per-step cost scales with the candidate subgraph.

How the sums run: the deltas z - z~ of contributing sources are written once,
block by block, into a preallocated buffer [C, B, T, D]. At the start of each
chunk of ``CHUNK_LAYERS`` layers one matrix product forms, for every reader of
the chunk, the masked sum over the rows written so far; rows written inside
the chunk are added per block. A custom autograd function reads the buffer
again in backward and routes gradients to the per-block delta tensors, so no
copy of the deltas is kept per reader block. Attribution, with every mask at 1,
uses ``_plain_run`` instead: each reader reads the residual plus a probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import InvalidMaskError
from .graph import Graph
from .models.adapter import ModelAdapter, RunContext
from .models.loading import Model

if TYPE_CHECKING:
    from .precision import ReducedTwin


class AblationKind(str, Enum):
    """What an ablated edge carries instead of the source's output."""

    INTERCHANGE = "interchange"  # the source's output on the corrupted prompt
    MEAN = "mean"  # the source's mean output over a reference set, per position
    ZERO = "zero"  # nothing


@dataclass(frozen=True)
class Trace:
    """One plain forward pass, cut at the sources.

    ``outputs`` [S, B, T, D]: what every source wrote; ``block_inputs``
    [n_blocks, B, T, D]: the residual each block's readers read (index 0, the
    embedding, reads nothing and is zero); ``logits`` [B, T, V] (None when not
    asked for); ``mixed`` [L, B, H, T, K]: each layer's attention values before
    the output projection (only when asked for).
    """

    outputs: Tensor
    block_inputs: Tensor
    logits: Tensor | None
    mixed: Tensor | None = None


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

    def subtract(self, values: Tensor, sources: Tensor) -> Tensor:
        """values [n, batch, T, D] minus the reference's outputs of ``sources`` [n], broadcast over copies
        (nothing repeated)."""
        reference = self.outputs.index_select(0, sources)
        if reference.shape[1] == 1 or self.copies == 1:
            return values - reference
        n, _, length, width = values.shape
        return (values.view(n, self.copies, -1, length, width) - reference[:, None]).view(values.shape)


# ---------------------------------------------------------------------------
# Plain forward pass
# ---------------------------------------------------------------------------


def _group_of_heads(adapter: ModelAdapter, device: torch.device) -> Tensor:
    layout = adapter.layout
    return torch.arange(layout.n_heads, device=device) // layout.heads_per_group


def trace(model: Model, input_ids: Tensor, logits: bool = True, mixed: bool = False) -> Trace:
    """Run the model on token ids [B, T] through the adapter, recording every source.

    All edges are on: each reader reads the full residual, which is updated in
    the Hugging Face module's own order, so the logits equal its forward's
    bit for bit (``hap verify`` checks this). ``logits=False`` skips the
    unembedding; ``mixed=True`` also keeps each layer's attention values.
    """
    return _plain_run(model, input_ids, want_logits=logits, keep_mixed=mixed)


def answer_logits(model: Model, input_ids: Tensor, positions: Tensor) -> Tensor:
    """The full model's logits [B, V] at one position per row, without recording anything (no gradient)."""
    with torch.no_grad():
        return _plain_run(model, input_ids, positions=positions, record=False).logits


def _plain_run(
    model: Model,
    input_ids: Tensor,
    graph: Graph | None = None,
    probes: list[Probe] | None = None,
    reference: Reference | None = None,
    output_scale: Tensor | None = None,
    positions: Tensor | None = None,
    record: bool = True,
    want_logits: bool = True,
    keep_mixed: bool = False,
    per_head_kv: bool = False,
) -> Trace:
    """The all-edges-on forward pass, optionally with probes and interpolated sources.

    With ``probes`` (and ``graph``), every reader reads the residual plus a zero
    probe of its own, whose gradient is dL/d(reader input); with ``per_head_kv``
    every query head reads its own copy of its group's key and value inputs (as
    TransformerLens' ungrouped attention does), each with its own probe. ``output_scale`` [S]
    interpolates sources towards ``reference`` as in ``run_with_probes``.
    ``positions`` [B]: logits only at those positions ([B, V]). ``record=False``
    keeps no source outputs or block inputs (the trace's are then empty).
    """
    adapter = model.adapter
    layout = adapter.layout
    device = model.device
    batch, length = input_ids.shape
    ctx = adapter.prepare(input_ids.to(device))
    group_of_head = _group_of_heads(adapter, device)
    ref = reference.fit(batch, length) if reference is not None else None
    per_layer = layout.n_heads + 2 * layout.n_kv_heads + 1

    def read(x: Tensor, first_reader: int, n: int) -> Tensor:
        if probes is None:
            return x[None]
        probe = torch.zeros((n, *x.shape), device=device, dtype=x.dtype, requires_grad=True)
        probes.append(Probe(torch.arange(first_reader, first_reader + n, device=device), probe))
        return x[None] + probe

    def read_per_head(x: Tensor, first_reader: int) -> Tensor:
        probe = torch.zeros((layout.n_heads, *x.shape), device=device, dtype=x.dtype, requires_grad=True)
        probes.append(Probe(first_reader + group_of_head, probe, torch.arange(layout.n_heads, device=device)))
        return x[None] + probe

    def scaled(first: int, values: Tensor) -> tuple[Tensor, bool]:
        if output_scale is None or bool((output_scale[first : first + len(values)] == 1).all()):
            return values, False
        index = slice(first, first + len(values))
        return _interpolate(ref.outputs[index], values, output_scale[index]), True

    x, _ = scaled(0, adapter.embed(ctx)[None])
    x = x[0]
    outputs = [x[None]]
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
        if record or output_scale is not None:
            heads, interpolated = scaled(first_head, adapter.head_outputs(layer, mixed))
            outputs.append(heads)
            x = x + (heads.sum(0) if interpolated else adapter.layer_output(layer, mixed))
        else:
            x = x + adapter.layer_output(layer, mixed)
        mlp_input = beside if layout.parallel_attn_mlp else x
        block_inputs.append(mlp_input)
        mlp, _ = scaled(first_head + layout.n_heads,
                        adapter.mlp(layer, read(mlp_input, first_reader + per_layer - 1, 1)[0])[None])
        outputs.append(mlp)
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
    return Trace(torch.cat(outputs), torch.stack(block_inputs), logits, torch.stack(kept_mixed) if keep_mixed else None)


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


def _block_sums(graph: Graph, outputs: Tensor) -> Tensor:
    """block_inputs from per-source outputs: the sum of the sources before each block (before its
    ``base_block``: a parallel MLP reads what its layer's attention reads)."""
    before = [torch.zeros_like(outputs[0])]
    for block in range(graph.n_blocks - 1):
        before.append(before[-1] + outputs[graph.sources_of_block(block)].sum(0))
    return torch.stack([before[graph.base_block(block)] for block in range(graph.n_blocks)])


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


def _with_fixed_outputs(model: Model, graph: Graph, kind: AblationKind, outputs: Tensor) -> Reference:
    """Complete a mean/zero reference with z^: one run with every edge ablated."""
    partial = Reference(kind, outputs, _block_sums(graph, outputs), outputs)
    length = outputs.shape[2]
    ids = torch.zeros(1, length, dtype=torch.long, device=model.device)
    mask = torch.zeros(graph.real.shape, device=model.device, dtype=outputs.dtype)
    with torch.no_grad():
        _, fixed = _run(model, graph, ids, partial, mask, ComputePlan.build(graph, None, kind), None, record=True)
    return Reference(kind, outputs, partial.block_inputs, fixed)


def mean_reference(model: Model, graph: Graph, reference_ids: Tensor, lengths: Tensor | None = None,
                   batch_size: int = 16) -> Reference:
    """Reference for mean ablation: each source's mean output per position.

    ``reference_ids`` [N, T] (right-padded); ``lengths`` [N] real tokens per
    row (default: all T). Position t averages the rows that reach it.
    """
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
    return _with_fixed_outputs(model, graph, AblationKind.MEAN, (total / count[:, None])[:, None])


def zero_reference(model: Model, graph: Graph, length: int) -> Reference:
    """Reference for zero ablation over sequences of up to ``length`` tokens."""
    outputs = torch.zeros(graph.n_sources, 1, length, model.layout.d_model, device=model.device, dtype=model.dtype)
    return _with_fixed_outputs(model, graph, AblationKind.ZERO, outputs)


# ---------------------------------------------------------------------------
# Compute plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputePlan:
    """Which edges are live and, derived from that, what a masked run computes.

    ``live`` [S, R] bool (a subset of the real edges); ``contributing`` [S],
    ``active`` [S] and ``formed`` [R] as defined in the module docstring.
    """

    live: Tensor
    contributing: Tensor
    active: Tensor
    formed: Tensor

    @classmethod
    def build(cls, graph: Graph, live: Tensor | None, kind: AblationKind) -> ComputePlan:
        """Derive the plan from the live edges (None: every real edge is live)."""
        live = graph.real.clone() if live is None else (live.to("cpu", torch.bool) & graph.real)
        contributing = torch.zeros(graph.n_sources, dtype=torch.bool)
        active = torch.zeros(graph.n_sources, dtype=torch.bool)
        formed = torch.zeros(graph.n_readers, dtype=torch.bool)
        everyone_contributes = kind != AblationKind.INTERCHANGE
        layout = graph.layout
        for block in range(graph.n_blocks):
            readers = graph.readers_of_block(block)
            formed[readers] = (live[:, readers] & contributing[:, None]).any(0)
            sources = graph.sources_of_block(block)
            if block == 0:
                active[sources] = True
            elif block == graph.n_blocks - 1:
                pass
            elif (block - 1) % 2 == 0:  # attention: a head needs its q, or its group's k or v
                h, g = layout.n_heads, layout.n_kv_heads
                reader_formed = formed[readers]
                q, k, v = reader_formed[:h], reader_formed[h : h + g], reader_formed[h + g :]
                group = torch.arange(h) // layout.heads_per_group
                active[sources] = q | k[group] | v[group]
                if layout.heads_normed_together and bool(active[sources].any()):
                    active[sources] = True  # the heads share the post-norm's scale: one changes them all
            else:
                active[sources] = formed[readers]
            contributing[sources] = active[sources] | everyone_contributes
        return cls(live, contributing, active, formed)


# ---------------------------------------------------------------------------
# Masked forward pass
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Zero tensor added to some readers' inputs so that its ``.grad`` is dL/d(input).

    ``readers`` [n] reader indices; ``tensor`` [n, B, T, D] (T is 1 for the
    ``logits`` reader when the run was restricted to answer positions). With
    per-head key/value inputs, ``heads`` [n] names the query head whose own copy
    of its group's k or v input each row is (``readers`` then repeats the group's
    reader once per head).
    """

    readers: Tensor
    tensor: Tensor
    heads: Tensor | None = None


@dataclass(frozen=True)
class KnownOutputs:
    """What the blocks before ``until_block`` contribute to one masked run (``record_outputs``), for runs
    that differ from it only from that block on (ACDC's tests of one reader).

    ``deltas`` [n, B, T, D]: z_s - z~_s of sources 0 .. n-1, the sources of those blocks; ``mask`` [n, R]:
    the mask they were recorded under, on live edges (0 elsewhere); ``readers`` [u] and ``sums``
    [u, B, T, D]: for each reader of ``until_block`` or later with an entry in ``mask``, the sum over s of
    mask[s, r] * deltas_s. The deltas depend only on the masks of readers before ``until_block``. A run
    whose masks agree there (for every example; the caller's promise) computes no block before it: each
    reader's input takes its ``sums`` plus (m - mask)[s, r] * deltas_s over the entries where the run's
    mask m differs (the tested edges). Its batch may be the recorded one repeated (copies of the batch
    with different masks downstream, as ACDC's batched tests are)."""

    deltas: Tensor
    mask: Tensor
    readers: Tensor
    sums: Tensor
    until_block: int


@dataclass(frozen=True)
class MixedPrecision:
    """Compute every block but ``full_block`` (the investigated one) with a reduced-precision twin of the
    model (``hap.precision.reduced_twin``); gradients do not pass through the twin."""

    twin: ReducedTwin
    full_block: int


def _interpolate(reference: Tensor, computed: Tensor, scale: Tensor) -> Tensor:
    """reference + a * (computed - reference) in value, with the gradient of ``computed``
    (straight through), per source: reference/computed [n, B, T, D], scale [n]."""
    a = scale.to(computed.device, computed.dtype)[:, None, None, None]
    if bool((a == 1).all()):
        return computed
    mixed = reference + a * (computed - reference)
    return computed + (mixed - computed).detach()


# Layers whose reader inputs share one product over the rows written before them: fewer
# passes over the delta buffer at the cost of [16 * CHUNK_LAYERS, B, T, D] sums.
CHUNK_LAYERS = 4


class _BufferedSum(torch.autograd.Function):
    """Masked sum over rows of the delta buffer: out[n] = sum_u sub[u, n] * region[rows[u]].

    ``region`` [s, B, T*D] is a view of the run's delta buffer, which holds the
    values of ``pieces`` (the per-block delta tensors, in row order); ``rows``
    (None: all s) are the rows with a live entry, ``sub`` [u, n] (or per example
    [B, u, n]) their mask entries; ``wanted`` [u, n] bool (None: all) the
    entries whose gradient is needed (2-D only). The buffer is written once per
    row and never rewritten, so backward can read ``region`` again; its gradient
    is routed back onto ``pieces`` (None for a piece with no row used), which is
    how gradients reach the sources' computations. No copy of the deltas is
    kept for backward.
    """

    @staticmethod
    def forward(ctx, sub: Tensor, region: Tensor, rows: Tensor | None, wanted: Tensor | None,
                *pieces: Tensor) -> Tensor:
        ctx.region, ctx.rows, ctx.wanted = region, rows, wanted  # region not saved: later rows get written
        ctx.piece_sizes = [piece.shape[0] for piece in pieces]
        ctx.piece_shapes = [piece.shape for piece in pieces]
        ctx.save_for_backward(sub)
        data = region if rows is None else region.index_select(0, rows)
        if sub.dim() == 2:
            return sub.transpose(0, 1) @ data.flatten(1)  # [n, B*T*D]
        per_example = data.flatten(2).transpose(0, 1)  # [B, u, T*D]
        return (sub.transpose(1, 2) @ per_example).transpose(0, 1).contiguous().flatten(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (sub,) = ctx.saved_tensors
        rows = ctx.rows
        data = ctx.region if rows is None else ctx.region.index_select(0, rows)
        grad_sub = None
        if sub.dim() == 2:
            if ctx.needs_input_grad[0]:
                grad_sub = _mask_gradient(data.flatten(1), grad, ctx.wanted)
            grad_used = sub @ grad  # [u, B*T*D]
        else:
            batch = sub.shape[0]
            g = grad.view(grad.shape[0], batch, -1).transpose(0, 1)  # [B, n, T*D]
            if ctx.needs_input_grad[0]:
                grad_sub = data.flatten(2).transpose(0, 1) @ g.transpose(1, 2)
            grad_used = (sub @ g).transpose(0, 1).contiguous()
        if rows is None:
            parts = grad_used.split(ctx.piece_sizes)
            return (grad_sub, None, None, None, *(part.view(shape) for part, shape in zip(parts, ctx.piece_shapes)))
        return (grad_sub, None, None, None, *_route_rows(grad_used, rows, ctx.piece_sizes, ctx.piece_shapes))


def _mask_gradient(data: Tensor, grad: Tensor, wanted: Tensor | None) -> Tensor:
    """d(out)/d(sub) = data [u, F] @ grad [n, F]^T, computed only over the rows and columns that hold a
    wanted entry (the rest left 0)."""
    if wanted is None:
        return data @ grad.transpose(0, 1)
    rows, columns = wanted.any(1).nonzero().flatten(), wanted.any(0).nonzero().flatten()
    result = data.new_zeros(data.shape[0], grad.shape[0])
    if len(rows) == 0:
        return result
    device = data.device
    part_rows = data if len(rows) == data.shape[0] else data.index_select(0, rows.to(device))
    part_columns = grad if len(columns) == grad.shape[0] else grad.index_select(0, columns.to(device))
    block = part_rows @ part_columns.transpose(0, 1)
    result[rows.to(device)[:, None], columns.to(device)[None, :]] = block
    return result * wanted.to(device=device, dtype=result.dtype)


def _route_rows(grad_used: Tensor, rows: Tensor, sizes: list[int], shapes: list) -> list[Tensor | None]:
    """Gradients of the pieces from those of the used rows [u, ...]: None for a piece with no used row."""
    out: list[Tensor | None] = []
    first, taken = 0, 0
    rows_cpu = rows.cpu()
    for size, shape in zip(sizes, shapes):
        n_used = int(((rows_cpu >= first) & (rows_cpu < first + size)).sum())
        if n_used == 0:
            out.append(None)
        elif n_used == size:
            out.append(grad_used[taken : taken + size].view(shape))
        else:
            local = rows[taken : taken + n_used] - first
            part = grad_used.new_zeros(size, *grad_used.shape[1:]).index_copy_(0, local, grad_used[taken : taken + n_used])
            out.append(part.view(shape))
        first += size
        taken += n_used
    return out


class _MaskedRun:
    """One forward pass in which every reader reads its masked mix of sources.

    The state the blocks share: the delta buffer (one row per contributing
    source, written block by block), the per-block delta tensors (``pieces``,
    what gradients flow back into), and the current chunk's product. A reader's
    input is ``base_b`` plus its masked sum over the rows written so far,
    computed only over the rows with a live entry into the readers that are
    formed; a wanted reader that is not formed reads ``base_b`` alone.
    """

    def __init__(self, model: Model, graph: Graph, input_ids: Tensor, reference: Reference, mask: Tensor,
                 plan: ComputePlan, record: bool, output_scale: Tensor | None, probes: list[Probe] | None,
                 grad_entries: Tensor | None = None, known: KnownOutputs | None = None,
                 precision: MixedPrecision | None = None) -> None:
        self.model, self.graph, self.plan = model, graph, plan
        self.precision = precision
        self.twin_ctx = precision.twin.adapter.prepare(input_ids.to(model.device)) if precision is not None else None
        self.known_until = known.until_block if known is not None else 0
        self.known = known
        self.adapter, self.device = model.adapter, model.device
        self.batch, self.length = input_ids.shape
        self.ref = reference.fit(self.batch, self.length)
        self.ctx: RunContext = self.adapter.prepare(input_ids.to(self.device))
        self.output_scale, self.probes = output_scale, probes
        self.group_of_head = _group_of_heads(self.adapter, self.device)
        self.recorded = self.ref.rows(self.ref.fixed_outputs).expand(-1, self.batch, -1, -1).clone() if record else None
        # Rows of the delta buffer: the contributing sources, in block order (those of known blocks
        # excepted: they enter through ``known.sums``). Entries that are not live are fixed ablated
        # whatever the caller's mask says.
        row_source = plan.contributing.nonzero().flatten()
        if known is not None:
            row_source = row_source[row_source >= known.deltas.shape[0]]
            self._known_changes(mask, plan)
        self.live_rows = plan.live[row_source]  # [rows, R] bool, on the CPU (it decides shapes)
        # Entries whose mask gradient is wanted, by buffer row: none without autograd, else grad_entries or all.
        self.measuring = not (mask.requires_grad and torch.is_grad_enabled())
        if self.measuring:
            self.grad_rows: Tensor | None = torch.zeros_like(plan.live)[row_source]
        elif grad_entries is None:
            self.grad_rows = None
        else:
            self.grad_rows = (grad_entries.cpu().bool() & plan.live)[row_source]
        # Live entries whose mask is exactly 1 (for every example): a reader whose entries are mostly ones is
        # cheaper as "all deltas minus the (1 - m) share" (see _masked_sum).
        ones = mask.detach() == 1  # reduced where the mask is: a per-example mask can be a GiB on a GPU
        self.one_rows = ((ones.all(0) if ones.dim() == 3 else ones).cpu() & plan.live)[row_source]
        self._piece_totals: list[Tensor] = []  # sum over each piece's rows [B, T, D], made when first needed
        live = plan.live.to(device=self.device, dtype=model.dtype)
        self.mask_rows = (mask.to(device=self.device, dtype=model.dtype) * live).index_select(
            -2, row_source.to(self.device))
        self.buffer = torch.empty(len(row_source), self.batch, self.length, model.layout.d_model,
                                  device=self.device, dtype=model.dtype)
        self.pieces: list[Tensor] = []
        self.n_rows = 0
        self.wanted, self.active_heads = self._blocks()
        self.chunk: dict = {"id": None, "rows": 0, "pieces": 0, "sums": {}, "blocks": set()}

    def _blocks(self) -> tuple[dict[int, Tensor], dict[int, tuple[Tensor, Tensor]]]:
        """What every block computes, known up front from the plan (the chunked sums need the readers):
        the readers each block forms inputs for, and each attention block's active heads and the groups
        they use."""
        graph, layout, device = self.graph, self.model.layout, self.device
        h, g = layout.n_heads, layout.n_kv_heads
        wanted: dict[int, Tensor] = {}
        active_heads: dict[int, tuple[Tensor, Tensor]] = {}
        for layer in range(layout.n_layers):
            block = 2 * layer + 1
            sources, readers = graph.sources_of_block(block), graph.readers_of_block(block)
            heads = self.plan.active[sources].nonzero().flatten().to(device)
            if len(heads) and not self._is_known(block):
                groups = torch.unique(self.group_of_head[heads])
                active_heads[block] = (heads, groups)
                wanted[block] = torch.cat([readers.start + heads, readers.start + h + groups,
                                           readers.start + h + g + groups])
            if bool(self.plan.active[graph.sources_of_block(block + 1)].any()) and not self._is_known(block + 1):
                wanted[block + 1] = torch.tensor([graph.readers_of_block(block + 1).start], device=device)
        wanted[graph.n_blocks - 1] = torch.tensor([graph.n_readers - 1], device=device)
        return wanted, active_heads

    def _known_changes(self, mask: Tensor, plan: ComputePlan) -> None:
        """Where this run's mask differs from the one the known blocks were recorded under: ``known_diff``
        [(B,) n, R] (this run's live mask minus the recorded one) and ``known_changed`` [n, R] bool (any
        example), on the known sources' out-edges; and each reader's slot in ``known.sums`` (-1: none)."""
        known, n = self.known, self.known.deltas.shape[0]
        live = plan.live[:n].to(device=self.device, dtype=self.model.dtype)
        ours = mask.detach().to(device=self.device, dtype=self.model.dtype)[..., :n, :] * live
        self.known_diff = ours - known.mask
        changed = self.known_diff != 0
        self.known_changed = (changed.any(0) if changed.dim() == 3 else changed).cpu()
        self.known_slot = torch.full((self.graph.n_readers,), -1, dtype=torch.long)
        self.known_slot[known.readers.cpu()] = torch.arange(len(known.readers))

    def _known_part(self, readers: Tensor) -> tuple[Tensor, Tensor] | None:
        """What the known blocks add to these readers' inputs: (their positions in ``readers`` [u'], sums
        [u', B, T, D]), or None when they add nothing."""
        readers_cpu = readers.cpu()
        slots = self.known_slot[readers_cpu]
        changed = self.known_changed[:, readers_cpu]
        used = ((slots >= 0) | changed.any(0)).nonzero().flatten()
        if len(used) == 0:
            return None
        known, copies = self.known, self.batch // self.known.deltas.shape[1]
        values = torch.zeros((len(used), *known.sums.shape[1:]), device=self.device, dtype=self.model.dtype)
        have = (slots[used] >= 0).nonzero().flatten()
        if len(have):
            values[have.to(self.device)] = known.sums.index_select(0, slots[used[have]].to(self.device))
        values = values.repeat(1, copies, 1, 1) if copies > 1 else values
        for position in (changed[:, used].any(0)).nonzero().flatten().tolist():
            reader = int(readers_cpu[used[position]])
            sources = self.known_changed[:, reader].nonzero().flatten().to(self.device)
            weights = self.known_diff[..., sources, reader]  # [(B,) m]
            deltas = known.deltas.index_select(0, sources)
            deltas = deltas.repeat(1, copies, 1, 1) if copies > 1 else deltas
            pattern = "bm,mbtd->btd" if weights.dim() == 2 else "m,mbtd->btd"
            values[position] += torch.einsum(pattern, weights, deltas)
        return used.to(self.device), values

    # -- the delta buffer --------------------------------------------------
    def add_deltas(self, sources: slice, computed_index: Tensor, computed: Tensor | None) -> None:
        """Write this block's rows: computed outputs [n, B, T, D] of its active sources (global
        ``computed_index``) minus the reference, or the fixed outputs of sources not recomputed."""
        ref, device = self.ref, self.device
        index = torch.arange(sources.start, sources.stop, device=device)[self.plan.contributing[sources].to(device)]
        if len(index) == 0:
            return
        if self.output_scale is not None and computed is not None:
            computed = _interpolate(ref.rows(ref.outputs[computed_index]), computed,
                                    self.output_scale[computed_index.cpu()])
        if computed is not None and self.recorded is not None:
            self.recorded[computed_index] = computed.detach()
        if computed is not None and len(computed_index) == len(index):
            # The usual case (always under interchange): contributing == active.
            values = ref.subtract(computed, index)
        else:
            values = ref.rows(ref.fixed_outputs[index] - ref.outputs[index]).expand(-1, self.batch, -1, -1)
            if computed is not None:
                rows = torch.searchsorted(index, computed_index)
                values = values.index_put((rows,), ref.subtract(computed, computed_index))
        self.buffer[self.n_rows : self.n_rows + len(index)] = values.detach()
        self.pieces.append(values)
        self.n_rows += len(index)

    def _masked_sum(self, first: int, first_piece: int, readers: Tensor) -> tuple[Tensor, Tensor] | None:
        """Sums over buffer rows ``first`` .. written so far for the ``readers`` that have a live entry
        there: (their positions in ``readers`` [u'], sums [u', B, T, D]), or None when none has one.

        Two exact forms, whichever needs fewer buffer rows: sum m * delta over the rows with a live entry,
        or (when most entries are exactly 1, as early in Edge Pruning) the sum of all the rows' deltas minus
        (1 - m) * delta over the rows with an entry that is not 1 (ablated entries count with m = 0).
        """
        if self.n_rows <= first:
            return None
        readers_cpu = readers.cpu()
        live = self.live_rows[first : self.n_rows][:, readers_cpu]  # [r, n]
        used_readers = live.any(0).nonzero().flatten()
        if len(used_readers) == 0:
            return None
        live = live[:, used_readers]
        not_one = ~self.one_rows[first : self.n_rows][:, readers_cpu[used_readers]]
        wanted_entries = live if self.grad_rows is None else \
            self.grad_rows[first : self.n_rows][:, readers_cpu[used_readers]]
        # The complement form keeps every row with an entry that is not 1, or whose gradient is wanted.
        direct_rows, complement_rows = live.any(1), (not_one | wanted_entries).any(1)
        complement = int(complement_rows.sum()) < int(direct_rows.sum())
        used_rows = (complement_rows if complement else direct_rows).nonzero().flatten()
        device = self.device
        readers_used = used_readers.to(device)
        shape = (len(used_readers), self.batch, self.length, -1)
        total = self._delta_total(first_piece)[None] if complement else None
        if len(used_rows) == 0:  # complement form with every entry at 1: all the deltas
            return readers_used, total.expand(len(used_readers), -1, -1, -1)
        sub = self.mask_rows[..., first : self.n_rows, :].index_select(-1, readers[readers_used])
        rows = None
        if len(used_rows) < self.n_rows - first:
            rows = used_rows.to(device)
            sub = sub.index_select(-2, rows)
        if sub.dim() == 3 and self.measuring and bool((sub == sub[:1]).all()):
            sub = sub[0]  # every example alike here (ACDC's copies differ only at the tested reader): one product
        wanted = None if self.grad_rows is None else wanted_entries[used_rows]  # [u, n'] bool
        weights = 1 - sub if complement else sub
        summed = _BufferedSum.apply(weights, self.buffer[first : self.n_rows], rows, wanted,
                                    *self.pieces[first_piece:]).view(shape)
        return readers_used, (total - summed if complement else summed)

    def _delta_total(self, first_piece: int) -> Tensor:
        """The sum of every delta written from piece ``first_piece`` on: [B, T, D]."""
        while len(self._piece_totals) < len(self.pieces):
            piece = self.pieces[len(self._piece_totals)]
            self._piece_totals.append(piece.sum(0).expand(self.batch, -1, -1))
        totals = self._piece_totals[first_piece:]
        return torch.stack(totals).sum(0) if len(totals) > 1 else totals[0]

    # -- reader inputs -----------------------------------------------------
    def _chunk_of(self, block: int) -> int:
        return (block - 1) // (2 * CHUNK_LAYERS) if block < self.graph.n_blocks - 1 else -1

    def _start_chunk(self, block: int) -> None:
        """One product for the contributions of every row written so far to every reader of the chunk."""
        blocks = [b for b in sorted(self.wanted) if self._chunk_of(b) == self._chunk_of(block)]
        sums: dict[int, tuple[Tensor, Tensor]] = {}
        readers = torch.cat([self.wanted[b] for b in blocks]) if blocks else None
        found = self._masked_sum(0, 0, readers) if readers is not None else None
        if found is not None:
            used, summed = found
            # The used readers are sorted, so each block's are one run: one split (its backward is one
            # concatenation), not an index per block (each would zero-fill).
            sizes = [len(self.wanted[b]) for b in blocks]
            ends = torch.tensor(sizes, device=self.device).cumsum(0)
            counts = torch.bucketize(used, ends, right=True).bincount(minlength=len(blocks)).tolist()
            taken = 0
            for b, size, end, part, n in zip(blocks, sizes, ends.tolist(), summed.split(counts), counts):
                if n:
                    sums[b] = (used[taken : taken + n] - (end - size), part)
                taken += n
        self.chunk = {"id": self._chunk_of(block), "rows": self.n_rows, "pieces": len(self.pieces), "sums": sums,
                      "blocks": set(blocks)}

    def inputs(self, block: int, readers: Tensor) -> Tensor:
        """Inputs [n, B, T, D] of these readers of ``block`` (or [1, B, T, D] when all read the base alone):
        base + masked sum of the deltas so far. Rows written before the block's chunk of layers come from
        the chunk's one product; rows written inside the chunk are summed here."""
        if self._chunk_of(block) != self.chunk["id"] or block not in self.chunk["blocks"]:
            self._start_chunk(block)
        x = self.ref.rows(self.ref.block_inputs[block][None]).expand(-1, self.batch, -1, -1)
        for found in (self.chunk["sums"].get(block),
                      self._masked_sum(self.chunk["rows"], self.chunk["pieces"], readers),
                      self._known_part(readers) if self.known is not None else None):
            if found is not None:
                x = _add_rows(x, len(readers), *found)
        return self._probe(x, readers)

    def _probe(self, x: Tensor, readers: Tensor) -> Tensor:
        if self.probes is None:
            return x
        probe = torch.zeros((len(readers), *x.shape[1:]), device=self.device, dtype=x.dtype, requires_grad=True)
        self.probes.append(Probe(readers, probe))
        return x + probe

    # -- the pass ----------------------------------------------------------
    def run(self, positions: Tensor | None, stop_block: int | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(logits, recorded outputs); with ``stop_block``, stop before computing that block (no logits)."""
        graph, adapter, device = self.graph, self.adapter, self.device
        if not self._is_known(0):
            self.add_deltas(graph.sources_of_block(0), torch.zeros(1, dtype=torch.long, device=device),
                            adapter.embed(self.ctx)[None])
        for layer in range(self.model.layout.n_layers):
            for block in (2 * layer + 1, 2 * layer + 2):
                if stop_block is not None and block >= stop_block:
                    return None, self.recorded
                sources = graph.sources_of_block(block)
                if self._is_known(block):
                    continue  # enters through known.sums
                if block % 2 == 1:
                    self._attention_block(layer)
                elif block in self.wanted:
                    x = self.inputs(block, self.wanted[block])[0]
                    computing, _, dtype = self._computing(block)
                    if positions is not None and block == graph.n_blocks - 2 and self.recorded is None:
                        output = self._last_mlp_at(positions, layer, computing, x.to(dtype))
                    else:
                        output = computing.mlp(layer, x.to(dtype))
                    self.add_deltas(sources, torch.tensor([sources.start], device=device),
                                    output[None].to(self.model.dtype))
                else:
                    self.add_deltas(sources, torch.zeros(0, dtype=torch.long, device=device), None)
        if stop_block is not None and stop_block < self.graph.n_blocks:
            return None, self.recorded
        logits = adapter.unembed(self._logits_input(positions))
        if positions is not None:
            logits = logits[:, 0]
        return logits, self.recorded

    def _last_mlp_at(self, positions: Tensor, layer: int, computing: ModelAdapter, x: Tensor) -> Tensor:
        """The last MLP's output [B, T, D] when only the logits at ``positions`` [B] are wanted: only the
        logits read it, so it is computed at those positions (it acts on each position alone) and left at
        the reference's output, a delta of 0, elsewhere."""
        rows = torch.arange(self.batch, device=self.device)
        positions = positions.to(self.device)
        source = self.graph.sources_of_block(2 * layer + 2).start
        reference = self.ref.rows(self.ref.outputs[source : source + 1])[0].expand(self.batch, -1, -1)
        output = computing.mlp(layer, x[rows, positions])  # a reduced twin's adapter answers in float32
        return reference.to(output.dtype).index_put((rows, positions), output)

    def _is_known(self, block: int) -> bool:
        return block < self.known_until

    def _attention_block(self, layer: int) -> None:
        adapter, block = self.adapter, 2 * layer + 1
        sources = self.graph.sources_of_block(block)
        if block not in self.active_heads:
            self.add_deltas(sources, torch.zeros(0, dtype=torch.long, device=self.device), None)
            return
        heads, groups = self.active_heads[block]
        x = self.inputs(block, self.wanted[block])
        n_heads, n_groups = len(heads), len(groups)
        if x.shape[0] == 1:  # every wanted reader reads the same base
            xq = xk = xv = x
        else:
            xq, xk, xv = x[:n_heads], x[n_heads : n_heads + n_groups], x[n_heads + n_groups :]
        row_of_group = torch.searchsorted(groups, self.group_of_head[heads])  # each head's group among those computed
        adapter, ctx, dtype = self._computing(block)
        xq, xk, xv = xq.to(dtype), xk.to(dtype), xv.to(dtype)
        q = adapter.queries(layer, xq, ctx, heads)
        k = adapter.keys(layer, xk, ctx, groups).index_select(1, row_of_group)
        v = adapter.values(layer, xv, ctx, groups).index_select(1, row_of_group)
        computed = adapter.head_outputs(layer, adapter.attend(layer, q, k, v, ctx), heads)
        self.add_deltas(sources, sources.start + heads, computed.to(self.model.dtype))

    def _computing(self, block: int) -> tuple[ModelAdapter, RunContext, torch.dtype]:
        """The adapter, context and dtype that compute ``block``: the reduced twin's unless the block is the
        investigated one (or the run is in full precision)."""
        if self.precision is None or block == self.precision.full_block:
            return self.adapter, self.ctx, self.model.dtype
        return self.precision.twin.adapter, self.twin_ctx, self.precision.twin.dtype

    def _logits_input(self, positions: Tensor | None) -> Tensor:
        """The ``logits`` reader's input: [B, T, D], or [B, 1, D] at each example's answer position."""
        block = self.graph.n_blocks - 1
        logits_reader = self.wanted[block]
        if positions is None:
            return self.inputs(block, logits_reader)[0]
        rows = torch.arange(self.batch, device=self.device)
        positions = positions.to(self.device)
        base = self.ref.rows(self.ref.block_inputs[block][None])[0].expand(self.batch, -1, -1)[rows, positions]
        used = self.live_rows[: self.n_rows, -1].nonzero().flatten()
        if len(used):
            at_answer = torch.cat([piece.expand(-1, self.batch, -1, -1)[:, rows, positions]
                                   for piece in self.pieces])  # [C, B, D]
            used_device = used.to(self.device)
            sub = self.mask_rows[..., : self.n_rows, -1].index_select(-1, used_device)  # [(B,) u]
            pattern = "ubd,u->bd" if sub.dim() == 1 else "ubd,bu->bd"
            base = base + torch.einsum(pattern, at_answer.index_select(0, used_device), sub)
        found = self._known_part(logits_reader) if self.known is not None else None
        if found is not None:
            base = base + found[1][0, rows, positions]
        return self._probe(base[None, :, None], logits_reader)[0]


def _add_rows(x: Tensor, n: int, positions: Tensor, values: Tensor) -> Tensor:
    """x [1|n, B, T, D] plus ``values`` [u, B, T, D] at rows ``positions`` of n."""
    if len(positions) == n:
        return x + values
    return x.expand(n, *x.shape[1:]).index_add(0, positions, values)


def _run(
    model: Model,
    graph: Graph,
    input_ids: Tensor,
    reference: Reference,
    mask: Tensor,
    plan: ComputePlan,
    positions: Tensor | None,
    record: bool,
    output_scale: Tensor | None = None,
    probes: list[Probe] | None = None,
    grad_entries: Tensor | None = None,
    known: KnownOutputs | None = None,
    precision: MixedPrecision | None = None,
) -> tuple[Tensor, Tensor | None]:
    return _MaskedRun(model, graph, input_ids, reference, mask, plan, record, output_scale, probes,
                      grad_entries, known, precision).run(positions)


def run_masked(
    model: Model,
    graph: Graph,
    input_ids: Tensor,
    reference: Reference,
    mask: Tensor,
    plan: ComputePlan | None = None,
    positions: Tensor | None = None,
    grad_entries: Tensor | None = None,
    known: KnownOutputs | None = None,
    precision: MixedPrecision | None = None,
) -> Tensor:
    """Forward pass in which every reader reads its masked mix of sources.

    ``input_ids`` [B, T] (right-padded; pads never affect earlier positions);
    ``reference`` built for this batch (or broadcastable, mean/zero); ``mask``
    [S, R] or per example [B, S, R], values in [0, 1], differentiable (only
    real edges are read; with a ``plan``, only its live edges). ``positions``
    [B]: return logits [B, V] at one position per example instead of [B, T, V]
    (cheaper: the unembedding runs on B vectors). Without a plan every real
    edge is live and every source is recomputed. ``grad_entries`` [S, R] bool
    (2-D masks only): the entries whose gradient the caller will use; the
    mask's gradient is left at 0 elsewhere, which skips work (Edge Pruning:
    a gate clamped at 0 or 1 has no gradient anyway). ``known``: outputs of
    the early blocks recorded by ``record_outputs`` under the same masks of
    those blocks' readers (the caller's promise), taken instead of computed.
    ``precision``: compute all blocks but one with a reduced-precision twin
    (no gradient flows through them).
    """
    expected = (graph.n_sources, graph.n_readers)
    if tuple(mask.shape[-2:]) != expected or mask.dim() not in (2, 3):
        raise InvalidMaskError(f"mask must have shape {list(expected)} or [batch, {expected[0]}, {expected[1]}], "
                               f"got {list(mask.shape)}")
    if mask.dim() == 3 and mask.shape[0] != input_ids.shape[0]:
        raise InvalidMaskError(f"per-example mask has {mask.shape[0]} rows but the batch has {input_ids.shape[0]}")
    if grad_entries is not None and (mask.dim() != 2 or tuple(grad_entries.shape) != expected):
        raise InvalidMaskError(f"grad_entries must be a [{expected[0]}, {expected[1]}] bool tensor with a 2-D mask")
    if plan is None:
        plan = ComputePlan.build(graph, None, reference.kind)
    if known is not None:
        _check_known(graph, known, input_ids)
    if precision is not None and torch.is_grad_enabled() and mask.requires_grad:
        raise InvalidMaskError("mixed precision is for measuring runs (no gradient); run under torch.no_grad()")
    if known is not None and torch.is_grad_enabled() and mask.requires_grad:
        raise InvalidMaskError("known outputs are for measuring runs (no gradient); run under torch.no_grad()")
    logits, _ = _run(model, graph, input_ids, reference, mask, plan, positions, record=False,
                     grad_entries=grad_entries, known=known, precision=precision)
    return logits


def _check_known(graph: Graph, known: KnownOutputs, input_ids: Tensor) -> None:
    n, recorded_batch, length = known.deltas.shape[:3]
    if not 0 <= known.until_block < graph.n_blocks or n < graph.sources_of_block(known.until_block).start:
        raise InvalidMaskError(f"known outputs cover {n} sources, fewer than the blocks before block "
                               f"{known.until_block} have; record them with record_outputs on this graph")
    if length != input_ids.shape[1] or input_ids.shape[0] % recorded_batch:
        raise InvalidMaskError(f"known outputs were recorded on {recorded_batch} x {length} tokens; the run's batch "
                               f"{list(input_ids.shape)} must be that batch, or copies of it")


def record_outputs(model: Model, graph: Graph, input_ids: Tensor, reference: Reference, mask: Tensor,
                   until_block: int, plan: ComputePlan | None = None, precision: MixedPrecision | None = None,
                   earlier: KnownOutputs | None = None) -> KnownOutputs:
    """Run ``run_masked`` (no gradients, a 2-D ``mask``) up to ``until_block`` and keep what the sources
    before it contribute to later readers (``KnownOutputs``). ``earlier``: recorded for the same batch and
    block under a mask that agrees with ``mask`` on the readers before the block (the caller's promise,
    as ACDC's tests of the readers of one block keep it): its outputs are reused, only the sums redone."""
    if mask.dim() != 2:
        raise InvalidMaskError("record_outputs takes one [S, R] mask for the whole batch")
    if plan is None:
        plan = ComputePlan.build(graph, None, reference.kind)
    n = graph.sources_of_block(until_block).start
    with torch.no_grad():
        if earlier is not None and earlier.until_block == until_block and \
                tuple(earlier.deltas.shape[1:3]) == tuple(input_ids.shape):
            deltas = earlier.deltas
        else:
            run = _MaskedRun(model, graph, input_ids, reference, mask.detach(), plan, True, None, None,
                             precision=precision)
            _, recorded = run.run(None, stop_block=until_block)
            deltas = recorded[:n] - run.ref.outputs[:n]
        live = plan.live[:n].to(device=model.device, dtype=model.dtype)
        recorded_mask = mask.detach()[:n].to(device=model.device, dtype=model.dtype) * live
    return _known(graph, deltas, recorded_mask, until_block)


def _known(graph: Graph, deltas: Tensor, recorded_mask: Tensor, until_block: int) -> KnownOutputs:
    """``KnownOutputs`` of the deltas of the sources before ``until_block`` under ``recorded_mask``: the
    sums each later reader takes of them."""
    with torch.no_grad():
        later = (graph.reader_block >= until_block).to(deltas.device)
        readers = ((recorded_mask != 0).any(0) & later).nonzero().flatten()
        weights = recorded_mask.index_select(1, readers).T  # [u, n]
        sums = (weights @ deltas.flatten(1)).view(len(readers), *deltas.shape[1:])
    return KnownOutputs(deltas, recorded_mask, readers, sums, until_block)


def known_until(graph: Graph, known: KnownOutputs, block: int) -> KnownOutputs:
    """The outputs ``known`` records, cut to the sources before an earlier ``block`` (what a run that
    differs from the recorded one from that block on may take): one recording of a whole run serves
    the runs that differ from it at any block."""
    if block > known.until_block:
        raise InvalidMaskError(f"known outputs end at block {known.until_block}, before block {block}")
    n = graph.sources_of_block(block).start
    return _known(graph, known.deltas[:n], known.mask[:n], block)


def run_with_probes(
    model: Model,
    graph: Graph,
    input_ids: Tensor,
    reference: Reference,
    mask: Tensor | None = None,
    positions: Tensor | None = None,
    output_scale: Tensor | None = None,
    record: bool = False,
    per_head_kv: bool = False,
) -> tuple[Tensor, list[Probe], Tensor | None]:
    """A forward pass that also returns a probe per group of readers (``per_head_kv``: key/value inputs
    per query head, see ``_plain_run``; only with every edge on).

    After ``loss.backward()``, ``probe.tensor.grad`` holds dL/d(input) of
    ``probe.readers``. ``mask`` None means every edge on: then each reader
    reads the plain residual (no masked sums at all, the fast path attribution
    uses); otherwise the run is ``run_masked``'s. ``output_scale`` [S] (default
    all 1) interpolates each source's output between the reference (a = 0) and
    what it computes in this run (a = 1), with the gradient passing straight
    through as if a = 1: the runs integrated gradients need. With ``record``,
    also returns every source's output in this run [S, B, T, D].
    """
    probes: list[Probe] = []
    if mask is None:
        run = _plain_run(model, input_ids, graph, probes, reference, output_scale, positions,
                         per_head_kv=per_head_kv)
        return run.logits, probes, run.outputs.detach() if record else None
    if per_head_kv:
        raise InvalidMaskError("per-head key/value probes need the all-edges-on run (mask=None)")
    plan = ComputePlan.build(graph, None, reference.kind)
    logits, recorded = _run(model, graph, input_ids, reference, mask, plan, positions, record, output_scale, probes)
    return logits, probes, recorded

"""The one place edge masks are applied.

For every reader r and mask m in [0, 1] over the real edges:

    input_r = sum_s  m[s, r] * z_s + (1 - m[s, r]) * z~_s
            = base_b + sum_s m[s, r] * (z_s - z~_s)          (b = r's block)

where z_s is what source s writes in this (circuit) run, z~_s what it writes in
the *reference* (the corrupted run, the dataset mean, or zero; ``hap.reference``) and
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
again in backward and adds the rows' gradients in place into one gradient of
the buffer, which each per-block delta tensor takes (a view) once every sum
that read it is done: no copy of the deltas is kept per reader block, and no
gradient per sum and block is added up.

Three parts of the run plug in from their own modules (``hap.run_parts``):
ACDC's recorded early blocks (``hap.known_outputs``), PAHQ's reduced-precision
twin (``hap.twin``) and attribution's probes (``hap.probes``, which with every
mask at 1 use the plain run of ``hap.plain_run`` instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InvalidMaskError
from .graph import Graph
from .models.adapter import ModelAdapter, RunContext
from .models.loading import Model
from .plain_run import Trace, group_of_heads, trace  # noqa: F401 (Trace, trace: hap.ablation's public names too)
from .reference import AblationKind, Reference, block_sums, interchange_reference, mean_outputs  # noqa: F401 (idem)
from .run_parts import BlockPrecision, EarlyBlocks, GivenBlocks, Probing
from .twin import MixedPrecision

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


# Layers whose reader inputs share one product over the rows written before them: fewer
# passes over the delta buffer at the cost of [16 * CHUNK_LAYERS, B, T, D] sums.
CHUNK_LAYERS = 4
# Gathering the used rows of the delta buffer copies them (forward and backward); multiplying over every row
# (the unused ones with mask 0) costs one multiply-add per extra row, reader and element. A copied element
# costs about as much as this many multiply-adds on a CPU (memory traffic against the FLOP rate), so the
# rows are gathered only when the rows left out times the readers exceed it times the rows kept.
GATHER_COST = 32


class _DeltaGradients:
    """The gradient of the run's delta buffer [C, B, T, D]: every masked sum's backward adds its share in
    place (one fused multiply-add per row and sum, no tensor per piece to add up), and each block's delta
    tensor takes its rows once every sum that read them is done (``_Written``). Zeros when first needed,
    afresh in every backward pass (``retain_graph``, ``torch.autograd.grad`` over part of the graph), and
    let go once every piece a sum read has taken its rows (a graph kept alive after its backward, as a
    training loop's last logits until the next step's replace them, does not keep it)."""

    def __init__(self, buffer: Tensor) -> None:
        self.buffer = buffer
        self._gradient: Tensor | None = None
        self._pass: int | None = None
        self._read: set[int] = set()  # the pieces (by number) whose tokens some sum took
        self._taken: set[int] = set()  # those that took their rows in this pass

    def read(self, pieces: list[int]) -> None:
        """Note that a masked sum reads the rows of these pieces."""
        self._read.update(pieces)

    def rows(self, first: int, n: int) -> Tensor:
        """The gradient of buffer rows ``first`` .. ``first + n`` in the current backward pass."""
        current = torch._C._current_graph_task_id()  # as torch.utils.checkpoint tells its passes apart
        if self._gradient is None or current != self._pass:
            self._gradient, self._pass, self._taken = torch.zeros_like(self.buffer), current, set()
        return self._gradient[first : first + n]

    def take(self, piece: int, first: int, n: int) -> Tensor:
        """Piece ``piece``'s rows, once every sum that read them is done (the gradient is let go after the
        last piece: the views handed out keep what they need)."""
        rows = self.rows(first, n)
        self._taken.add(piece)
        if self._taken >= self._read:
            self._gradient = None
        return rows


class _Written(torch.autograd.Function):
    """Marks block delta tensor number ``piece`` as written at buffer rows ``first`` on. Its output, an
    empty token, is an input of every masked sum that reads those rows, so autograd runs this backward
    after all of theirs; it hands the piece the rows' accumulated gradient (a view, no copy)."""

    @staticmethod
    def forward(ctx, values: Tensor, gradients: _DeltaGradients, piece: int, first: int) -> Tensor:
        ctx.gradients, ctx.piece, ctx.first, ctx.shape = gradients, piece, first, values.shape
        return values.new_empty(0)

    @staticmethod
    def backward(ctx, _token: Tensor):
        return ctx.gradients.take(ctx.piece, ctx.first, ctx.shape[0]).view(ctx.shape), None, None, None


class _BufferedSum(torch.autograd.Function):
    """Masked sum over rows of the delta buffer: out[n] = sum_u sub[u, n] * region[rows[u]].

    ``region`` [s, B, T*D] is rows ``first`` .. of the run's delta buffer, which holds the values of the
    pieces (the per-block delta tensors); ``rows`` (None: all s) are the rows with a live entry, ``sub``
    [u, n] (or per example [B, u, n]) their mask entries; ``wanted`` [u, n] bool (None: all) the entries
    whose gradient is needed (2-D only). ``tokens``: the ``_Written`` tokens of the pieces whose rows
    the region holds and that need a gradient. The buffer is written once per row and never rewritten,
    so backward can read ``region`` again; the gradient of the rows is added into ``gradients`` in place,
    which is how it reaches the sources' computations. No copy of the deltas is kept for backward.
    """

    @staticmethod
    def forward(ctx, sub: Tensor, region: Tensor, rows: Tensor | None, wanted: Tensor | None,
                gradients: _DeltaGradients, first: int, *tokens: Tensor) -> Tensor:
        ctx.region, ctx.rows, ctx.wanted = region, rows, wanted  # region not saved: later rows get written
        ctx.gradients, ctx.first = gradients, first
        ctx.save_for_backward(sub)
        data = region if rows is None else region.index_select(0, rows)
        if sub.dim() == 2:
            return sub.transpose(0, 1) @ data.flatten(1)  # [n, B*T*D]
        per_example = data.flatten(2).transpose(0, 1)  # [B, u, T*D]
        return (sub.transpose(1, 2) @ per_example).transpose(0, 1).contiguous().flatten(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (sub,) = ctx.saved_tensors
        rows, region = ctx.rows, ctx.region
        data = region if rows is None else region.index_select(0, rows)
        grad_sub = None
        to_pieces = any(ctx.needs_input_grad[6:])
        target = ctx.gradients.rows(ctx.first, region.shape[0]).view(region.shape[0], -1) if to_pieces else None
        if sub.dim() == 2:
            if ctx.needs_input_grad[0]:
                grad_sub = _mask_gradient(data.flatten(1), grad, ctx.wanted)
            if to_pieces and rows is None:
                target.addmm_(sub, grad)  # [s, B*T*D] += sub [s, n] @ grad [n, B*T*D]
            elif to_pieces:
                target.index_add_(0, rows, sub @ grad)
        else:
            batch = sub.shape[0]
            g = grad.view(grad.shape[0], batch, -1).transpose(0, 1)  # [B, n, T*D]
            if ctx.needs_input_grad[0]:
                grad_sub = data.flatten(2).transpose(0, 1) @ g.transpose(1, 2)
            if to_pieces:
                used = (sub @ g).transpose(0, 1).flatten(1)  # [u, B*T*D]
                target.add_(used) if rows is None else target.index_add_(0, rows, used)
        return (grad_sub, None, None, None, None, None, *(None for _ in ctx.needs_input_grad[6:]))


class _AnswerSum(torch.autograd.Function):
    """The ``logits`` reader's masked sum at one position per example: out[b] = sum_u sub[u] *
    region[rows[u], b, positions[b]], [B, D]; ``sub`` [u] or per example [B, u]. Backward adds the rows'
    gradient into ``gradients`` at those positions alone (``tokens`` as in ``_BufferedSum``)."""

    @staticmethod
    def forward(ctx, sub: Tensor, region: Tensor, rows: Tensor, positions: Tensor, gradients: _DeltaGradients,
                *tokens: Tensor) -> Tensor:
        examples = torch.arange(region.shape[1], device=region.device)
        at_answer = region[rows[:, None], examples[None], positions[None]]  # [u, B, D]
        ctx.save_for_backward(sub, at_answer, rows, examples, positions)
        ctx.gradients, ctx.n_rows = gradients, region.shape[0]
        return torch.einsum("ubd,u->bd" if sub.dim() == 1 else "ubd,bu->bd", at_answer, sub)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sub, at_answer, rows, examples, positions = ctx.saved_tensors
        grad_sub = None
        if ctx.needs_input_grad[0]:
            grad_sub = torch.einsum("ubd,bd->u" if sub.dim() == 1 else "ubd,bd->bu", at_answer, grad)
        if any(ctx.needs_input_grad[5:]):
            share = grad[None] * (sub[:, None, None] if sub.dim() == 1 else sub.t()[:, :, None])  # [u, B, D]
            ctx.gradients.rows(0, ctx.n_rows).index_put_((rows[:, None], examples[None], positions[None]), share,
                                                         accumulate=True)
        return (grad_sub, None, None, None, None, *(None for _ in ctx.needs_input_grad[5:]))


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
    if (data.shape[0] - len(rows)) * len(columns) <= GATHER_COST * len(rows):  # cheaper over every row
        rows = torch.arange(data.shape[0])
    if (grad.shape[0] - len(columns)) * len(rows) <= GATHER_COST * len(columns):
        columns = torch.arange(grad.shape[0])
    part_rows = data if len(rows) == data.shape[0] else data.index_select(0, rows.to(device))
    part_columns = grad if len(columns) == grad.shape[0] else grad.index_select(0, columns.to(device))
    block = part_rows @ part_columns.transpose(0, 1)
    result[rows.to(device)[:, None], columns.to(device)[None, :]] = block
    return result * wanted.to(device=device, dtype=result.dtype)


class MaskedRun:
    """One forward pass in which every reader reads its masked mix of sources.

    The state the blocks share: the delta buffer (one row per contributing
    source, written block by block), the per-block delta tensors (``pieces``,
    what gradients flow back into), and the current chunk's product. A reader's
    input is ``base_b`` plus its masked sum over the rows written so far,
    computed only over the rows with a live entry into the readers that are
    formed; a wanted reader that is not formed reads ``base_b`` alone.

    What plugs in (``hap.run_parts``; the plain masked run's unless given):
    ``early``, the blocks taken as given instead of computed (from ``known``);
    ``precision``, who computes each block; ``probes``, what readers read and
    sources write on top of the masked mix. ``record``: keep what every source
    writes (``run`` returns it).
    """

    def __init__(self, model: Model, graph: Graph, input_ids: Tensor, reference: Reference, mask: Tensor,
                 plan: ComputePlan, record: bool = False, grad_entries: Tensor | None = None,
                 known: GivenBlocks | None = None, precision: MixedPrecision | None = None,
                 probes: Probing | None = None) -> None:
        self.model, self.graph, self.plan = model, graph, plan
        self.adapter, self.device = model.adapter, model.device
        self.batch, self.length = input_ids.shape
        self.ref = reference.fit(self.batch, self.length)
        self.ctx: RunContext = self.adapter.prepare(input_ids.to(self.device))
        self.early: EarlyBlocks = EarlyBlocks() if known is None else known.for_run(mask, plan.live, self.batch)
        self.precision: BlockPrecision = BlockPrecision(self.adapter, self.ctx, model.dtype) if precision is None \
            else precision.for_run(self.adapter, self.ctx, model.dtype, input_ids.to(self.device))
        self.probes: Probing = Probing() if probes is None else probes
        self.group_of_head = group_of_heads(self.adapter, self.device)
        self.recorded = self.ref.rows(self.ref.fixed_outputs).expand(-1, self.batch, -1, -1).clone() if record else None
        # Rows of the delta buffer: the contributing sources, in block order (those of the early blocks
        # excepted: they enter through ``early.inputs``). Entries that are not live are fixed ablated
        # whatever the caller's mask says.
        row_source = plan.contributing.nonzero().flatten()
        row_source = row_source[row_source >= self.early.n_sources]
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
        self.tokens: list[Tensor | None] = []  # each piece's ``_Written`` token (None: it needs no gradient)
        self.gradients = _DeltaGradients(self.buffer)
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
            if len(heads) and not self._is_given(block):
                groups = torch.unique(self.group_of_head[heads])
                active_heads[block] = (heads, groups)
                wanted[block] = torch.cat([readers.start + heads, readers.start + h + groups,
                                           readers.start + h + g + groups])
            if bool(self.plan.active[graph.sources_of_block(block + 1)].any()) and not self._is_given(block + 1):
                wanted[block + 1] = torch.tensor([graph.readers_of_block(block + 1).start], device=device)
        wanted[graph.n_blocks - 1] = torch.tensor([graph.n_readers - 1], device=device)
        return wanted, active_heads

    # -- the delta buffer --------------------------------------------------
    def add_deltas(self, sources: slice, computed_index: Tensor, computed: Tensor | None) -> None:
        """Write this block's rows: computed outputs [n, B, T, D] of its active sources (global
        ``computed_index``) minus the reference, or the fixed outputs of sources not recomputed."""
        ref, device = self.ref, self.device
        index = torch.arange(sources.start, sources.stop, device=device)[self.plan.contributing[sources].to(device)]
        if len(index) == 0:
            return
        if computed is not None:
            computed = self.probes.written(computed_index, computed)
        if computed is not None and self.recorded is not None:
            self.recorded[computed_index] = computed.detach()
        if computed is not None and len(computed_index) == len(index):
            # The usual case (always under interchange): contributing == active.
            values = ref.subtract(computed, sources if len(index) == sources.stop - sources.start else index)
        else:
            values = ref.rows(ref.fixed_outputs[index] - ref.outputs[index]).expand(-1, self.batch, -1, -1)
            if computed is not None:
                rows = torch.searchsorted(index, computed_index)
                values = values.index_put((rows,), ref.subtract(computed, computed_index))
        self.buffer[self.n_rows : self.n_rows + len(index)] = values.detach()
        grad_wanted = values.requires_grad and torch.is_grad_enabled()
        self.tokens.append(_Written.apply(values, self.gradients, len(self.pieces), self.n_rows) if grad_wanted
                           else None)
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
        n_left_out = self.n_rows - first - len(used_rows)
        if n_left_out * len(used_readers) > GATHER_COST * len(used_rows):
            rows = used_rows.to(device)
            sub = sub.index_select(-2, rows)
        if sub.dim() == 3 and self.measuring and bool((sub == sub[:1]).all()):
            sub = sub[0]  # every example alike here (ACDC's copies differ only at the tested reader): one product
        wanted = None if self.grad_rows is None else wanted_entries if rows is None else wanted_entries[used_rows]
        weights = 1 - sub if complement else sub
        tokens = self._tokens_from(first_piece)
        summed = _BufferedSum.apply(weights, self.buffer[first : self.n_rows], rows, wanted, self.gradients, first,
                                    *tokens).view(shape)
        return readers_used, (total - summed if complement else summed)

    def _tokens_from(self, first_piece: int) -> list[Tensor]:
        """The ``_Written`` tokens of the pieces from ``first_piece`` on that need a gradient, for a sum that
        reads their rows."""
        reading = [piece for piece in range(first_piece, len(self.pieces)) if self.tokens[piece] is not None]
        self.gradients.read(reading)
        return [self.tokens[piece] for piece in reading]

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
                      self.early.inputs(readers)):
            if found is not None:
                x = _add_rows(x, len(readers), *found)
        return self.probes.read(x, readers)

    # -- the pass ----------------------------------------------------------
    def run(self, positions: Tensor | None, stop_block: int | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(logits, recorded outputs); with ``stop_block``, stop before computing that block (no logits)."""
        graph, adapter, device = self.graph, self.adapter, self.device
        if not self._is_given(0):
            self.add_deltas(graph.sources_of_block(0), torch.zeros(1, dtype=torch.long, device=device),
                            adapter.embed(self.ctx)[None])
        for layer in range(self.model.layout.n_layers):
            for block in (2 * layer + 1, 2 * layer + 2):
                if stop_block is not None and block >= stop_block:
                    return None, self.recorded
                sources = graph.sources_of_block(block)
                if self._is_given(block):
                    continue  # enters through early.inputs
                if block % 2 == 1:
                    self._attention_block(layer)
                elif block in self.wanted:
                    x = self.inputs(block, self.wanted[block])[0]
                    computing, _, dtype = self.precision.computing(block)
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

    def _is_given(self, block: int) -> bool:
        return block < self.early.until_block

    def _attention_block(self, layer: int) -> None:
        adapter, block = self.adapter, 2 * layer + 1
        sources = self.graph.sources_of_block(block)
        if block not in self.active_heads:
            self.add_deltas(sources, torch.zeros(0, dtype=torch.long, device=self.device), None)
            return
        heads, groups = self.active_heads[block]
        x = self.inputs(block, self.wanted[block])
        row_of_group = torch.searchsorted(groups, self.group_of_head[heads])  # each head's group among those computed
        adapter, ctx, dtype = self.precision.computing(block)
        q, k, v = adapter.head_inputs(layer, x.to(dtype), ctx, heads, groups)
        k, v = k.index_select(1, row_of_group), v.index_select(1, row_of_group)
        computed = adapter.head_outputs(layer, adapter.attend(layer, q, k, v, ctx), heads)
        self.add_deltas(sources, sources.start + heads, computed.to(self.model.dtype))

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
            used_device = used.to(self.device)
            sub = self.mask_rows[..., : self.n_rows, -1].index_select(-1, used_device)  # [(B,) u]
            tokens = self._tokens_from(0)
            base = base + _AnswerSum.apply(sub, self.buffer[: self.n_rows], used_device, positions, self.gradients,
                                           *tokens)
        found = self.early.inputs(logits_reader)
        if found is not None:
            base = base + found[1][0, rows, positions]
        return self.probes.read(base[None, :, None], logits_reader)[0]


def _add_rows(x: Tensor, n: int, positions: Tensor, values: Tensor) -> Tensor:
    """x [1|n, B, T, D] plus ``values`` [u, B, T, D] at rows ``positions`` of n."""
    if len(positions) == n:
        return x + values
    return x.expand(n, *x.shape[1:]).index_add(0, positions, values)


def run_masked(
    model: Model,
    graph: Graph,
    input_ids: Tensor,
    reference: Reference,
    mask: Tensor,
    plan: ComputePlan | None = None,
    positions: Tensor | None = None,
    grad_entries: Tensor | None = None,
    known: GivenBlocks | None = None,
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
    the early blocks recorded by ``hap.known_outputs.record_outputs`` under the
    same masks of those blocks' readers (the caller's promise), taken instead
    of computed.
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
        known.check(graph, input_ids)
    if precision is not None and torch.is_grad_enabled() and mask.requires_grad:
        raise InvalidMaskError("mixed precision is for measuring runs (no gradient); run under torch.no_grad()")
    if known is not None and torch.is_grad_enabled() and mask.requires_grad:
        raise InvalidMaskError("known outputs are for measuring runs (no gradient); run under torch.no_grad()")
    run = MaskedRun(model, graph, input_ids, reference, mask, plan, grad_entries=grad_entries, known=known,
                    precision=precision)
    logits, _ = run.run(positions)
    return logits


# ---------------------------------------------------------------------------
# Mean and zero references: their fixed outputs take one masked run
# ---------------------------------------------------------------------------


def _with_fixed_outputs(model: Model, graph: Graph, kind: AblationKind, outputs: Tensor) -> Reference:
    """Complete a mean/zero reference with z^: one run with every edge ablated."""
    partial = Reference(kind, outputs, block_sums(graph, outputs), outputs)
    length = outputs.shape[2]
    ids = torch.zeros(1, length, dtype=torch.long, device=model.device)
    mask = torch.zeros(graph.real.shape, device=model.device, dtype=outputs.dtype)
    with torch.no_grad():
        run = MaskedRun(model, graph, ids, partial, mask, ComputePlan.build(graph, None, kind), record=True)
        _, fixed = run.run(None)
    return Reference(kind, outputs, partial.block_inputs, fixed)


def mean_reference(model: Model, graph: Graph, reference_ids: Tensor, lengths: Tensor | None = None,
                   batch_size: int = 16) -> Reference:
    """Reference for mean ablation: each source's mean output per position.

    ``reference_ids`` [N, T] (right-padded); ``lengths`` [N] real tokens per
    row (default: all T). Position t averages the rows that reach it.
    """
    outputs = mean_outputs(model, graph, reference_ids, lengths, batch_size)
    return _with_fixed_outputs(model, graph, AblationKind.MEAN, outputs)


def zero_reference(model: Model, graph: Graph, length: int) -> Reference:
    """Reference for zero ablation over sequences of up to ``length`` tokens."""
    outputs = torch.zeros(graph.n_sources, 1, length, model.layout.d_model, device=model.device, dtype=model.dtype)
    return _with_fixed_outputs(model, graph, AblationKind.ZERO, outputs)

"""Outputs of a masked run's early blocks, recorded once and taken by later runs instead of computed.

ACDC tests the edges into one reader at a time; the blocks before that reader's compute the same
outputs in every test, so they are recorded once (``record_outputs``: the masked run stopped before that
block) as ``KnownOutputs``, and each test computes only the blocks from the reader's on. Node importance
does the same per node. ``KnownInputs`` is how one run reads them (its ``EarlyBlocks``): each later
reader's input takes the recorded sums plus the share of the entries where the run's mask differs from
the recorded one (the tested edges).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .ablation import ComputePlan, MaskedRun
from .errors import InvalidMaskError
from .graph import Graph
from .models.loading import Model
from .reference import Reference
from .run_parts import EarlyBlocks
from .twin import MixedPrecision


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

    @classmethod
    def of(cls, graph: Graph, deltas: Tensor, recorded_mask: Tensor, until_block: int) -> KnownOutputs:
        """The known outputs of the deltas of the sources before ``until_block`` under ``recorded_mask``: the
        sums each later reader takes of them."""
        with torch.no_grad():
            later = (graph.reader_block >= until_block).to(deltas.device)
            readers = ((recorded_mask != 0).any(0) & later).nonzero().flatten()
            weights = recorded_mask.index_select(1, readers).T  # [u, n]
            sums = (weights @ deltas.flatten(1)).view(len(readers), *deltas.shape[1:])
        return cls(deltas, recorded_mask, readers, sums, until_block)

    def check(self, graph: Graph, input_ids: Tensor) -> None:
        """Refuse a run these outputs were not recorded for: another graph, or another batch of tokens."""
        n, recorded_batch, length = self.deltas.shape[:3]
        if not 0 <= self.until_block < graph.n_blocks or n < graph.sources_of_block(self.until_block).start:
            raise InvalidMaskError(f"known outputs cover {n} sources, fewer than the blocks before block "
                                   f"{self.until_block} have; record them with record_outputs on this graph")
        if length != input_ids.shape[1] or input_ids.shape[0] % recorded_batch:
            raise InvalidMaskError(f"known outputs were recorded on {recorded_batch} x {length} tokens; the run's "
                                   f"batch {list(input_ids.shape)} must be that batch, or copies of it")

    def for_run(self, mask: Tensor, live: Tensor, batch: int) -> KnownInputs:
        """How a run under ``mask`` ([S, R] or [B, S, R]; entries off the ``live`` [S, R] edges count as 0) on
        a batch of ``batch`` examples reads these outputs."""
        return KnownInputs(self, mask, live, batch)


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
            run = MaskedRun(model, graph, input_ids, reference, mask.detach(), plan, record=True, precision=precision)
            _, recorded = run.run(None, stop_block=until_block)
            deltas = recorded[:n] - run.ref.outputs[:n]
        live = plan.live[:n].to(device=model.device, dtype=model.dtype)
        recorded_mask = mask.detach()[:n].to(device=model.device, dtype=model.dtype) * live
    return KnownOutputs.of(graph, deltas, recorded_mask, until_block)


def known_until(graph: Graph, known: KnownOutputs, block: int) -> KnownOutputs:
    """The outputs ``known`` records, cut to the sources before an earlier ``block`` (what a run that
    differs from the recorded one from that block on may take): one recording of a whole run serves
    the runs that differ from it at any block."""
    if block > known.until_block:
        raise InvalidMaskError(f"known outputs end at block {known.until_block}, before block {block}")
    n = graph.sources_of_block(block).start
    return KnownOutputs.of(graph, known.deltas[:n], known.mask[:n], block)


class KnownInputs(EarlyBlocks):
    """One run's reading of ``KnownOutputs``: the run computes no block before ``until_block`` and keeps no
    delta rows for the ``n_sources`` sources of those blocks; ``inputs`` gives what they add to readers.

    ``diff`` [(B,) n, R]: the run's live mask minus the recorded one, and ``changed`` [n, R] bool (for any
    example), on the known sources' out-edges; ``slot`` [R]: each reader's row in ``known.sums`` (-1: none).
    """

    def __init__(self, known: KnownOutputs, mask: Tensor, live: Tensor, batch: int) -> None:
        self.known = known
        self.until_block = known.until_block
        self.n_sources = n = known.deltas.shape[0]
        self.copies = batch // known.deltas.shape[1]
        device, dtype = known.mask.device, known.mask.dtype
        ours = mask.detach().to(device=device, dtype=dtype)[..., :n, :] * live[:n].to(device=device, dtype=dtype)
        self.diff = ours - known.mask
        changed = self.diff != 0
        self.changed = (changed.any(0) if changed.dim() == 3 else changed).cpu()
        self.slot = torch.full((known.mask.shape[1],), -1, dtype=torch.long)
        self.slot[known.readers.cpu()] = torch.arange(len(known.readers))

    def inputs(self, readers: Tensor) -> tuple[Tensor, Tensor] | None:
        """What the known blocks add to these readers' inputs: (their positions in ``readers`` [u'], sums
        [u', B, T, D]), or None when they add nothing."""
        readers_cpu = readers.cpu()
        slots = self.slot[readers_cpu]
        changed = self.changed[:, readers_cpu]
        used = ((slots >= 0) | changed.any(0)).nonzero().flatten()
        if len(used) == 0:
            return None
        known, copies, device = self.known, self.copies, self.known.sums.device
        values = torch.zeros((len(used), *known.sums.shape[1:]), device=device, dtype=known.sums.dtype)
        have = (slots[used] >= 0).nonzero().flatten()
        if len(have):
            values[have.to(device)] = known.sums.index_select(0, slots[used[have]].to(device))
        values = values.repeat(1, copies, 1, 1) if copies > 1 else values
        for position in (changed[:, used].any(0)).nonzero().flatten().tolist():
            reader = int(readers_cpu[used[position]])
            sources = self.changed[:, reader].nonzero().flatten().to(device)
            weights = self.diff[..., sources, reader]  # [(B,) m]
            deltas = known.deltas.index_select(0, sources)
            deltas = deltas.repeat(1, copies, 1, 1) if copies > 1 else deltas
            pattern = "bm,mbtd->btd" if weights.dim() == 2 else "m,mbtd->btd"
            values[position] += torch.einsum(pattern, weights, deltas)
        return used.to(device), values

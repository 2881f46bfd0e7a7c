"""Gradients with respect to each reader's input: probes on reader inputs, sources moved towards the reference.

A ``Probe`` is a zero tensor added to some readers' inputs, so that after ``loss.backward()`` its
``.grad`` is dL/d(input) of those readers. ``ReaderProbes`` is how a run makes them (it plugs into the
plain run and the masked run as their ``Probing``) and, with an ``output_scale`` per source, moves each
source's output from the reference (a = 0) to what it computes (a = 1) with the gradient passing
straight through: the runs integrated gradients need. ``run_with_probes`` is the pass attribution takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .ablation import ComputePlan, MaskedRun
from .errors import InvalidMaskError
from .graph import Graph
from .models.loading import Model
from .plain_run import plain_run
from .reference import Reference
from .run_parts import Probing


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


def interpolate(reference: Tensor, computed: Tensor, scale: Tensor) -> Tensor:
    """reference + a * (computed - reference) in value, with the gradient of ``computed``
    (straight through), per source: reference/computed [n, B, T, D], scale [n]."""
    a = scale.to(computed.device, computed.dtype)[:, None, None, None]
    if bool((a == 1).all()):
        return computed
    mixed = reference + a * (computed - reference)
    return computed + (mixed - computed).detach()


class _SharedRead(torch.autograd.Function):
    """One input x [1, B, T, D] read by n readers, each with its probe [n, B, T, D] of zeros: x + probe in
    value, returned as a stride-0 expansion of x (no copy; ``hap.models.normed`` then norms and projects it
    once). Backward: each probe gets its reader's gradient, x their sum."""

    @staticmethod
    def forward(ctx, x: Tensor, probe: Tensor) -> Tensor:
        return x.expand(probe.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.sum(0, keepdim=True), grad


class ReaderProbes(Probing):
    """The probes of one run (``probes``, in the order the readers were read) and its interpolated sources.

    ``device``: where the probes are made (the model's); ``output_scale`` [S] (None: every source as
    computed); ``reference`` z~ [S, B|1, T, D] with a row per example of the run's batch, needed with
    ``output_scale``.
    """

    def __init__(self, device: torch.device, output_scale: Tensor | None = None,
                 reference: Tensor | None = None) -> None:
        self.device, self.output_scale, self.reference = device, output_scale, reference
        self.probes: list[Probe] = []

    def read(self, x: Tensor, readers: Tensor, heads: Tensor | None = None) -> Tensor:
        """The inputs x [1|n, B, T, D] of ``readers`` [n] plus a new probe [n, B, T, D]."""
        # zeros without a buffer (a stride-0 expansion of one zero); its gradient is a full tensor
        shape = (len(readers), *x.shape[1:])
        probe = torch.zeros((), device=self.device, dtype=x.dtype).expand(shape).requires_grad_(True)
        self.probes.append(Probe(readers, probe, heads))
        if x.shape[0] == 1 and len(readers) > 1:
            return _SharedRead.apply(x, probe)
        return x + probe

    def interpolates(self, sources: slice) -> bool:
        return self.output_scale is not None and not bool((self.output_scale[sources] == 1).all())

    def written(self, sources: Tensor | slice, computed: Tensor) -> Tensor:
        if self.output_scale is None:
            return computed
        scale = self.output_scale[sources.cpu() if isinstance(sources, Tensor) else sources]
        return interpolate(self.reference[sources], computed, scale)


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
    per query head, see ``plain_run``; only with every edge on).

    After ``loss.backward()``, ``probe.tensor.grad`` holds dL/d(input) of
    ``probe.readers``. ``mask`` None means every edge on: then each reader
    reads the plain residual (no masked sums at all, the fast path attribution
    uses); otherwise the run is ``run_masked``'s. ``output_scale`` [S] (default
    all 1) interpolates each source's output between the reference (a = 0) and
    what it computes in this run (a = 1), with the gradient passing straight
    through as if a = 1: the runs integrated gradients need. With ``record``,
    also returns every source's output in this run [S, B, T, D].
    """
    if mask is not None and per_head_kv:
        raise InvalidMaskError("per-head key/value probes need the all-edges-on run (mask=None)")
    fitted = reference.fit(*input_ids.shape)
    probes = ReaderProbes(model.device, output_scale, None if output_scale is None else fitted.rows(fitted.outputs))
    if mask is None:
        run = plain_run(model, input_ids, probes, positions, per_head_kv=per_head_kv)
        return run.logits, probes.probes, run.outputs.detach() if record else None
    plan = ComputePlan.build(graph, None, reference.kind)
    logits, recorded = MaskedRun(model, graph, input_ids, reference, mask, plan, record, probes=probes).run(positions)
    return logits, probes.probes, recorded

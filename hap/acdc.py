"""ACDC, Automatic Circuit DisCovery (Conmy et al. 2023), on the one ablation primitive.

Start from the full graph. Visit the readers from ``logits`` back to the first layer (latest block first);
for each, try removing each remaining in-edge (latest source first): the edge goes when the metric of the
circuit without it exceeds the current circuit's by less than ``threshold`` (tau), and the circuit then
stays without it. The metric is the mean over the task's examples of KL(full model || circuit) at the
answer position, or of the logit-difference drop (full model's task metric minus the circuit's). Each
edge's score is that rise (its removal's cost when it was tested), so kept edges score at least tau.

Batched exact tests: the tests of one forward are speculative. Forward j of a group of k evaluates the
current circuit without edges 1..j of the group, i.e. it assumes edges 1..j-1 were removed. The edges
are decided in order; at the first edge that is kept the assumption fails, the later results are thrown
away and the next group starts after it. Every decision therefore compares exactly the two circuits the
one-at-a-time sweep compares, and the result is the same (the tests check this against a plain loop).
At high sparsity nearly every edge is removed, so a group decides about k edges per forward.

Readers that feed nothing the logits still read are decided without a forward: the sweep visits readers
latest first, so when it reaches a reader whose sources (a head, a key/value group's heads, an MLP) have
lost every out-edge, removing any of its in-edges leaves the metric exactly unchanged (a rise of 0, below
any tau > 0), and they all go (``reaches_nothing``). The result is the one-at-a-time sweep's.

Searching tau for a circuit of N edges (``search_threshold``) runs several sweeps, made cheaper exactly
and by prediction:

- two sweeps at thresholds tau and tau' decide every edge alike until the first tested edge whose rise
  lies between them (the circuits, hence every measured rise, are the same up to there), so a new sweep
  replays the longest such prefix of an earlier one (``replayed_prefix``) and tests only the rest;
- the next tau is the one the nearest finished sweep's rises predict for N edges (the N-th largest rise),
  kept a tenth (log scale) inside the bracket of thresholds known to keep too many and too few; a sweep's
  result holds for every tau between the largest rise it removed and the smallest it kept, so the bracket
  shrinks to where a different circuit is possible; the search stops at a sweep keeping between N and
  N * (1 + tolerance), or when the bracket is empty;
- once a finished sweep keeps at least N, a sweep whose *decided* kept edges already exceed
  N * (1 + tolerance) is stopped: whatever it decides next, it keeps too many (its state is saved, so a
  later search can resume or replay it).

A run's state (the circuit so far, each edge's score, the position in the sweep) is written to
``acdc_state.pt`` in the run directory after every reader and every few minutes, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .ablation import AblationKind, ComputePlan, run_masked
from .batches import Batch, divergence
from .circuit import Circuit, prune_dangling
from .errors import HapError
from .graph import Graph
from .known_outputs import KnownOutputs, record_outputs
from .models.loading import Model
from .precision import PRECISIONS, ReducedTwin, check_twin_below_threshold, reduced_twin
from .progress import progress_bar, shown
from .tasks import TaskData
from .twin import MixedPrecision

METRICS = ("kl", "logit-diff")
STATE_FILE = "acdc_state.pt"


@dataclass(frozen=True)
class AcdcConfig:
    """Settings of an ACDC run."""

    threshold: float
    metric: str = "kl"
    ablation: AblationKind = AblationKind.INTERCHANGE
    tests_per_forward: int | None = None  # k; default: as many as ``memory_gib`` allows
    memory_gib: float = 1.0
    mixed_precision: str | None = None  # PAHQ: None (off) or a ``hap.precision.PRECISIONS`` kind

    def __post_init__(self) -> None:
        object.__setattr__(self, "ablation", AblationKind(self.ablation))
        if self.metric not in METRICS:
            raise HapError(f"--acdc-metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not self.threshold >= 0 or math.isinf(self.threshold):
            raise HapError(f"--threshold must be a finite number >= 0, got {self.threshold}")
        if self.tests_per_forward is not None and self.tests_per_forward < 1:
            raise HapError(f"--tests-per-forward must be at least 1, got {self.tests_per_forward}")
        if self.mixed_precision is not None and self.mixed_precision not in PRECISIONS:
            raise HapError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ablation": self.ablation.value}

    def decisive(self) -> dict[str, Any]:
        """The settings a sweep's result depends on (not k or memory: the batched sweep is exact)."""
        decisive = {"threshold": self.threshold, "metric": self.metric, "ablation": self.ablation.value}
        return decisive if self.mixed_precision is None else {**decisive, "mixed_precision": self.mixed_precision}


@dataclass
class AcdcState:
    """Where a sweep stands: ``kept`` [S, R] bool, ``scores`` [S, R] (the metric's rise when each tested
    edge was removed; 0 untested), ``position`` edges of ``sweep_order`` decided, ``metric`` of ``kept``."""

    kept: Tensor
    scores: Tensor
    position: int
    metric: float
    forwards: int = 0
    untested: int = 0  # edges removed without a forward: their reader fed nothing the logits still read
    replayed: int = 0  # edges decided by replaying an earlier sweep at another tau (``replayed_prefix``)
    seconds: float = 0.0  # wall-clock time spent on this sweep, summed over every run that resumed it
    # One entry per reader the sweep finished (not replayed ones): name, position after it, in-edges kept,
    # tested (False: it fed nothing, decided untested), forwards and seconds so far, work done and left (a
    # test of an edge into a reader of block b computes the blocks from b on: that many units per edge).
    readers: list[dict[str, Any]] = field(default_factory=list)

    def clock(self, since: float) -> float:
        """Add the time from ``since`` (a ``time.monotonic()`` reading) to ``seconds``; returns now."""
        now = time.monotonic()
        self.seconds += now - since
        return now

    def n_decided_kept(self, n_order: int) -> int:
        """Kept edges among the decided ones (every undecided edge is still kept): a lower bound on the
        finished sweep's size. ``n_order``: the number of edges in the sweep."""
        return int(self.kept.sum()) - (n_order - self.position)

    def decided(self, order: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        """(edges [2, P], rises [P], kept [P]): the decided edges in sweep order (``sweep_order``), P =
        ``position``, with each one's recorded rise and whether it was kept."""
        edges = torch.tensor(order[:self.position], dtype=torch.long).reshape(-1, 2).T
        return edges, self.scores[edges[0], edges[1]], self.kept[edges[0], edges[1]]

    def save(self, path: Path, config: AcdcConfig) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save({"kept": self.kept, "scores": self.scores, "position": self.position, "metric": self.metric,
                    "forwards": self.forwards, "untested": self.untested, "replayed": self.replayed,
                    "seconds": self.seconds, "readers": self.readers,
                    "config": config.decisive()}, temporary)
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path, config: AcdcConfig, graph: Graph) -> AcdcState:
        try:
            saved = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError) as error:
            raise HapError(f"{path}: not a readable ACDC state ({error}); delete it to start the sweep again") \
                from None
        if saved.get("config") != config.decisive() or tuple(saved["kept"].shape) != tuple(graph.real.shape):
            raise HapError(f"{path} was written by a run with other settings or another model; "
                           "use the same command, or --force to start again")
        return cls(saved["kept"], saved["scores"], int(saved["position"]), float(saved["metric"]),
                   int(saved["forwards"]), int(saved.get("untested", 0)), int(saved.get("replayed", 0)),
                   float(saved.get("seconds", 0.0)), list(saved.get("readers", [])))


def sweep_order(graph: Graph) -> list[tuple[int, int]]:
    """Every real edge as (source, reader), in ACDC's order: readers from the last block to the first, and
    each reader's in-edges from the latest source to the earliest."""
    order = []
    for reader in sorted(range(graph.n_readers), key=lambda r: (-int(graph.reader_block[r]), -r)):
        sources = torch.nonzero(graph.real[:, reader]).flatten().tolist()
        order += [(source, reader) for source in sorted(sources, reverse=True)]
    return order


def reaches_nothing(graph: Graph, feeds: Tensor, kept: Tensor, reader: int) -> bool:
    """Whether no source ``reader`` feeds keeps an out-edge in ``kept`` (``feeds``: ``graph.feeds()``). The
    sweep decides readers latest first, so those out-edges are final: nothing downstream reads what the
    reader's input changes, and removing any of its in-edges leaves the metric exactly as it is. In a
    post-normed layer a head's input moves its layer-mates' outputs too, so all of them must be cut off."""
    if reader == graph.n_readers - 1:
        return False  # the logits are the output itself
    fed = feeds[reader]
    block = int(graph.reader_block[reader])
    if graph.layout.heads_normed_together and block % 2 == 1:
        fed = torch.zeros_like(fed)
        fed[graph.sources_of_block(block)] = True
    return not bool(kept[fed].any())


def replayed_prefix(graph: Graph, order: Sequence[tuple[int, int]], earlier: AcdcState,
                    threshold: float) -> tuple[int, Tensor, Tensor]:
    """(p, kept, scores): the first p decisions of a sweep at ``threshold``, replayed from the ``earlier``
    sweep (same model, data and settings, another tau). Up to the first decided edge whose recorded rise
    falls on the other side of ``threshold``, both sweeps have removed the same edges, so they measure the
    same rises; that edge is decided by its recorded rise too, and the new sweep goes on from the next.
    Untested edges (rise recorded as 0) replay as removed, as they are for any tau > 0; a sweep at tau 0
    replays nothing."""
    kept, scores = graph.real.clone(), torch.zeros(graph.real.shape)
    if threshold <= 0 or earlier.position == 0:
        return 0, kept, scores
    edges, rises, kept_then = earlier.decided(order)
    removed = rises < threshold
    differs = torch.nonzero(removed == kept_then).flatten()
    p = int(differs[0]) + 1 if len(differs) else earlier.position
    kept[edges[0, :p][removed[:p]], edges[1, :p][removed[:p]]] = False
    scores[edges[0, :p], edges[1, :p]] = rises[:p]
    return p, kept, scores


def _per_example_metric(config: AcdcConfig, batch: Batch, logits: Tensor, full_metric: Tensor) -> Tensor:
    """[B]: what ACDC keeps low, for logits [B, V] of the batch's examples."""
    if config.metric == "kl":
        return divergence(batch.clean_logits, logits)
    return full_metric - batch.task.logit_diff(logits)


def circuit_metrics(model: Model, graph: Graph, data: Sequence[Batch], config: AcdcConfig,
                    circuits: Sequence[Tensor], live: Tensor, known: Sequence[KnownOutputs] | None = None,
                    precision: MixedPrecision | None = None) -> list[float]:
    """The mean metric of several circuits ([S, R] bool, each within ``live``) over all of ``data``, the
    circuits of one forward batched as per-example masks. ``known``: per batch, the early blocks' outputs
    (``prefix_outputs``), when every circuit equals ``live`` on the readers of those blocks; ``precision``:
    PAHQ's mixed precision."""
    plan = ComputePlan.build(graph, live, config.ablation)
    totals = torch.zeros(len(circuits), dtype=torch.float64)
    n = 0
    k = len(circuits)
    stacked = torch.stack([circuit.to(model.dtype) for circuit in circuits]).to(model.device)  # [k, S, R]
    with torch.no_grad():
        for index, batch in enumerate(data):
            size = batch.clean.shape[0]
            masks = stacked.repeat_interleave(size, dim=0)  # [k*B, S, R]: circuit i on rows i*B .. (i+1)*B
            logits = run_masked(model, graph, batch.clean.repeat(k, 1), batch.reference.of_copies(k), masks, plan,
                                batch.positions.repeat(k),
                                known=None if known is None else known[index], precision=precision)
            full = batch.task.logit_diff(batch.clean_logits)
            copies = logits.view(k, size, -1)
            totals += torch.stack([_per_example_metric(config, batch, copies[i], full).double().sum()
                                   for i in range(k)]).cpu()
            n += size
    if n == 0:
        raise HapError("ACDC needs at least one training example")
    return (totals / n).tolist()


def prefix_outputs(model: Model, graph: Graph, data: Sequence[Batch], config: AcdcConfig, kept: Tensor,
                   reader: int, precision: MixedPrecision | None = None,
                   earlier: Sequence[KnownOutputs] | None = None) -> list[KnownOutputs]:
    """Per batch, what the sources before ``reader``'s block write in the circuit ``kept``. Testing the
    edges into ``reader`` changes only that reader's input, so these outputs hold for all its tests: each
    test then computes the blocks from the reader's on (sparse by then, since later readers were decided
    first) instead of the whole model. ``earlier``: those of a reader of the same block (the sweep has not
    touched the readers before the block since): their outputs are reused, only the sums redone."""
    plan = ComputePlan.build(graph, kept, config.ablation)
    block = int(graph.reader_block[reader])
    mask = kept.to(device=model.device, dtype=model.dtype)
    return [record_outputs(model, graph, batch.clean, batch.reference, mask, block, plan, precision,
                           None if earlier is None else earlier[index]) for index, batch in enumerate(data)]


def tests_per_forward(model: Model, graph: Graph, data: Sequence[Batch], config: AcdcConfig) -> int:
    """k: the number of circuits one forward evaluates, from ``config.memory_gib`` (the delta buffer and the
    repeated reference dominate: about 3 x sources x tokens x d_model floats per example)."""
    if config.tests_per_forward is not None:
        return config.tests_per_forward
    batch = data[0]
    per_copy = 3 * graph.n_sources * batch.clean.numel() * model.layout.d_model * torch.finfo(model.dtype).bits // 8
    return max(1, min(64, int(config.memory_gib * 2**30 // max(1, per_copy))))


def acdc(model: Model, task: TaskData, config: AcdcConfig, data: Sequence[Batch], run_dir: str | Path | None = None,
         resume: bool = False, progress: bool = False, checkpoint_seconds: float = 120.0,
         twin: ReducedTwin | None = None, replay: Sequence[AcdcState] = (),
         stop_above: int | None = None) -> AcdcState:
    """Run the sweep (see the module docstring) and return its final state. With ``config.mixed_precision``
    every block but the tested reader's runs on ``twin`` (default: built here, refused where not faster),
    and each reader's tests compare against the current circuit measured the same way. ``replay``: earlier
    sweeps of the same settings at other thresholds, whose longest shared prefix a fresh sweep replays;
    ``stop_above``: return (unfinished, saved) once more than this many decided edges are kept."""
    progress = shown(progress)  # not inside hap.progress.quiet() (--quiet)
    mark = time.monotonic()  # the sweep's clock (state.seconds) runs from here
    graph = Graph.from_model(model)
    order = sweep_order(graph)
    path = Path(run_dir) / STATE_FILE if run_dir is not None else None
    k = tests_per_forward(model, graph, data, config)
    if config.mixed_precision is not None and twin is None:
        twin = reduced_twin(model, config.mixed_precision, sample=data[0], rows=k * data[0].clean.numel())
    if twin is not None and config.metric == "kl":
        check_twin_below_threshold(model, twin, data[0], config.threshold)
    if resume and path is not None and path.is_file():
        state = AcdcState.load(path, config, graph)
    else:
        replays = [replayed_prefix(graph, order, earlier, config.threshold) for earlier in replay]
        position, kept, scores = max(replays, key=lambda replayed: replayed[0], default=(0, graph.real.clone(),
                                                                                           torch.zeros(graph.real.shape)))
        state = AcdcState(kept, scores, position, circuit_metrics(model, graph, data, config, [kept], kept)[0], 1,
                          replayed=position)
        if progress and position:
            print(f"ACDC (tau {config.threshold:g}): the first {position:,} decisions replayed from an earlier "
                  "sweep at another tau (the same up to there)", flush=True)
        if path is not None:
            mark = state.clock(mark)
            state.save(path, config)
    n_batches = len(data)
    if progress:
        left = len(order) - state.position
        print(f"ACDC (tau {config.threshold:g}): {left:,} edges to test: between {math.ceil(left / k):,} forwards "
              f"(every edge removed) and {left:,} (every edge kept) of {n_batches} batch(es), {k} tests per "
              "forward", flush=True)
    saved_at = time.monotonic()
    known: tuple[int, list[KnownOutputs]] | None = None  # (reader, its prefix outputs per batch)
    feeds = graph.feeds()
    # The bar counts work, not edges: a test computes the blocks from its reader's on, so an edge into a
    # late reader costs a fraction of one into an early reader, and the bar's rate and ETA would mislead.
    work = torch.tensor([graph.n_blocks - int(graph.reader_block[reader]) for _, reader in order]).cumsum(0)

    def done(position: int) -> int:
        return int(work[position - 1]) if position else 0

    def finish_reader(reader: int, tested: bool) -> None:
        state.readers.append({"reader": graph.reader_names[reader], "position": state.position,
                              "kept": int(state.kept[:, reader].sum()), "tested": tested,
                              "forwards": state.forwards, "seconds": round(state.seconds, 2),
                              "work": done(state.position), "work_left": done(len(order)) - done(state.position)})

    with progress_bar(total=done(len(order)), initial=done(state.position), desc="acdc (work: blocks computed)",
                      unit="block", unit_scale=True, disable=not progress) as bar:
        while state.position < len(order) and not (stop_above is not None
                                                    and state.n_decided_kept(len(order)) > stop_above):
            group = order[state.position: state.position + k]
            reader = group[0][1]
            if config.threshold > 0 and reaches_nothing(graph, feeds, state.kept, reader):
                # Every test of this reader would measure a rise of exactly 0 < tau: remove its edges untested.
                while state.position < len(order) and order[state.position][1] == reader:
                    source, _ = order[state.position]
                    state.kept[source, reader] = False
                    state.scores[source, reader] = 0.0
                    state.position += 1
                    state.untested += 1
                bar.update(done(state.position) - bar.n)
                saved_at = mark = state.clock(mark)
                finish_reader(reader, tested=False)
                if path is not None:
                    state.save(path, config)
                continue
            group = [edge for edge in group if edge[1] == reader]  # one reader per group: save between readers
            precision = MixedPrecision(twin, int(graph.reader_block[reader])) if twin is not None else None
            if known is None or known[0] != reader:
                same_block = known is not None and graph.reader_block[known[0]] == graph.reader_block[reader]
                known = (reader, prefix_outputs(model, graph, data, config, state.kept, reader, precision,
                                                known[1] if same_block else None))
                if precision is not None:  # the baseline in this reader's precision assignment
                    state.metric = circuit_metrics(model, graph, data, config, [state.kept], state.kept, known[1],
                                                   precision)[0]
                    state.forwards += 1
            circuits = []
            trial = state.kept.clone()
            for source, target in group:
                trial[source, target] = False
                circuits.append(trial.clone())
            values = circuit_metrics(model, graph, data, config, circuits, state.kept, known[1], precision)
            state.forwards += 1
            baseline = state.metric
            for (source, target), value in zip(group, values):
                rise = value - baseline
                state.scores[source, target] = rise
                state.position += 1
                if rise < config.threshold:  # removed: the next test in the group assumed exactly this
                    state.kept[source, target] = False
                    state.metric = baseline = value
                else:
                    break  # kept: the later tests assumed its removal; redo them from the current circuit
            bar.update(done(state.position) - bar.n)
            done_reader = state.position == len(order) or order[state.position][1] != reader
            too_many = stop_above is not None and state.n_decided_kept(len(order)) > stop_above
            if done_reader or too_many or time.monotonic() - saved_at > checkpoint_seconds:
                saved_at = mark = state.clock(mark)
                if done_reader:
                    finish_reader(reader, tested=True)
                if path is not None:
                    state.save(path, config)
    state.clock(mark)
    if path is not None:
        state.save(path, config)  # with the time since the last save
    return state


def acdc_circuit(model: Model, task: TaskData, config: AcdcConfig, state: AcdcState,
                 n_edges: int | None = None) -> Circuit:
    """The circuit of a finished sweep: its kept edges (or, with ``n_edges``, the ``n_edges`` kept edges of
    largest score), dangling edges dropped; scores are each edge's metric rise."""
    graph = Graph.from_model(model)
    chosen = state.kept & graph.real
    if n_edges is not None and int(chosen.sum()) > n_edges:
        ranked = torch.where(chosen, state.scores, torch.tensor(float("-inf"))).flatten()
        top = torch.zeros(ranked.numel(), dtype=torch.bool)
        top[ranked.argsort(descending=True)[:n_edges]] = True
        chosen = top.view(chosen.shape) & chosen
    kept = prune_dangling(graph, chosen)
    settings = {**config.to_dict(), "n_kept_by_sweep": int(state.kept.sum()), "forwards": state.forwards,
                "n_pruned_dangling": int(chosen.sum() - kept.sum())}
    if n_edges is not None:
        settings["n_edges_requested"] = n_edges
    return Circuit(model.name, task.name, "acdc", model.layout, state.scores.clone(), kept, config=settings)


@dataclass
class Sweep:
    """One sweep of a threshold search: its settings, its (possibly stopped) state, whether it finished."""

    config: AcdcConfig
    state: AcdcState
    finished: bool
    folder: str  # its state's folder in the run directory

    def summary(self) -> dict[str, Any]:
        return {"threshold": self.config.threshold, "kept": int(self.state.kept.sum()), "finished": self.finished,
                "decided": self.state.position, "replayed": self.state.replayed, "forwards": self.state.forwards,
                "seconds": round(self.state.seconds, 1),
                "folder": self.folder}

    def same_decisions(self, order: Sequence[tuple[int, int]]) -> tuple[float, float]:
        """(a, b): every tau in (a, b] decides this sweep's decided edges exactly as it did (an edge goes
        when its rise is below tau, so a is the largest rise of a removed edge, b the smallest of a kept
        one), so a sweep there ends (or stops) with this one's circuit."""
        _, rises, kept = self.state.decided(order)
        below = float(rises[~kept].max()) if bool((~kept).any()) else -math.inf
        above = float(rises[kept].min()) if bool(kept.any()) else math.inf
        return below, above


def next_threshold(sweeps: Sequence[Sweep], n_edges: int, low: float, high: float) -> float:
    """The next tau to try for about ``n_edges`` kept edges, strictly inside (low, high) (thresholds known
    to keep too many and too few): the ``n_edges``-th largest rise of the finished sweep nearest the bracket
    (removing an edge of smaller rise costs less than tau), pulled at least a tenth of the bracket (on a log
    scale) inside it; the bracket's log midpoint when nothing has finished yet or the prediction is not a
    positive number."""
    middle = math.sqrt(low * high)
    finished = [sweep for sweep in sweeps if sweep.finished]
    if not finished:
        return middle
    nearest = min(finished, key=lambda sweep: abs(math.log(sweep.config.threshold / middle)))
    rises = nearest.state.scores[nearest.state.scores > 0].sort(descending=True).values
    if len(rises) == 0:
        return middle
    predicted = float(rises[min(n_edges, len(rises)) - 1])
    if not predicted > 0:
        return middle
    margin = (math.log(high) - math.log(low)) / 10
    return math.exp(min(max(math.log(predicted), math.log(low) + margin), math.log(high) - margin))


def search_threshold(model: Model, task: TaskData, config: AcdcConfig, data: Sequence[Batch], n_edges: int,
                     run_dir: str | Path | None = None, resume: bool = False, runs: int = 6, low: float = 1e-5,
                     high: float = 1.0, tolerance: float = 0.1, progress: bool = False,
                     twin: ReducedTwin | None = None, start: float | None = None,
                     ) -> tuple[AcdcConfig, AcdcState, list[Sweep]]:
    """Up to ``runs`` sweeps at thresholds in (low, high) (see the module docstring: predicted tau, replayed
    prefixes, sweeps stopped once they keep too many), the first at ``start`` (default: the log midpoint),
    each resumable in its own ``tau-<value>`` folder, for
    a circuit of about ``n_edges``; stops at a sweep keeping between ``n_edges`` and ``n_edges * (1 +
    tolerance)``, or when no tau is left between the thresholds known to keep too many and too few (each
    sweep's result holds on an interval of tau, ``Sweep.same_decisions``). If no sweep ended within the
    tolerance, the stopped sweep with the fewest decided kept edges is finished when it may beat the
    finished ones. Returns the finished sweep with the fewest kept edges at or above ``n_edges`` (else the
    one with the most), to be cut to ``n_edges`` by ``acdc_circuit``, and every sweep run."""
    if tolerance < 0:
        raise HapError(f"--threshold-tolerance must be >= 0, got {tolerance}")
    progress = shown(progress)  # not inside hap.progress.quiet() (--quiet)
    if start is not None and not low < start < high:
        raise HapError(f"--threshold-start must lie between {low:g} and {high:g}, got {start:g}")
    graph = Graph.from_model(model)
    order = sweep_order(graph)
    enough_at_most = math.floor(n_edges * (1 + tolerance))
    if config.mixed_precision is not None and twin is None:
        rows = tests_per_forward(model, graph, data, config) * data[0].clean.numel()
        twin = reduced_twin(model, config.mixed_precision, sample=data[0], rows=rows)

    def run(threshold: float, replay: Sequence[AcdcState], stop_above: int | None, name: str) -> Sweep:
        trial = AcdcConfig(threshold=threshold, metric=config.metric, ablation=config.ablation,
                           tests_per_forward=config.tests_per_forward, memory_gib=config.memory_gib,
                           mixed_precision=config.mixed_precision)
        folder = Path(run_dir) / name if run_dir is not None else None
        state = acdc(model, task, trial, data, folder, resume=resume, progress=progress, twin=twin, replay=replay,
                     stop_above=stop_above)
        sweep = Sweep(trial, state, state.position == len(order), name)
        if progress:
            told = f"{int(state.kept.sum()):,} edges kept" if sweep.finished else \
                f"stopped: {state.n_decided_kept(len(order)):,} decided edges kept already"
            print(f"ACDC tau {threshold:g}: {told} (want {n_edges:,}; {state.replayed:,} decisions replayed, "
                  f"{state.forwards:,} forwards)", flush=True)
        return sweep

    def kept(sweep: Sweep) -> int:
        return int(sweep.state.kept.sum())

    if progress:
        print(f"ACDC search for {n_edges:,} of {len(order):,} edges: up to {runs} sweeps at tau in [{low:g}, {high:g}] "
              f"(each prints its forwards; about {len(order):,} tests at most), stopping within "
              f"{n_edges:,}..{enough_at_most:,} edges", flush=True)
    sweeps: list[Sweep] = []
    for _ in range(runs):
        if not high > low * (1 + 1e-6):
            break  # every tau left decides like a sweep already run
        known_enough = any(sweep.finished and kept(sweep) >= n_edges for sweep in sweeps)
        tau = float(f"{start if start is not None and not sweeps else next_threshold(sweeps, n_edges, low, high):.6g}")
        sweep = run(tau, [sweep.state for sweep in sweeps], enough_at_most if known_enough else None, f"tau-{tau:.6g}")
        sweeps.append(sweep)
        if sweep.finished and n_edges <= kept(sweep) <= enough_at_most:
            break
        below, above = sweep.same_decisions(order)
        if kept(sweep) > n_edges:  # a stopped sweep keeps more than it has decided: too many as well
            low = max(low, sweep.config.threshold, above)
        else:
            high = min(high, sweep.config.threshold, max(below, low))
    enough = [sweep for sweep in sweeps if sweep.finished and kept(sweep) >= n_edges]
    stopped = [sweep for sweep in sweeps if not sweep.finished]
    best = min(enough, key=kept) if enough else None
    if stopped and (best is None or kept(best) > enough_at_most):
        fewest = min(stopped, key=lambda sweep: (sweep.state.n_decided_kept(len(order)), kept(sweep)))
        if best is None or fewest.state.n_decided_kept(len(order)) < kept(best):
            # Replays it all, then goes on; its own folder, so a resumed search retraces the same sweeps.
            sweeps.append(run(fewest.config.threshold, [fewest.state], None, f"{fewest.folder}-finished"))
            enough = [sweep for sweep in sweeps if sweep.finished and kept(sweep) >= n_edges]
    finished = [sweep for sweep in sweeps if sweep.finished]
    chosen = min(enough, key=kept) if enough else max(finished, key=kept)
    return chosen.config, chosen.state, sweeps

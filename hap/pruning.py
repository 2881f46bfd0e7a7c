"""Edge Pruning (Bhaskar et al. 2024): learn a hard-concrete mask per live edge.

Loss = KL(full model || circuit) at the answer position + l1 (s - t) + l2 (s - t)^2,
where s is the expected edge sparsity over *all* real edges (edges that are not
live are fixed ablated and count as removed), t the target warmed up linearly
from the run's initial expected sparsity (about 0 from the usual N(10, 0.01)
start; higher after a warm start or with few candidates), and l1, l2 are trained
by gradient ascent. Masks and lambdas use AdamW
with the published GPT-2 settings as defaults (lr 0.8, 3000 steps, target
warm-up 2500 steps, lr warm-up 200); shorter runs scale both warm-ups with the
step count. The final circuit keeps the edges whose deterministic mask is above
the threshold (found by binary search) that keeps exactly the target count.

Convergence: binarisation is only harmless when the expected sparsity already
sits at the target, i.e. the masks were trained at the sparsity the circuit
will have. The Lagrangian alone tracks a moving target poorly: Adam moves each
lambda by about its learning rate whatever the gap, so the multipliers swing
and the expected sparsity oscillates around the target with a period of a
hundred steps or more (on SmolLM2 IOI it ended 1.2 points short after 150
steps; the published sweeps ask for targets above 1.0 to force sparsity).
So once the target has finished warming up, every step ends with a
projection onto the constraint: all live log alphas are shifted by one common
amount (found by bisection) so that the expected sparsity equals the target.
A uniform shift keeps the masks' ranking; the KL keeps training which edges
are open, now at exactly the target sparsity. With ``project_during_warmup``
(HAP's default) the warm-up steps end projected too, onto the warming target,
and the projection alone holds the constraint (the multipliers stay at 0):
a warm start sits near a circuit already, and left to the Lagrangian its
masks drift open (expected sparsity 0.90 against a target of 0.93-0.95 on
SmolLM2 greater-than), so the circuit read off them in mid-run is poor until
the warm-up ends (benchmarks/README.md, converged.py). A run whose planned steps end
farther than ``converge_tolerance`` from the target (only possible when the
warm-up lasts the whole run) goes on at the target, for at most
``max_extra_steps`` more; the result says whether it got there.

Every step runs the ablation primitive once with the sampled masks, over the
plan of the edges whose sampled gate is not exactly 0 (a clamped gate adds
nothing and has no gradient), so a step gets cheaper as the masks sparsify. Batches
(references and the full model's logits) come from a ``TaskBatches``, made on
demand and kept within a memory budget. With a ``live`` set (HAP's
candidates), the compute plan skips every source and reader the live edges
cannot change. With a ``HeldOutMonitor``, every ``eval_every`` steps the
circuit read off the current masks is measured on a fixed batch of test
examples and logged (``test_kl``, ``test_faithfulness``, ...), so over-fitting
shows while it happens.

With ``readoff_every``, the circuit read off the masks every that many steps is
recorded whenever it differs from those recorded before, and ``best_read_off``
returns whichever of them and the final one fits the training examples best.
Gradient-trained gates can find a chain that only helps complete and then lose
it: on tracr-reverse under zero ablation HAP's read-off is the true circuit
(training KL 0) from step 180 to 290, until the Lagrange multiplier's swing
pushes the expected sparsity 0.05 past its target and shuts two of the chain's
links for good (final training KL 0.09; benchmarks/tracr/chains-reverse-zero-hap.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .ablation import AblationKind, ComputePlan, run_masked
from .batches import Batch, ReferenceCache, TaskBatches, divergence
from .circuit import Circuit, prune_dangling, write_atomically
from .distributed import Ranks
from .errors import HapError
from .evaluation import HeldOutMonitor, evaluate_masks
from .graph import Graph
from .models.loading import Model
from .progress import progress_bar
from .tasks import TaskData

STRETCH_LOW, STRETCH_HIGH = -0.1, 1.1
# log alpha is kept in [-10, 10] after every step (the warm-start recipe's range): beyond it the
# keep probability saturates and the sparsity penalty can no longer move a gate back.
LOG_ALPHA_LIMIT = 10.0


@dataclass(frozen=True)
class PruningConfig:
    """Settings of an Edge Pruning run; defaults are Bhaskar et al.'s GPT-2 settings."""

    target_sparsity: float = 0.95
    steps: int = 3000
    lr: float = 0.8
    lambda_lr: float = 0.8
    lr_warmup: int | None = None  # default: steps / 15 (200 of 3000)
    sparsity_warmup: int | None = None  # default: 5/6 of the steps (2500 of 3000)
    batch_size: int = 32
    beta: float = 2.0 / 3.0
    init_mean: float = 10.0
    init_std: float = 0.01
    node_masks: bool = False
    node_target_sparsity: float = 0.0
    ablation: str = "interchange"
    seed: int = 0
    converge_tolerance: float = 0.005  # end within 0.5 percentage points of the target expected sparsity
    max_extra_steps: int | None = None  # default: half the steps, spent at the target only if needed
    eval_every: int | None = None  # held-out monitor period; default: steps / 25
    project_during_warmup: bool = False  # also hold the warming target exactly (every step ends projected)
    readoff_every: int | None = None  # record the read-off circuit every N steps (best_read_off picks among them)

    def __post_init__(self) -> None:
        if not 0.0 < self.target_sparsity < 1.0:
            raise HapError(f"the target sparsity must be in (0, 1), got {self.target_sparsity}")
        if self.steps <= 0:
            raise HapError(f"--steps must be positive, got {self.steps}")
        if self.batch_size < 1:
            raise HapError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.node_target_sparsity < 1.0:
            raise HapError(f"--node-sparsity must be in [0, 1), got {self.node_target_sparsity}")
        if not 0.0 < self.converge_tolerance < 1.0:
            raise HapError(f"the convergence tolerance must be in (0, 1), got {self.converge_tolerance}")
        if self.max_extra_steps is not None and self.max_extra_steps < 0:
            raise HapError(f"--max-extra-steps must be 0 or more, got {self.max_extra_steps}")
        if self.eval_every is not None and self.eval_every < 1:
            raise HapError(f"--eval-every must be at least 1, got {self.eval_every}")
        if self.readoff_every is not None and self.readoff_every < 1:
            raise HapError(f"--readoff-every must be at least 1 (or 0 on the command line: never), "
                           f"got {self.readoff_every}")

    @property
    def lr_warmup_steps(self) -> int:
        return self.lr_warmup if self.lr_warmup is not None else max(1, round(self.steps / 15))

    @property
    def sparsity_warmup_steps(self) -> int:
        return self.sparsity_warmup if self.sparsity_warmup is not None else max(1, round(self.steps * 5 / 6))

    @property
    def extra_steps(self) -> int:
        return self.max_extra_steps if self.max_extra_steps is not None else self.steps // 2

    @property
    def eval_period(self) -> int:
        return self.eval_every if self.eval_every is not None else max(1, round(self.steps / 25))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# Hard-concrete gates
# ---------------------------------------------------------------------------


def gate_stretched(log_alpha: Tensor, beta: float, generator: torch.Generator) -> Tensor:
    """A stretched hard-concrete sample per gate, before clamping to [0, 1]."""
    u = torch.rand(log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(log_alpha.device)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / beta)
    return s * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW


def gate_sample(log_alpha: Tensor, beta: float, generator: torch.Generator) -> Tensor:
    """A stretched, clamped hard-concrete sample in [0, 1] per gate."""
    return gate_stretched(log_alpha, beta, generator).clamp(0.0, 1.0)


def gate_deterministic(log_alpha: Tensor) -> Tensor:
    """The gate at evaluation: sigmoid(log alpha), stretched and clamped."""
    return (torch.sigmoid(log_alpha) * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0.0, 1.0)


def gate_keep_probability(log_alpha: Tensor, beta: float) -> Tensor:
    """P(gate > 0): the expected fraction of samples in which the edge is kept."""
    return torch.sigmoid(log_alpha - beta * math.log(-STRETCH_LOW / STRETCH_HIGH))


def log_alpha_for_probability(p: Tensor, beta: float) -> Tensor:
    """Invert ``gate_keep_probability``: the log alpha whose gate is non-zero with probability p."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p)) + beta * math.log(-STRETCH_LOW / STRETCH_HIGH)


def binarize(values: Tensor, n_keep: int) -> Tensor:
    """Bool mask keeping the ``n_keep`` largest values, by binary search on a threshold.

    Ties at the threshold can leave the count one or more off; the search takes
    the threshold whose count is closest to ``n_keep``.
    """
    if n_keep <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if n_keep >= values.numel():
        return torch.ones_like(values, dtype=torch.bool)
    low, high = float(values.min()) - 1.0, float(values.max())
    for _ in range(100):  # keep(low) >= n_keep > keep(high)
        middle = (low + high) / 2
        if int((values > middle).sum()) >= n_keep:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    below, above = values > low, values > high
    return below if abs(int(below.sum()) - n_keep) <= abs(int(above.sum()) - n_keep) else above


# ---------------------------------------------------------------------------
# Training state and checkpoints
# ---------------------------------------------------------------------------


@dataclass
class PruningState:
    """Everything a run needs to continue: masks, lambdas, optimisers, noise RNG, step."""

    step: int
    log_alpha: Tensor  # [E] one per live edge
    node_log_alpha: Tensor | None  # [S] one per source, when node masks are on
    lambdas: Tensor  # [4]: edge l1, l2, node l1, l2
    start_sparsity: float  # expected sparsity at step 0: the target warms up from here
    mask_optimizer: torch.optim.Optimizer
    lambda_optimizer: torch.optim.Optimizer
    generator: torch.Generator
    seconds: float = 0.0  # training time so far, across resumptions (held-out measurements excluded)
    # Masks at the steps whose read-off circuit was new (``PruningConfig.readoff_every``): step, log alpha [E],
    # node log alpha [S] or None, and the circuit read off them ([S, R] bool).
    read_offs: list[tuple[int, Tensor, Tensor | None, Tensor]] = field(default_factory=list)


def _new_state(log_alpha: Tensor, node_log_alpha: Tensor | None, config: PruningConfig,
               start_sparsity: float) -> PruningState:
    parameters = [log_alpha] + ([node_log_alpha] if node_log_alpha is not None else [])
    lambdas = torch.zeros(4, requires_grad=True)
    mask_optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    lambda_optimizer = torch.optim.AdamW([lambdas], lr=config.lambda_lr, weight_decay=0.0, maximize=True)
    generator = torch.Generator().manual_seed(config.seed)
    return PruningState(0, log_alpha, node_log_alpha, lambdas, start_sparsity, mask_optimizer, lambda_optimizer,
                        generator)


def save_checkpoint(path: Path, state: PruningState, fingerprint: dict[str, Any]) -> None:
    """Write the state atomically (temporary file + rename)."""
    payload = {
        "step": state.step,
        "log_alpha": state.log_alpha.detach().cpu(),
        "node_log_alpha": None if state.node_log_alpha is None else state.node_log_alpha.detach().cpu(),
        "lambdas": state.lambdas.detach().cpu(),
        "start_sparsity": state.start_sparsity,
        "mask_optimizer": state.mask_optimizer.state_dict(),
        "lambda_optimizer": state.lambda_optimizer.state_dict(),
        "generator": state.generator.get_state(),
        "seconds": state.seconds,
        "read_offs": list(state.read_offs),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


def load_checkpoint(path: Path, fingerprint: dict[str, Any], config: PruningConfig,
                    device: torch.device | str) -> PruningState:
    """Read a checkpoint, refusing one made for another model, task or configuration."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(payload["fingerprint"])
    except Exception as error:  # truncated, garbled or not a checkpoint at all: torch raises many kinds
        raise HapError(
            f"{path} is damaged ({type(error).__name__}); a run killed mid-write leaves the previous checkpoint "
            "intact, so this file was changed by something else: delete it and start the run again with --force"
        ) from None
    # A setting added after the checkpoint was written is absent from it: the run used that setting's default.
    defaults = {f.name: f.default for f in fields(PruningConfig)}
    saved = {**{key: defaults[key] for key in fingerprint if key not in saved and key in defaults}, **saved}
    if saved != fingerprint:
        differences = sorted(key for key in set(saved) | set(fingerprint) if saved.get(key) != fingerprint.get(key))
        hint = ""
        if differences == ["project_during_warmup"] and not saved["project_during_warmup"]:
            hint = " (a hap run from before 2026-12-06, when holding the warming target became hap's default: " \
                   "resume it with --no-project-warmup)"
        if differences == ["readoff_every"] and saved["readoff_every"] is None:
            hint = " (a run from before 2026-12-07, when recording read-offs became the default on tracr models: " \
                   "resume it with --readoff-every 0)"
        raise HapError(
            f"{path.parent} was made with other settings ({', '.join(differences)} differ); resume with the "
            f"same model, task and settings, or start a new run in another --out{hint}"
        )
    log_alpha = payload["log_alpha"].to(device).requires_grad_(True)
    node = payload["node_log_alpha"]
    node = None if node is None else node.to(device).requires_grad_(True)
    state = _new_state(log_alpha, node, config, float(payload["start_sparsity"]))
    with torch.no_grad():
        state.lambdas.copy_(payload["lambdas"])
    state.mask_optimizer.load_state_dict(payload["mask_optimizer"])
    state.lambda_optimizer.load_state_dict(payload["lambda_optimizer"])
    state.generator.set_state(payload["generator"])
    state.step = int(payload["step"])
    state.seconds = float(payload.get("seconds", 0.0))
    state.read_offs = [(int(step), log_alpha, node, kept)
                       for step, log_alpha, node, kept in payload.get("read_offs", [])]
    return state


# ---------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------


@dataclass
class PruningResult:
    """The learned masks and the circuit read off them."""

    in_graph: Tensor  # [S, R] bool, binarised at the target, dangling edges dropped
    mask_values: Tensor  # [S, R] keep probability P(gate > 0) (0 off the live edges)
    expected_sparsity: float  # before binarisation, at the end of the run
    target_sparsity: float
    converged: bool  # expected sparsity ended within the tolerance of the target
    n_pruned_dangling: int
    steps: int
    seconds_per_step: float
    seconds: float  # training time of the whole run, across resumptions
    # With readoff_every: (step, in_graph, mask_values, n_pruned_dangling) of each distinct circuit read off
    # along the run, by step, the final one last; best_read_off chooses among them.
    read_offs: list[tuple[int, Tensor, Tensor, int]] = field(default_factory=list)
    read_off_step: int | None = None  # the step the circuit was read off at (None: the last)
    read_off_check: dict[str, Any] | None = None  # best_read_off's record: steps and training losses

    @property
    def sparsity_gap(self) -> float:
        """Expected minus target sparsity at the end (negative: fewer edges removed than asked)."""
        return self.expected_sparsity - self.target_sparsity


def _expected_sparsity(state: PruningState, config: PruningConfig, n_edges: int) -> Tensor:
    return 1.0 - gate_keep_probability(state.log_alpha, config.beta).sum() / n_edges


def _learning_rate(config: PruningConfig, step: int) -> float:
    return config.lr * min(1.0, (step + 1) / config.lr_warmup_steps)


def _target(state: PruningState, config: PruningConfig, step: int) -> float:
    warmed = min(1.0, step / config.sparsity_warmup_steps)
    return state.start_sparsity + (config.target_sparsity - state.start_sparsity) * warmed


def project_to_sparsity(log_alpha: Tensor, target: float, n_edges: int, beta: float) -> Tensor:
    """Shift every log alpha by one amount (then clamp to the usual range) so the expected sparsity
    1 - sum(P(gate > 0)) / ``n_edges`` equals ``target``; the shifted values [E].

    The expected sparsity falls monotonically as the shift grows, so bisection finds it. A uniform
    shift keeps the ranking, hence the circuit a binarisation would read off.
    """
    wanted = (1.0 - target) * n_edges  # kept edges in expectation

    def kept(shift: float) -> float:
        shifted = (log_alpha + shift).clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)
        return float(gate_keep_probability(shifted, beta).sum())

    low, high = -4 * LOG_ALPHA_LIMIT, 4 * LOG_ALPHA_LIMIT  # kept(low) <= wanted <= kept(high)
    for _ in range(50):
        middle = (low + high) / 2
        if kept(middle) > wanted:
            high = middle
        else:
            low = middle
    return (log_alpha + (low + high) / 2).clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)


def step_plan_of(graph: Graph, live: Tensor, stretched: Tensor, node_stretched: Tensor | None,
                 kind: AblationKind) -> tuple[ComputePlan, Tensor]:
    """The plan of one training step and the mask entries whose gradient it needs, from its gate samples.

    ``stretched`` [E] are the live edges' samples before clamping (in ``live``'s
    order), ``node_stretched`` [S] the sources' ones. A gate whose sample fell
    outside [0, 1] is clamped and has no gradient: one clamped at 0 also adds
    nothing, so the plan leaves its edge out (the sums shrink as the masks
    sparsify); one clamped at 1 needs no mask gradient. Both are exact: clamp's
    gradient passes at the bounds, so a sample exactly at 0 or 1 still counts.
    Returns (plan, ``grad_entries`` [S, R] bool).
    """
    index = live.nonzero(as_tuple=True)
    stretched = stretched.detach().cpu()
    step_live = torch.zeros_like(live).index_put(index, stretched >= 0)
    grad_entries = torch.zeros_like(live).index_put(index, (stretched >= 0) & (stretched <= 1))
    if node_stretched is not None:
        node = node_stretched.detach().cpu()
        step_live &= (node >= 0)[:, None]
        grad_entries = (grad_entries | ((node >= 0) & (node <= 1))[:, None]) & step_live
    return ComputePlan.build(graph, step_live, kind), grad_entries


def _done(state: PruningState, config: PruningConfig, n_edges: int) -> bool:
    """Planned steps done and the expected sparsity within tolerance of the target, or the extra steps spent."""
    if state.step < config.steps:
        return False
    if state.step >= config.steps + config.extra_steps:
        return True
    with torch.no_grad():
        gap = float(_expected_sparsity(state, config, n_edges)) - config.target_sparsity
    return abs(gap) <= config.converge_tolerance


def prune(
    model: Model,
    task: TaskData,
    config: PruningConfig,
    live: Tensor | None = None,
    init_log_alpha: Tensor | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_seconds: float = 180.0,
    checkpoint_every: int | None = None,
    data: Sequence[Batch] | None = None,
    on_step: Callable[[int], None] | None = None,
    progress: bool = False,
    monitor: HeldOutMonitor | None = None,
    snapshot_every: int | None = None,
    ranks: Ranks | None = None,
) -> PruningResult:
    """Learn edge masks over the ``live`` edges (default: every real edge) and binarise them.

    ``init_log_alpha`` [S, R] (HAP's warm start) replaces the N(init_mean,
    init_std) initialisation on the live edges. With ``run_dir``, writes
    ``train_log.jsonl`` (one line per step) and ``checkpoint.pt`` every
    ``checkpoint_every`` steps or ``checkpoint_seconds`` of work (and on an
    interrupt); ``resume`` continues from it. ``data``: the task's batches
    (default: a ``TaskBatches`` within the default memory budget).
    ``monitor``: held-out examples measured every ``config.eval_period`` steps.
    ``snapshot_every``: also keep the masks every N steps in ``run_dir/snapshots/``
    (``step-000100.pt``: step, log alpha [E] and the live edges' indices), to
    look at or re-time the circuit as it was then.
    ``ranks``: data parallel under torchrun. Every process takes its share of each step's batch
    (``TaskBatches.shard``), the KL gradients of the masks are summed over the processes, and the
    penalty's are added once, so every process holds the same masks and multipliers as one process with
    the whole batch would; only the main process logs, measures the monitor and writes checkpoints.
    """
    ranks = ranks if ranks is not None else Ranks()
    graph = Graph.from_model(model)
    device = model.device
    live = graph.real.clone() if live is None else live.cpu().bool() & graph.real
    n_keep = round((1.0 - config.target_sparsity) * graph.n_edges)
    if int(live.sum()) < n_keep:
        raise HapError(
            f"only {int(live.sum())} candidate edges, fewer than the {n_keep} the target sparsity "
            f"{config.target_sparsity} keeps; raise --candidates or the target sparsity"
        )
    sources, readers = live.nonzero(as_tuple=True)
    kind = AblationKind(config.ablation)
    fingerprint = {"model": model.name, "task": task.name, "n_examples": len(task), "n_live": int(live.sum()),
                   "monitor": monitor.n_examples if monitor is not None else 0, **config.to_dict()}

    run_path = Path(run_dir) if run_dir is not None else None
    checkpoint = run_path / "checkpoint.pt" if run_path is not None else None
    if resume and checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, fingerprint, config, device)
    else:  # a fresh run, or one stopped before its first checkpoint: from step 0 (its log is cut below)
        if resume and progress and ranks.is_main:
            print(f"{run_dir} has no checkpoint.pt yet (stopped before the first): pruning starts from step 0",
                  flush=True)
        generator = torch.Generator().manual_seed(config.seed)
        if init_log_alpha is not None:
            log_alpha = init_log_alpha.cpu()[sources, readers].float().clone()
        else:
            log_alpha = config.init_mean + config.init_std * torch.randn(len(sources), generator=generator)
        node = None
        if config.node_masks:
            node = config.init_mean + config.init_std * torch.randn(graph.n_sources, generator=generator)
            node = node.to(device).requires_grad_(True)
        n_edges = graph.n_edges
        start = 1.0 - float(gate_keep_probability(log_alpha, config.beta).sum()) / n_edges
        state = _new_state(log_alpha.to(device).requires_grad_(True), node, config, start)
    if run_path is not None and ranks.is_main:
        run_path.mkdir(parents=True, exist_ok=True)
        _truncate_log(run_path / "train_log.jsonl", state.step)
    writing = run_path is not None and ranks.is_main

    if data is None:
        data = TaskBatches(model, graph, task, config.batch_size, config.ablation, cache=ReferenceCache())
    if ranks.world_size > 1:
        if not isinstance(data, TaskBatches):
            raise HapError("data-parallel pruning shards a TaskBatches; pass data=TaskBatches(...) or none")
        data = data.shard(ranks.rank, ranks.world_size)
    whole_sizes = getattr(data, "whole_sizes", None)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))
    index = (sources.to(device), readers.to(device))
    last_save = time.perf_counter()
    bar = progress_bar(total=config.steps, initial=min(state.step, config.steps), desc="pruning", unit="step",
                       disable=not (progress and ranks.is_main))
    last_test_kl = None
    try:
        while not _done(state, config, graph.n_edges):
            step_started = time.perf_counter()
            step = state.step
            batch_index = int(order[step % len(data)])
            batch = data[batch_index]
            whole = whole_sizes[batch_index] if whole_sizes is not None else len(batch.clean)
            stretched = gate_stretched(state.log_alpha, config.beta, state.generator)
            mask = torch.zeros(graph.real.shape, device=device, dtype=model.dtype).index_put(
                index, stretched.clamp(0.0, 1.0).to(model.dtype))
            node_stretched = None
            if state.node_log_alpha is not None:
                node_stretched = gate_stretched(state.node_log_alpha, config.beta, state.generator)
                mask = mask * node_stretched.clamp(0.0, 1.0).to(model.dtype)[:, None]
            step_plan, grad_entries = step_plan_of(graph, live, stretched, node_stretched, kind)
            logits = run_masked(model, graph, batch.clean, batch.reference, mask, step_plan, batch.positions,
                                grad_entries=grad_entries)
            # This process's share of the batch mean: its examples' KL over the whole batch's size.
            kl_share = divergence(batch.clean_logits, logits).sum() / whole
            target = _target(state, config, step)
            expected = _expected_sparsity(state, config, graph.n_edges)
            gap = expected - target
            if config.project_during_warmup:
                # Every step starts on its target (the last one ended projected there): the gap is rounding,
                # whose sign Adam would turn into full steps of the multipliers. The projection holds it.
                penalty = state.lambdas.sum() * 0.0
            else:
                penalty = state.lambdas[0] * gap + state.lambdas[1] * gap**2
            node_expected = None
            if state.node_log_alpha is not None:
                node_target = config.node_target_sparsity * min(1.0, step / config.sparsity_warmup_steps)
                node_expected = 1.0 - gate_keep_probability(state.node_log_alpha, config.beta).mean()
                node_gap = node_expected - node_target
                penalty = penalty + state.lambdas[2] * node_gap + state.lambdas[3] * node_gap**2
            for group in state.mask_optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            state.mask_optimizer.zero_grad()
            state.lambda_optimizer.zero_grad()
            if kl_share.requires_grad:  # not when every sampled gate is clamped at 0 or 1
                kl_share.backward()
            kl = _sum_kl_gradients(ranks, state, kl_share.detach())
            del logits, kl_share  # their graph holds the run's delta buffer: not kept through the next forward
            penalty.backward()  # the same on every process: added once, after the sum
            loss = kl + penalty.detach()
            state.mask_optimizer.step()
            state.lambda_optimizer.step()
            with torch.no_grad():  # keep every gate within reach of the penalty's gradient
                state.log_alpha.clamp_(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)
                if state.node_log_alpha is not None:
                    state.node_log_alpha.clamp_(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)
                if step + 1 >= config.sparsity_warmup_steps:  # the target is reached: hold it exactly
                    state.log_alpha.copy_(project_to_sparsity(state.log_alpha, config.target_sparsity,
                                                              graph.n_edges, config.beta))
                elif config.project_during_warmup:
                    state.log_alpha.copy_(project_to_sparsity(state.log_alpha, _target(state, config, step + 1),
                                                              graph.n_edges, config.beta))
            state.step += 1
            state.seconds += time.perf_counter() - step_started
            line = {"step": state.step, "loss": loss.item(), "kl": kl.item(), "expected_sparsity": expected.item(),
                    "target_sparsity": target, "lambda1": state.lambdas[0].item(),
                    "lambda2": state.lambdas[1].item(), "lr": _learning_rate(config, step),
                    "seconds": round(state.seconds, 3)}
            if node_expected is not None:
                line["expected_node_sparsity"] = node_expected.item()
            if monitor is not None and ranks.is_main and (state.step % config.eval_period == 0
                                                          or _done(state, config, graph.n_edges)):
                kept, _, _ = _circuit_of(graph, live, state, config, n_keep)
                line.update(monitor.measure(model, kept))
            if config.readoff_every is not None and state.step % config.readoff_every == 0:
                _record_read_off(graph, live, state, config, n_keep)  # before the checkpoint, which keeps it
            if writing:
                with open(run_path / "train_log.jsonl", "a") as log:
                    log.write(json.dumps(line) + "\n")
                if snapshot_every is not None and state.step % snapshot_every == 0:
                    _save_snapshot(run_path / "snapshots" / f"step-{state.step:06d}.pt", state, sources, readers)
                due = (checkpoint_every is not None and state.step % checkpoint_every == 0) or (
                    checkpoint_every is None and time.perf_counter() - last_save > checkpoint_seconds)
                if due:
                    save_checkpoint(checkpoint, state, fingerprint)
                    last_save = time.perf_counter()
            if state.step <= config.steps:
                bar.update(1)
            postfix = {"kl": f"{kl.item():.3f}", "sparsity": f"{expected.item():.3f}"}
            last_test_kl = line.get("test_kl", last_test_kl)
            if last_test_kl is not None:
                postfix["test_kl"] = f"{last_test_kl:.3f}"
            if state.step > config.steps:
                postfix["converging"] = f"+{state.step - config.steps}"
            bar.set_postfix(postfix)
            if on_step is not None:
                on_step(state.step)
    except KeyboardInterrupt:
        if checkpoint is not None and ranks.is_main:
            save_checkpoint(checkpoint, state, fingerprint)
        raise
    finally:
        bar.close()
    if checkpoint is not None and ranks.is_main:
        save_checkpoint(checkpoint, state, fingerprint)
    seconds_per_step = state.seconds / state.step if state.step else float("nan")
    result = _read_off(graph, live, state, config, n_keep, seconds_per_step)
    if config.readoff_every is not None:
        result.read_offs = _read_offs_of(graph, live, state, config, n_keep, result)
    return result


def _record_read_off(graph: Graph, live: Tensor, state: PruningState, config: PruningConfig, n_keep: int) -> None:
    """Keep the masks of this step if the circuit they read off is one not recorded before."""
    kept, _, _ = _circuit_of(graph, live, state, config, n_keep)
    if any(torch.equal(recorded, kept) for _, _, _, recorded in state.read_offs):
        return
    node = None if state.node_log_alpha is None else state.node_log_alpha.detach().cpu().clone()
    state.read_offs.append((state.step, state.log_alpha.detach().cpu().clone(), node, kept))


def _read_offs_of(graph: Graph, live: Tensor, state: PruningState, config: PruningConfig, n_keep: int,
                  final: PruningResult) -> list[tuple[int, Tensor, Tensor, int]]:
    """The distinct circuits recorded along the run other than the final one, by step, then the final one."""
    found = []
    for step, log_alpha, node, recorded in state.read_offs:
        if torch.equal(recorded, final.in_graph):
            continue
        kept, dense, chosen = circuit_of_masks(graph, live, log_alpha, n_keep, config.beta, node)
        found.append((step, kept, dense, int(chosen.sum() - kept.sum())))
    return found + [(final.steps, final.in_graph, final.mask_values, final.n_pruned_dangling)]


def best_read_off(model: Model, graph: Graph, data: Sequence[Batch], result: PruningResult,
                  kind: AblationKind, validation: Sequence[Batch] | None = None,
                  runtime: dict[str, float] | None = None) -> PruningResult:
    """``result`` with the circuit, of those read off along the run (``result.read_offs``), that fits best
    the training examples ``data`` (an in-sample choice) or, when given, the ``validation`` examples (fresh
    draws of the training distribution): the lowest loss the run trains (KL to the full model, or the
    squared error of a numerical output), ties going to the latest. Unchanged, with no record, when the run
    read off one circuit only (or none was recorded). Its seconds go to ``runtime["read_off_check"]``.
    Judge the circuit on held-out examples as any other."""
    if len(result.read_offs) < 2:
        return result
    started = time.perf_counter()
    on, examples = ("validation", validation) if validation is not None else ("train", data)
    fits, _, _, n = evaluate_masks(model, graph, examples, [kept for _, kept, _, _ in result.read_offs], kind,
                                   progress=False, label="read-off check")
    losses = [fit["kl"] for fit in fits]
    best = min(range(len(losses)), key=lambda i: (losses[i], -i))  # the final circuit is the last entry
    step, kept, dense, dangling = result.read_offs[best]
    check = {"on": on, "steps": [entry[0] for entry in result.read_offs], "loss": losses, "n_examples": n,
             "returned_step": step, "final_loss": losses[-1]}
    if runtime is not None:
        runtime["read_off_check"] = time.perf_counter() - started
    if best == len(losses) - 1:
        return replace(result, read_off_check=check)
    return replace(result, in_graph=kept, mask_values=dense, n_pruned_dangling=dangling, read_off_step=step,
                   read_off_check=check)


def _sum_kl_gradients(ranks: Ranks, state: PruningState, kl_share: Tensor) -> Tensor:
    """Sum the processes' KL gradients of the masks (and their KL shares, returned: the batch's mean KL).
    One process alone: its gradient and KL as they are."""
    if ranks.world_size == 1:
        return kl_share
    masks = [state.log_alpha] + ([state.node_log_alpha] if state.node_log_alpha is not None else [])
    flat = torch.cat([(m.grad if m.grad is not None else torch.zeros_like(m)).flatten() for m in masks]
                     + [kl_share.reshape(1).to(state.log_alpha.dtype)])
    flat = ranks.sum(flat)
    offset = 0
    for m in masks:
        m.grad = flat[offset : offset + m.numel()].view_as(m).clone()
        offset += m.numel()
    return flat[-1]


def _circuit_of(graph: Graph, live: Tensor, state: PruningState, config: PruningConfig,
                n_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """``circuit_of_masks`` of the run's current masks."""
    return circuit_of_masks(graph, live, state.log_alpha, n_keep, config.beta, state.node_log_alpha)


def circuit_of_masks(graph: Graph, live: Tensor, log_alpha: Tensor, n_keep: int, beta: float = 2 / 3,
                     node_log_alpha: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(kept [S, R] bool without dangling edges, keep probabilities [S, R], binarised [S, R] bool) of masks
    ``log_alpha`` [E] over the ``live`` edges (in their order): what a run, its monitor and a snapshot read
    off (``benchmarks/along_the_run.py``).

    Edges are ranked by log alpha (monotone in the deterministic gate, which is
    clamped at 1 and so ties); with node masks, by the product of edge and node
    keep probabilities. The stored score is that keep probability, in (0, 1).
    """
    with torch.no_grad():
        keep = gate_keep_probability(log_alpha.detach().cpu().float(), beta)
        ranking = log_alpha.detach().cpu().float()
        if node_log_alpha is not None:
            node = gate_keep_probability(node_log_alpha.detach().cpu().float(), beta)
            keep = keep * node[live.nonzero(as_tuple=True)[0]]
            ranking = keep.log()
        dense = torch.zeros(graph.real.shape)
        dense[live] = keep
        chosen = torch.zeros(graph.real.shape, dtype=torch.bool)
        chosen[live] = binarize(ranking, n_keep)
    return prune_dangling(graph, chosen), dense, chosen


def _read_off(graph: Graph, live: Tensor, state: PruningState, config: PruningConfig, n_keep: int,
              seconds_per_step: float) -> PruningResult:
    """Learned masks -> the circuit binarised at the target count (see ``_circuit_of``)."""
    kept, dense, chosen = _circuit_of(graph, live, state, config, n_keep)
    with torch.no_grad():
        expected = _expected_sparsity(state, config, graph.n_edges).item()
    converged = abs(expected - config.target_sparsity) <= config.converge_tolerance
    return PruningResult(kept, dense, expected, config.target_sparsity, converged, int(chosen.sum() - kept.sum()),
                         state.step, seconds_per_step, state.seconds)


def _save_snapshot(path: Path, state: PruningState, sources: Tensor, readers: Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save({"step": state.step, "log_alpha": state.log_alpha.detach().cpu().clone(), "sources": sources,
                "readers": readers}, temporary)
    temporary.replace(path)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of the steps a resumed run has already done (atomically)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_atomically(path, "".join(line + "\n" for line in lines))


def pruned_circuit(model: Model, task: TaskData, method: str, result: PruningResult, config: dict) -> Circuit:
    """The ``Circuit`` of a pruning result (scores are the learned keep probabilities)."""
    return Circuit(model.name, task.name, method, model.layout, result.mask_values, result.in_graph,
                   config={**config, "n_pruned_dangling": result.n_pruned_dangling,
                           "final_expected_sparsity": result.expected_sparsity,
                           "target_sparsity": result.target_sparsity, "converged": result.converged,
                           "steps_done": result.steps, "seconds_per_step": result.seconds_per_step,
                           "training_seconds": result.seconds,
                           **({} if result.read_off_check is None else {"read_off_check": result.read_off_check}),
                           **({} if result.read_off_step is None else {"read_off_step": result.read_off_step})})

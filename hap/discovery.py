"""``hap discover``: load, split the task, find a circuit on the training split,
evaluate it on the held-out test split, write the run directory.

The test split never shares an example with the training split; for the
built-in tasks it also uses templates and names (nouns, centuries) that no
training example uses (``hap.tasks.splits``). The circuit's headline metrics are
the test split's; the in-sample metrics (on the first training examples) are
reported beside them, labelled, with the gap.

A run directory holds ``run.json`` (the settings, written first), then for
``ep``/``hap`` ``train_log.jsonl`` and ``checkpoint.pt`` as training goes, and
at the end ``circuit.json`` and the report. ``--resume DIR`` continues a run
whose settings match ``DIR/run.json``.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .ablation import AblationKind
from .attribution import AttributionConfig, attribute
from .batches import GIB, ReferenceCache, TaskBatches
from .circuit import Circuit, Scores, edges_for_sparsity, generalisation_gap, write_atomically
from .distributed import Ranks, ranks_from_env
from .errors import HapError
from .evaluation import (HeldOutMonitor, check_full_model, evaluate, fails_task, faithfulness_curve,
                         require_capable_model)
from .graph import Graph
from .ground_truth import describe_recovery, judge, read_ground_truth
from .models.loading import DEFAULT_MODEL, Model, load_model
from .models.tracr import TracrTransformer
from .explain import explain_circuit, store_explanation
from .settings import (ATTRIBUTION_METHODS, DEFAULT_ATTRIBUTION_EXAMPLES, DEFAULT_BATCH_SIZE, DEFAULT_METHOD,
                       DEFAULT_EXPLAIN_EXAMPLES, DEFAULT_MONITOR_EXAMPLES, DEFAULT_N_TEST, DEFAULT_REFERENCE_MEMORY_GIB, DEFAULT_STEPS,
                       DEFAULT_TEST_FRACTION, METHODS, PRECISIONS, PRUNING_METHODS)
from .tasks import TaskData, TaskSpec, is_program_task, load_split, resolve_bos, task_splits, validation_split

# ATTRIBUTION_METHODS, PRUNING_METHODS, METHODS: hap.settings (the CLI lists them before importing torch)
# Settings that may differ between a run and its resumption.
NOT_COMPARED_ON_RESUME = ("resume", "force", "command", "report", "out", "device", "device_map", "cache_dir", "reference_memory",
                          "snapshot_every", "checkpoint_every", "ground_truth", "tests_per_forward",
                          "allow_weak_model")
# Settings whose None means "as the model does by default": compared on resume once the model is loaded.
RESOLVED_WITH_THE_MODEL = ("bos",)
# Training examples by default: attribution methods score every example; pruning draws batches from them
# (its per-step cost does not depend on their number; see README "Budget").
DEFAULT_N_EXAMPLES = {"attribution": 64, "pruning": 256}


# Pruning defaults. A tracr program's graph has tens of edges and runs about 100 steps a second, so it gets
# Edge Pruning's long schedule (target warm-up 5/6 of the steps, also for HAP) at learning rates that do not
# shut its few gates in the first steps, and masks that start where a gate's samples already fall below 1
# (log alpha 3: keep probability 0.99, a fifth of samples below 1, so every gate has a gradient from step 1;
# at the published 10 none has until the penalty has pushed them all down together, by when its multiplier
# has wound up and closes chains that only help whole: 21 of 28 programs and ablations recovered exactly
# against 17, benchmarks/README.md, tracr_recovery.py). HAP there leaves its warm-up to the Lagrangian, as
# Edge Pruning does: holding the warming target (hap's default elsewhere) recovered as many programs exactly
# (18 of 28) at a lower mean recall (0.845 against 0.878; 2026-12-06). Everything else gets the 2-core budget
# (make demo).
PRUNING_DEFAULTS = {"default": {"steps": DEFAULT_STEPS, "lr": 0.8, "lambda_lr": 0.8, "init_mean": 10.0},
                    "tracr": {"steps": 1000, "lr": 0.1, "lambda_lr": 0.1, "init_mean": 3.0}}
TRACR_SPARSITY_WARMUP = 5 / 6


@dataclass(frozen=True)
class DiscoverConfig:
    """Every setting of a discovery run (what ``circuit.json`` records under ``config``).

    The pruning defaults (120 steps, 256 training examples, HAP's stage 1 on 64 of them, candidates 1.5x
    the circuit, warm start) are a budget that runs ``make demo`` on a 2-core CPU in under 10 minutes; the
    published Edge Pruning settings are ``--steps 3000 --batch-size 32``
    (README: what GPU users should raise). ``n_examples`` is the size of the
    training split, ``n_test`` of the held-out test split.
    """

    out: str
    model: str = DEFAULT_MODEL
    task: str | None = None  # default: ioi, or a tracr model's own program
    method: str = DEFAULT_METHOD
    edges: int | None = None
    sparsity: float | None = None
    n_examples: int | None = None  # training examples; default DEFAULT_N_EXAMPLES by method kind
    n_test: int = DEFAULT_N_TEST
    test_task: str | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    ig_steps: int = 5
    loss: str = "logit-diff"
    ablation: str = "interchange"
    edges_subset: tuple[str, ...] | None = None
    per_head_kv: bool = False
    kv_graph: str = "grouped"  # or "per-head": MIB's graph, every query head its own key/value input
    curve: bool = False
    explain_examples: int = DEFAULT_EXPLAIN_EXAMPLES  # held-out examples hap explain's table is measured on (0: none)
    ground_truth: str | None = None  # a file of true edges; tracr models know theirs
    bos: bool | None = None  # prompts begin with the BOS token; None: as the tokenizer does (run.json: resolved)
    allow_weak_model: bool = False  # study a full model that fails the task (at or below chance) anyway
    # ACDC
    threshold: float | None = None  # tau; without it, --edges/--sparsity search tau
    acdc_metric: str = "kl"
    tests_per_forward: int | None = None
    threshold_runs: int = 6
    threshold_tolerance: float = 0.1  # the search stops at a sweep keeping N .. N * (1 + this) edges
    threshold_start: float | None = None  # the search's first tau (default: the log midpoint of its bracket)
    mixed_precision: str | None = None  # acdc and exact (PAHQ): auto, int8, bfloat16, float16; None = off
    # Edge Pruning and HAP (None: the model's default, PRUNING_DEFAULTS)
    steps: int | None = None
    lr: float | None = None
    lambda_lr: float | None = None
    init_mean: float | None = None  # log alpha of masks that start open (ep; hap without warm start): N(mean, 0.01)
    lr_warmup: int | None = None
    sparsity_warmup: int | None = None
    project_warmup: bool | None = None  # hold the warming target every step (default: hap with warm start; not tracr)
    max_extra_steps: int | None = None
    node_masks: bool = False
    node_sparsity: float = 0.0
    candidates: float | None = None  # default: hybrid.candidate_margin(steps) x the circuit's share of the edges
    attribution: str = "eap-ig-inputs"
    attribution_examples: int = DEFAULT_ATTRIBUTION_EXAMPLES
    warm_start: bool = True
    eval_every: int | None = None
    monitor_examples: int = DEFAULT_MONITOR_EXAMPLES
    checkpoint_every: int | None = None
    snapshot_every: int | None = None
    readoff_every: int | None = None  # 0: never; default: a tracr program every 1% of the steps, else never
    readoff_on: str = "train"  # the examples the read-offs are compared on: train, or validation (fresh draws)
    cache_dir: str | None = None
    reference_memory: float = DEFAULT_REFERENCE_MEMORY_GIB
    # Running
    device: str | None = None
    device_map: str | None = None  # auto, balanced or a JSON file: the layers over several devices
    dtype: str | None = None
    force: bool = False
    resume: bool = False
    report: bool = True
    command: str = field(default_factory=lambda: shlex.join(["hap", *sys.argv[1:]]))

    def __post_init__(self) -> None:
        program = is_program_task(self.model)
        if self.task is None:
            object.__setattr__(self, "task", self.model if program else "ioi")
        for name, value in PRUNING_DEFAULTS["tracr" if program else "default"].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if program and self.sparsity_warmup is None and self.method in PRUNING_METHODS:
            object.__setattr__(self, "sparsity_warmup", max(1, round(self.steps * TRACR_SPARSITY_WARMUP)))
        if self.readoff_every is None:
            every = max(1, self.steps // 100) if program and self.method in PRUNING_METHODS else 0
            object.__setattr__(self, "readoff_every", every)
        if self.project_warmup is None:  # hap from its warm start; not ep, cold hap or a tracr program
            object.__setattr__(self, "project_warmup", self.method == "hap" and self.warm_start and not program)
        if self.n_examples is None:
            kind = "pruning" if self.method in PRUNING_METHODS else "attribution"
            object.__setattr__(self, "n_examples", DEFAULT_N_EXAMPLES[kind])

    def check(self) -> None:
        """Refuse impossible settings before any work is done or any file is touched."""
        if self.method not in METHODS:
            raise HapError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        pruning = self.method in PRUNING_METHODS
        if self.edges is not None and self.sparsity is not None:
            raise HapError("give one of --edges N (edges kept) or --sparsity S (fraction removed), not both")
        if self.edges is None and self.sparsity is None and not (self.method == "acdc" and self.threshold is not None):
            raise HapError("give --edges N (edges kept) or --sparsity S (fraction of edges removed)"
                           + (", or --threshold TAU" if self.method == "acdc" else ""))
        if self.per_head_kv and self.method not in ("eap", "eap-ig-inputs", "eap-ig-activations"):
            raise HapError("--per-head-kv applies to --method eap, eap-ig-inputs or eap-ig-activations")
        if self.kv_graph not in ("grouped", "per-head"):
            raise HapError(f"--kv-graph {self.kv_graph}: choose grouped or per-head")
        if self.per_head_kv and self.kv_graph == "per-head":
            raise HapError("--per-head-kv scores per-head key/value inputs on the grouped graph; the per-head graph "
                           "(--kv-graph per-head) already has them as edges: drop --per-head-kv")
        if self.mixed_precision is not None and self.method not in ("acdc", "exact"):
            raise HapError("--mixed-precision applies to the patching methods (--method acdc or exact)")
        if self.mixed_precision is not None and self.mixed_precision not in PRECISIONS:
            raise HapError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.method == "acdc":
            from .acdc import AcdcConfig

            AcdcConfig(threshold=self.threshold if self.threshold is not None else 0.0, metric=self.acdc_metric,
                       ablation=self.ablation, tests_per_forward=self.tests_per_forward)  # refuses bad values
            if self.threshold_runs < 1:
                raise HapError(f"--threshold-runs must be at least 1, got {self.threshold_runs}")
            if not 0 <= self.threshold_tolerance < math.inf:
                raise HapError(f"--threshold-tolerance is a fraction >= 0 (0.1: up to 10% more edges than "
                               f"wanted), got {self.threshold_tolerance}")
            if self.threshold_start is not None and (self.threshold is not None or not 1e-5 < self.threshold_start < 1):
                raise HapError("--threshold-start is where the TAU search of --edges/--sparsity begins: a number "
                               f"between 1e-05 and 1 (exclusive), without --threshold; got {self.threshold_start}")
        if self.edges is not None and self.edges < 1:
            raise HapError(f"--edges must be at least 1, got {self.edges}")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise HapError(f"--sparsity is the fraction of edges removed and must be in (0, 1), got {self.sparsity}")
        if self.n_examples < 1:
            raise HapError(f"--n-examples must be at least 1, got {self.n_examples}")
        if self.n_test < 1:
            raise HapError(f"--n-test must be at least 1 (metrics are measured on held-out examples), got {self.n_test}")
        if not 0.0 < self.test_fraction < 1.0:
            raise HapError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.batch_size < 1:
            raise HapError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.attribution_examples < 1:
            raise HapError(f"--attribution-examples must be at least 1, got {self.attribution_examples}")
        if self.explain_examples < 0:
            raise HapError(f"--explain-examples must be 0 (no explanation) or more, got {self.explain_examples}")
        if self.monitor_examples < 1:
            raise HapError(f"--monitor-examples must be at least 1, got {self.monitor_examples}")
        if self.eval_every is not None and self.eval_every < 1:
            raise HapError(f"--eval-every must be at least 1, got {self.eval_every}")
        if self.snapshot_every is not None and self.snapshot_every < 1:
            raise HapError(f"--snapshot-every must be at least 1, got {self.snapshot_every}")
        if self.readoff_every is not None and self.readoff_every < 0:
            raise HapError(f"--readoff-every must be 0 (never) or more, got {self.readoff_every}")
        if self.readoff_on not in ("train", "validation"):
            raise HapError(f"--readoff-on is train or validation, got {self.readoff_on!r}")
        if self.readoff_on == "validation" and (self.method not in PRUNING_METHODS or not self.readoff_every):
            raise HapError("--readoff-on validation compares the circuits an ep or hap run reads off along the way: "
                           "give --method ep or hap and --readoff-every N")
        if self.max_extra_steps is not None and self.max_extra_steps < 0:
            raise HapError(f"--max-extra-steps must be 0 or more, got {self.max_extra_steps}")
        if self.reference_memory < 0:
            raise HapError(f"--reference-memory is in GiB and must be 0 or more, got {self.reference_memory}")
        if pruning and self.steps <= 0:
            raise HapError(f"--steps must be positive, got {self.steps}")
        if self.method == "hap" and self.attribution not in ATTRIBUTION_METHODS:
            raise HapError(f"--attribution must be one of {', '.join(ATTRIBUTION_METHODS)}")
        if self.candidates is not None and not 0.0 < self.candidates <= 1.0:
            raise HapError(f"--candidates is a fraction of the edges in (0, 1], got {self.candidates}")
        if (self.method == "hap" and self.sparsity is not None and self.candidates is not None
                and self.candidates < 1.0 - self.sparsity):
            raise HapError(
                f"--candidates {self.candidates} keeps fewer edges than the circuit itself "
                f"({1 - self.sparsity:.3f} of the edges at --sparsity {self.sparsity}); raise --candidates"
            )
        out = Path(self.out)
        if self.resume:
            if not (out / "run.json").is_file():
                raise HapError(f"nothing to resume in {out}: it has no run.json (was it made by hap discover?)")
            saved = read_run_json(out / "run.json")
            mine = self.to_dict()
            differences = sorted(key for key in mine if key not in NOT_COMPARED_ON_RESUME
                                 and not (key in RESOLVED_WITH_THE_MODEL and mine[key] is None)
                                 and saved.get(key, mine[key]) != mine[key])  # absent: an older run, the default
            if differences:
                shown = ", ".join(f"{key} {saved.get(key)!r} -> {mine[key]!r}" for key in differences)
                raise HapError(f"{out} is a run with other settings ({shown}); resume with the same settings "
                               "or start a new --out")
        elif (out / "circuit.json").exists() or (out / "run.json").exists():
            if not self.force:
                raise HapError(f"{out} already holds a run; choose another --out, --resume it, or pass --force")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["edges_subset"] = list(self.edges_subset) if self.edges_subset else None
        return values

    @classmethod
    def from_run(cls, out: str | Path, **overrides: Any) -> DiscoverConfig:
        """The settings saved in ``out/run.json`` (for ``--resume DIR`` without the other flags)."""
        path = Path(out) / "run.json"
        if not path.is_file():
            raise HapError(f"nothing to resume in {out}: it has no run.json (was it made by hap discover?)")
        saved = read_run_json(path)
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in saved.items() if key in known}
        if "bos" not in saved and not is_program_task(str(saved.get("task") or saved.get("model", ""))):
            values["bos"] = False  # a run from before hap recorded it: its prompts had no BOS
        if values.get("edges_subset"):
            values["edges_subset"] = tuple(values["edges_subset"])
        return cls(**{**values, **overrides, "out": str(out)})


def read_run_json(path: Path) -> dict[str, Any]:
    """A run's saved settings; ``HapError`` naming the file if it is not a JSON object."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise HapError(f"{path} is damaged ({error}); it cannot be resumed: start the run again with --force") \
            from None
    if not isinstance(saved, dict):
        raise HapError(f"{path} is not a run's settings (a JSON object); start the run again with --force")
    return saved


def target_sparsity(config: DiscoverConfig, graph: Graph) -> float:
    """The sparsity the settings ask for (``--edges N`` is converted)."""
    if config.sparsity is not None:
        return config.sparsity
    if config.edges > graph.n_edges:
        raise HapError(f"--edges {config.edges} is more than the model's {graph.n_edges} edges")
    return 1.0 - config.edges / graph.n_edges


def n_edges_wanted(config: DiscoverConfig, graph: Graph) -> int:
    """The circuit size the settings ask for, checked against the graph."""
    if config.edges is not None:
        if config.edges > graph.n_edges:
            raise HapError(f"--edges {config.edges} is more than the model's {graph.n_edges} edges")
        return config.edges
    return max(1, edges_for_sparsity(graph, config.sparsity))


def _attribution_config(config: DiscoverConfig, method: str) -> AttributionConfig:
    return AttributionConfig(method=method, ig_steps=config.ig_steps, loss=config.loss, ablation=config.ablation,
                             batch_size=config.batch_size,
                             edges_subset=config.edges_subset if method == "exact" else None,
                             per_head_kv=config.per_head_kv and method == config.method,
                             mixed_precision=config.mixed_precision if method == "exact" else None)


def find_circuit(model: Model, task: TaskData, config: DiscoverConfig, runtime: dict[str, float],
                 data: TaskBatches | None = None, monitor: HeldOutMonitor | None = None,
                 ranks: Ranks | None = None, read_off_data: TaskBatches | None = None) -> Circuit:
    """Run the method on the training examples and select the circuit (the stage a new method plugs into).

    ``data``: the training batches (made on demand, cached within the memory
    budget); ``monitor``: held-out examples that Edge Pruning and HAP measure
    during training; ``ranks``: this process's share of a data-parallel run
    (attribution, Edge Pruning and HAP); ``read_off_data``: the examples the
    circuits read off along an ep or hap run are compared on (default: ``data``).
    """
    graph = Graph.from_model(model)
    if data is None:
        data = TaskBatches(model, graph, task, config.batch_size, config.ablation, cache=_cache(config), name="train")
    if config.method == "acdc":
        return _acdc(model, task, config, graph, data, runtime)
    if config.method in PRUNING_METHODS:
        from .hybrid import HybridConfig, hybrid
        from .pruning import PruningConfig, best_read_off, prune, pruned_circuit

        pruning = PruningConfig(
            target_sparsity=target_sparsity(config, graph), steps=config.steps, lr=config.lr,
            lambda_lr=config.lambda_lr, init_mean=config.init_mean, lr_warmup=config.lr_warmup, sparsity_warmup=config.sparsity_warmup,
            batch_size=config.batch_size, node_masks=config.node_masks, node_target_sparsity=config.node_sparsity,
            ablation=config.ablation, seed=config.seed, max_extra_steps=config.max_extra_steps,
            eval_every=config.eval_every,
            project_during_warmup=bool(config.project_warmup), readoff_every=config.readoff_every or None,
        )
        checkpoints = {"checkpoint_every": config.checkpoint_every, "run_dir": config.out, "resume": config.resume,
                       "snapshot_every": config.snapshot_every}
        if config.method == "ep":
            started = time.perf_counter()
            result = prune(model, task, pruning, data=data, progress=True, monitor=monitor, ranks=ranks,
                           **checkpoints)
            runtime["pruning"] = time.perf_counter() - started
            result = best_read_off(model, graph, data, result, AblationKind(pruning.ablation), read_off_data, runtime)
            return pruned_circuit(model, task, "ep", result, {"pruning": pruning.to_dict()})
        hybrid_config = HybridConfig(pruning=pruning, attribution=_attribution_config(config, config.attribution),
                                     candidates=config.candidates, warm_start=config.warm_start,
                                     attribution_examples=config.attribution_examples)
        return hybrid(model, task, hybrid_config, runtime=runtime, progress=True, data=data, monitor=monitor,
                      ranks=ranks, read_off_data=read_off_data, **checkpoints)

    scores: Scores = attribute(model, task, config=_attribution_config(config, config.method), progress=True,
                               data=data, ranks=ranks)
    runtime.update(scores.runtime_s)
    started = time.perf_counter()
    circuit = scores.circuit(n_edges_wanted(config, graph))
    runtime["selection"] = time.perf_counter() - started
    return circuit


def _acdc(model: Model, task: TaskData, config: DiscoverConfig, graph: Graph, data: TaskBatches,
          runtime: dict[str, float]) -> Circuit:
    """ACDC at ``--threshold``, or at the threshold ``search_threshold`` finds for ``--edges``/``--sparsity``."""
    from .acdc import AcdcConfig, Sweep, acdc, acdc_circuit, search_threshold

    started = time.perf_counter()
    settings = AcdcConfig(threshold=config.threshold if config.threshold is not None else 0.0,
                          metric=config.acdc_metric, ablation=config.ablation,
                          tests_per_forward=config.tests_per_forward, memory_gib=config.reference_memory,
                          mixed_precision=config.mixed_precision)
    sized = config.edges is not None or config.sparsity is not None
    n_edges = n_edges_wanted(config, graph) if sized else None
    sweeps: list[Sweep] = []
    if config.threshold is not None:
        state = acdc(model, task, settings, data, config.out, resume=config.resume, progress=True)
    else:
        assert n_edges is not None
        settings, state, sweeps = search_threshold(model, task, settings, data, n_edges, config.out,
                                                   config.resume, runs=config.threshold_runs,
                                                   tolerance=config.threshold_tolerance, progress=True,
                                                   start=config.threshold_start)
    # The sweeps' own clocks: every sitting that resumed them counts, not only this process.
    runtime["acdc"] = sum(sweep.state.seconds for sweep in sweeps) if sweeps else state.seconds
    runtime["acdc_this_run"] = time.perf_counter() - started
    circuit = acdc_circuit(model, task, settings, state, n_edges)
    if sweeps:
        circuit.config["threshold_search"] = [sweep.summary() for sweep in sweeps]
    return circuit


def _cache(config: DiscoverConfig) -> ReferenceCache:
    """The run's one cache of made batches: ``--reference-memory`` GiB, then ``--cache-dir`` on disk."""
    folder = Path(config.cache_dir) if config.cache_dir is not None else None
    return ReferenceCache(memory_budget=int(config.reference_memory * GIB), folder=folder)


def split_specs(config: DiscoverConfig, model: Model) -> tuple[TaskSpec, TaskSpec]:
    """The run's (train, test) task splits."""
    return task_splits(config.task, model.tokenizer, config.n_examples, config.n_test, config.seed,
                       config.test_task, config.test_fraction, config.bos)


def resolved_bos(config: DiscoverConfig, model: Model) -> DiscoverConfig:
    """``config`` with ``bos`` resolved for this model's tokenizer (what run.json records; a tracr program's
    inputs carry their own BOS and keep None); a resumed run must resolve as it did."""
    if is_program_task(config.task):
        return config
    resolved = replace(config, bos=resolve_bos(model.tokenizer, config.bos))
    if config.resume:
        saved = read_run_json(Path(config.out) / "run.json").get("bos", False)  # absent: an older, BOS-less run
        if saved != resolved.bos:
            raise HapError(f"{config.out} was run with bos {saved} and these settings give bos {resolved.bos}; "
                           f"resume with {'--bos' if saved else '--no-bos'} or start a new --out")
    return resolved


def check_model_does_task(config: DiscoverConfig, train: TaskBatches, test: TaskBatches) -> None:
    """Refuse (``WeakModelError``) a full model that fails the task on either split, unless
    ``allow_weak_model``; then say on stderr that it is studied anyway (once: not again on ``--resume``)."""
    checks = [check_full_model(train.model, train, "training"), check_full_model(test.model, test, "test")]
    weak = require_capable_model(checks, bool(train.task.bos), config.allow_weak_model, config.model)
    if weak and not config.resume:
        print(f"hap: warning: the full model fails the task ({'; '.join(c.describe() for c in weak)}); "
              "studied anyway (--allow-weak-model)", file=sys.stderr)


def split_metrics(model: Model, circuit: Circuit, train: TaskBatches, test: TaskBatches, batch_size: int,
                  ablation: str, ground_truth: str | None = None) -> dict[str, Any]:
    """``{"test", "train", "gap"}``: held-out metrics (the headline), in-sample ones on as many training
    examples as the test split has (at most), their gap; and ``ground_truth`` recovery on the test split
    (from ``ground_truth``, a file of true edges, or automatically for a tracr model)."""
    held_out = evaluate(model, circuit, test.task, batch_size, ablation, progress=True, data=test,
                        label="evaluate (test split)").to_dict()
    in_sample_data = train.head(min(train.n_examples, test.n_examples))
    in_sample = evaluate(model, circuit, in_sample_data.task, batch_size, ablation, progress=True,
                         data=in_sample_data, label="evaluate (train split, in-sample)").to_dict()
    for values in (held_out, in_sample):
        values["n_full_model_wrong"] = round((1.0 - values["full_model"]["accuracy"]) * values["n_examples"])
    metrics: dict[str, Any] = {"test": held_out, "train": in_sample, "gap": generalisation_gap(held_out, in_sample)}
    if ground_truth is not None or isinstance(model.hf_model, TracrTransformer):
        metrics["ground_truth"] = judge(model, Graph.from_model(model), circuit.in_graph, circuit.scores, test,
                                        ablation, ground_truth)
    return metrics


def measure(model: Model, circuit: Circuit, train: TaskBatches, test: TaskBatches, config: DiscoverConfig,
            runtime: dict[str, float]) -> dict[str, Any]:
    """The circuit's metrics: held-out (``test``, the headline), in-sample (``train``, on as many training
    examples as the test split has, at most) and their ``gap``; with ``config.curve``, the MIB curve on the
    test split."""
    started = time.perf_counter()
    metrics = split_metrics(model, circuit, train, test, config.batch_size, config.ablation, config.ground_truth)
    runtime["evaluation"] = time.perf_counter() - started
    if config.curve:
        started = time.perf_counter()
        scores = Scores(circuit.model, circuit.task, circuit.method, circuit.layout, circuit.scores,
                        {"loss": "kl" if config.method in PRUNING_METHODS else config.loss})
        curve = faithfulness_curve(model, scores, test.task, batch_size=config.batch_size, ablation=config.ablation,
                                   progress=True, data=test)
        metrics["curve"] = {**curve.to_dict(), "split": "test"}
        runtime["curve"] = time.perf_counter() - started
    return metrics


def discover(config: DiscoverConfig) -> Circuit:
    """The whole ``hap discover`` pipeline; writes the run directory and returns the circuit."""
    config.check()
    runtime: dict[str, float] = {}
    started = time.perf_counter()
    model = load_model(config.model, device=config.device, dtype=config.dtype,
                       per_head_kv_graph=config.kv_graph == "per-head", device_map=config.device_map)
    runtime["load"] = time.perf_counter() - started
    config = resolved_bos(config, model)
    ranks = ranks_from_env(model.device)
    try:
        return _discover_on(model, config, ranks, runtime)
    finally:
        ranks.leave()  # every process leaves the group before it exits (the others may still be working)


def _discover_on(model: Model, config: DiscoverConfig, ranks: Ranks, runtime: dict[str, float]) -> Circuit:
    """``discover`` from the loaded model on: this process's part of the run."""
    out = Path(config.out)
    if ranks.world_size > 1 and config.device_map is not None:
        raise HapError("--device-map spreads one process's model over the devices; under torchrun each process "
                       "loads its own model on its own GPU: drop --device-map (or run one process)")
    if ranks.world_size > 1 and config.method not in (*ATTRIBUTION_METHODS, *PRUNING_METHODS):
        raise HapError(f"a data-parallel run (torchrun, {ranks.world_size} processes) supports the attribution "
                       f"methods, ep and hap so far; run --method {config.method} as one process")
    started = time.perf_counter()
    train_spec, test_spec = split_specs(config, model)
    train_task, test_task = load_split(train_spec, model.tokenizer), load_split(test_spec, model.tokenizer)
    runtime["task"] = time.perf_counter() - started
    graph = Graph.from_model(model)
    if config.edges is not None or config.sparsity is not None:
        target_sparsity(config, graph)  # refuses --edges beyond the graph
    if config.ground_truth is not None:
        read_ground_truth(config.ground_truth, graph)  # a bad file is refused before any work
    cache = _cache(config)
    train = TaskBatches(model, graph, train_task, config.batch_size, config.ablation, cache=cache, name="train")
    test = TaskBatches(model, graph, test_task, config.batch_size, config.ablation, cache=cache, name="test")
    started = time.perf_counter()
    check_model_does_task(config, train, test)  # its batches are the first the run uses, kept in the cache
    runtime["full_model_check"] = time.perf_counter() - started
    validation = None
    if config.readoff_on == "validation":  # fresh draws of the training distribution, as many as the test split
        validation_task = validation_split(train_spec, model.tokenizer, config.n_test)
        validation = TaskBatches(model, graph, validation_task, config.batch_size, config.ablation, name="validation")
    # The inputs are good: only now is the run directory touched (a mistake above leaves it as it was).
    ranks.barrier()  # every process has checked the directory before the main one writes to it
    if not config.resume and ranks.is_main:
        for stale in ("train_log.jsonl", "checkpoint.pt", "attribution.pt", "acdc_state.pt"):
            (out / stale).unlink(missing_ok=True)  # only reached with --force or a fresh directory
        shutil.rmtree(out / "snapshots", ignore_errors=True)
        for folder in out.glob("tau-*"):
            shutil.rmtree(folder, ignore_errors=True)
        write_atomically(out / "run.json", json.dumps(config.to_dict(), indent=1))  # a resumed run keeps its own

    monitor = None
    if config.method in PRUNING_METHODS:  # every process knows it (a checkpoint records it); the main one measures
        started = time.perf_counter()
        monitor = HeldOutMonitor.build(model, test_task, config.monitor_examples, config.ablation)
        runtime["monitor"] = time.perf_counter() - started
    circuit = find_circuit(model, train_task, config, runtime, train, monitor, ranks, read_off_data=validation)
    if not ranks.is_main:  # the main process measures the circuit and writes the run
        return circuit

    circuit.metrics = measure(model, circuit, train, test, config, runtime)
    circuit.splits = {"train": train_spec.to_dict(), "test": test_spec.to_dict()}
    if config.explain_examples and test_task.named_positions is not None and circuit.n_edges:
        started = time.perf_counter()
        head = test.head(config.explain_examples)
        explanation = explain_circuit(model, circuit, head.task, config.batch_size, config.ablation, data=head,
                                      split="test", progress=True)
        runtime["explain"] = time.perf_counter() - started
        store_explanation(circuit, explanation, {"examples": {**test_spec.to_dict(),
                                                               "n_examples": explanation.importance.n_examples}})
    given = {key: value for key, value in config.to_dict().items() if value is not None or key not in circuit.config}
    circuit.config = {**circuit.config, **given}  # what the method resolved (e.g. the tau searched) beats None
    circuit.runtime_s = {**circuit.runtime_s, **runtime}
    circuit.save(out / "circuit.json")
    if config.report:
        from .report import write_report

        write_report(out)
    return circuit


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _signed(value: Any, digits: int = 4) -> str:
    return f"{value:+.{digits}f}" if isinstance(value, (int, float)) else ""


CORE_SHOWN = 5  # nodes the summary names


def _core_lines(circuit: Circuit) -> list[str]:
    """The nodes the circuit needs most, with their roles (when ``hap explain``'s table is stored)."""
    rows = (circuit.importance or {}).get("nodes") or []
    if not rows:
        return []
    roles = circuit.roles or {}

    def named(row: dict[str, Any]) -> str:
        role = (roles.get(row["name"]) or {}).get("role")
        return f"{row['name']}{' (' + role + ')' if role else ''} {row['faithfulness_drop']:+.2f}"

    lines = [f"  core          {' · '.join(named(row) for row in rows[:CORE_SHOWN])}",
             f"                (faithfulness lost without each, on {circuit.importance.get('n_examples')} "
             f"{circuit.importance.get('split')} examples; hap explain for the table)"]
    counts: dict[str, int] = {}
    for role in roles.values():
        if role.get("role") != "unlabelled":
            counts[role["role"]] = counts.get(role["role"], 0) + 1
    if circuit.roles is not None:
        lines.append("  roles         " + (" · ".join(f"{role} {count}" for role, count in counts.items())
                                           or "no head of the circuit fits a role rule"))
    return lines


def format_summary(circuit: Circuit) -> str:
    """The short human summary ``discover`` and ``evaluate`` print: held-out metrics first, in-sample beside them."""
    metrics = circuit.metrics
    test, train, gap = circuit.held_out, metrics.get("train") or {}, metrics.get("gap") or {}
    total = Graph.from_layout(circuit.layout).n_edges
    lines = [f"{circuit.model} / {circuit.task} / {circuit.method}"]
    test_spec, train_spec = circuit.splits.get("test"), circuit.splits.get("train")
    if test_spec:
        lines.append(f"  held out      {TaskSpec.from_dict(test_spec).describe()}")
    if train_spec:
        lines.append(f"  fitted on     {TaskSpec.from_dict(train_spec).describe()}")
    lines.append(f"  edges kept    {circuit.n_edges:,} of {total:,} ({1 - circuit.n_edges / total:.2%} sparsity; "
                 f"{circuit.config.get('n_pruned_dangling', 0)} dangling dropped)")
    if circuit.config.get("tie_at_cut"):
        kept_tied, tied = circuit.config["tie_at_cut"]
        lines.append(f"  tie at cut    {kept_tied:,} of {tied:,} edges of equal score kept, an arbitrary choice; "
                     "another edge count avoids it")
    if not test:
        lines.append("  no held-out metrics in this file; `hap evaluate` measures them")
    columns = [("test (held out)", test), ("train (in-sample)", train)]
    shown = [(label, values) for label, values in columns if values]
    if shown:
        header = "                " + "".join(f"{label:>19}" for label, _ in shown) + ("        gap" if gap else "")
        lines.append(header)
        numerical = circuit.layout.vocab_size == 1  # one output column: the divergence is the squared error
        for key, label in (("kl", "sq. error" if numerical else "KL"), ("logit_diff", "value metric" if numerical
                                                                         else "logit diff"),
                           ("accuracy", "accuracy"),
                           ("faithfulness", "faithfulness")):
            row = f"  {label:<14}" + "".join(f"{_number(values.get(key)):>19}" for _, values in shown)
            lines.append(row + (f"{_signed(gap.get(key)):>11}" if gap else ""))
        for name, key in (("full model", "full_model"), ("empty circuit", "empty_circuit")):
            refs = [values.get(key) or {} for _, values in shown]
            row = f"  {name:<14}" + "".join(
                f"{'ld ' + _number(ref.get('logit_diff'), 2) + ' acc ' + _number(ref.get('accuracy'), 2):>19}"
                for ref in refs)
            lines.append(row)
        lines.append("  examples      " + "".join(
            f"{str(values.get('n_examples', 'n/a')) + ' (' + str(values.get('n_full_model_wrong', '?')) + ' wrong)':>19}"
            for _, values in shown) + "   (full model wrong on)")
        weak = [label for label, values in shown if fails_task(values.get("full_model"))]
        if weak:
            lines.append(f"  WARNING       the full model fails the task on the {' and '.join(weak)} examples (at or "
                         "below chance, or wrong on average): this circuit explains a broken behaviour")
    if "ground_truth" in metrics:
        lines.append(f"  ground truth  {describe_recovery(metrics['ground_truth'])}")
    lines += _core_lines(circuit)
    if "curve" in metrics:
        lines.append(f"  curve         CPR {metrics['curve']['cpr']:.3f} · CMD {metrics['curve']['cmd']:.3f} "
                     f"({metrics['curve'].get('split', 'unknown')} split)")
    config = circuit.config
    if "final_expected_sparsity" in config and "target_sparsity" in config:
        expected, target = config["final_expected_sparsity"], config["target_sparsity"]
        steps = config.get("steps_done")
        state = "converged" if config.get("converged") else "WARNING: not converged"
        lines.append(f"  pruning       expected sparsity {expected:.4f} before binarisation, target {target:.4f} "
                     f"({(expected - target) * 100:+.2f} pp; {state}) after {steps} steps")
        if not config.get("converged"):
            lines.append("                the masks had not reached the target, so binarisation removed edges the "
                         "training still relied on; raise --steps or --max-extra-steps")
    read_off = config.get("read_off_check")
    if read_off is not None:
        chosen = read_off["loss"][read_off["steps"].index(read_off["returned_step"])]
        kind = "validation" if read_off.get("on") == "validation" else "training"
        verdict = (f"the circuit read off at step {read_off['returned_step']} returned, {kind} loss {chosen:.4g} "
                   f"against the final read-off's {read_off['final_loss']:.4g}"
                   if config.get("read_off_step") is not None else
                   f"the final read-off kept, {kind} loss {read_off['final_loss']:.4g}")
        lines.append(f"  read-offs     {len(read_off['steps'])} distinct circuits read off along the run, compared on "
                     f"{read_off['n_examples']} {kind} examples: {verdict}")
    check = config.get("stage_one_check")
    if check is not None:
        verdict = ("stage 1's circuit returned: pruning ended above it" if config.get("returned") == "stage one"
                   else "the pruned circuit kept")
        lines.append(f"  stage 1 check training loss {check['training_loss_pruned']:.4g} pruned, "
                     f"{check['training_loss_stage_one']:.4g} stage 1's top edges ({verdict})")
    if circuit.runtime_s:
        stages = " · ".join(f"{stage} {seconds:.1f}" for stage, seconds in circuit.runtime_s.items())
        lines.append(f"  seconds       {stages}")
    return "\n".join(lines)

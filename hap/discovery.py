"""``hap discover``: load, make the task, find a circuit, evaluate it, write the run directory.

A run directory holds ``run.json`` (the settings, written first), then for
``ep``/``hap`` ``train_log.jsonl`` and ``checkpoint.pt`` as training goes, and
at the end ``circuit.json`` and the report. ``--resume DIR`` continues a run
whose settings match ``DIR/run.json``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .attribution import AttributionConfig, Method, attribute
from .circuit import Circuit, Scores, edges_for_sparsity, write_atomically
from .errors import HapError
from .evaluation import evaluate, faithfulness_curve
from .graph import Graph
from .models.loading import DEFAULT_MODEL, Model, load_model
from .tasks import TaskData, load_task

ATTRIBUTION_METHODS = tuple(method.value for method in Method)
PRUNING_METHODS = ("ep", "hap")
METHODS = ATTRIBUTION_METHODS + PRUNING_METHODS
# Settings that may differ between a run and its resumption.
NOT_COMPARED_ON_RESUME = ("resume", "force", "command", "report", "out", "device", "cache_dir")


@dataclass(frozen=True)
class DiscoverConfig:
    """Every setting of a discovery run (what ``circuit.json`` records under ``config``).

    The pruning defaults (150 steps, 32 examples, candidates 1.5x the circuit, warm start) are
    a budget that runs ``make demo`` on a 2-core CPU in under 10 minutes; the
    published Edge Pruning settings are ``--steps 3000 --batch-size 32``
    (README: what GPU users should raise).
    """

    out: str
    model: str = DEFAULT_MODEL
    task: str = "ioi"
    method: str = "eap-ig-inputs"
    edges: int | None = None
    sparsity: float | None = None
    n_examples: int | None = None  # default: 64 for attribution methods, 32 for ep / hap
    batch_size: int = 16
    seed: int = 0
    ig_steps: int = 5
    loss: str = "logit-diff"
    ablation: str = "interchange"
    edges_subset: tuple[str, ...] | None = None
    curve: bool = False
    # Edge Pruning and HAP
    steps: int = 150
    lr: float = 0.8
    lambda_lr: float = 0.8
    lr_warmup: int | None = None
    sparsity_warmup: int | None = None
    node_masks: bool = False
    node_sparsity: float = 0.0
    candidates: float | None = None  # default: 1.5 x the circuit's share of the edges
    attribution: str = "eap-ig-inputs"
    warm_start: bool = True
    checkpoint_every: int | None = None
    cache_dir: str | None = None
    # Running
    device: str | None = None
    dtype: str | None = None
    force: bool = False
    resume: bool = False
    report: bool = True
    command: str = field(default_factory=lambda: shlex.join(["hap", *sys.argv[1:]]))

    def __post_init__(self) -> None:
        if self.n_examples is None:
            default = 32 if self.method in PRUNING_METHODS else 64
            object.__setattr__(self, "n_examples", default)

    def check(self) -> None:
        """Refuse impossible settings before any work is done or any file is touched."""
        if self.method not in METHODS:
            raise HapError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        pruning = self.method in PRUNING_METHODS
        if self.edges is not None and self.sparsity is not None:
            raise HapError("give one of --edges N (edges kept) or --sparsity S (fraction removed), not both")
        if self.edges is None and self.sparsity is None:
            raise HapError("give --edges N (edges kept) or --sparsity S (fraction of edges removed)")
        if self.edges is not None and self.edges < 1:
            raise HapError(f"--edges must be at least 1, got {self.edges}")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise HapError(f"--sparsity is the fraction of edges removed and must be in (0, 1), got {self.sparsity}")
        if self.n_examples < 1:
            raise HapError(f"--n-examples must be at least 1, got {self.n_examples}")
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
            saved = json.loads((out / "run.json").read_text())
            mine = self.to_dict()
            differences = sorted(key for key in mine if key not in NOT_COMPARED_ON_RESUME
                                 and saved.get(key) != mine[key])
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
        saved = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in saved.items() if key in known}
        if values.get("edges_subset"):
            values["edges_subset"] = tuple(values["edges_subset"])
        return cls(**{**values, **overrides})


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
                             edges_subset=config.edges_subset if method == "exact" else None)


def find_circuit(model: Model, task: TaskData, config: DiscoverConfig, runtime: dict[str, float],
                 data: list | None = None) -> Circuit:
    """Run the method and select the circuit (the stage a new method plugs into).

    ``data``: the task's batches with their references, prepared once per run.
    """
    graph = Graph.from_model(model)
    if data is None:
        data = _prepared_batches(model, graph, task, config, config.batch_size)
    if config.method in PRUNING_METHODS:
        from .hybrid import HybridConfig, hybrid
        from .pruning import PruningConfig, prune, pruned_circuit

        pruning = PruningConfig(
            target_sparsity=target_sparsity(config, graph), steps=config.steps, lr=config.lr,
            lambda_lr=config.lambda_lr, lr_warmup=config.lr_warmup, sparsity_warmup=config.sparsity_warmup,
            batch_size=config.batch_size, node_masks=config.node_masks, node_target_sparsity=config.node_sparsity,
            ablation=config.ablation, seed=config.seed,
        )
        checkpoints = {"checkpoint_every": config.checkpoint_every, "run_dir": config.out, "resume": config.resume}
        if config.method == "ep":
            started = time.perf_counter()
            result = prune(model, task, pruning, data=data, progress=True, **checkpoints)
            runtime["pruning"] = time.perf_counter() - started
            return pruned_circuit(model, task, "ep", result, {"pruning": pruning.to_dict()})
        hybrid_config = HybridConfig(pruning=pruning, attribution=_attribution_config(config, config.attribution),
                                     candidates=config.candidates, warm_start=config.warm_start)
        return hybrid(model, task, hybrid_config, runtime=runtime, progress=True, data=data, **checkpoints)

    scores: Scores = attribute(model, task, config=_attribution_config(config, config.method), progress=True,
                               data=data)
    runtime.update(scores.runtime_s)
    started = time.perf_counter()
    circuit = scores.circuit(n_edges_wanted(config, graph))
    runtime["selection"] = time.perf_counter() - started
    return circuit


def _prepared_batches(model: Model, graph: Graph, task: TaskData, config: DiscoverConfig, batch_size: int):
    """Batches with references, offloaded to ``--cache-dir`` when one is given."""
    from .ablation import AblationKind
    from .batches import batches, offload

    data = list(batches(model, graph, task, batch_size, AblationKind(config.ablation)))
    if config.cache_dir is not None:
        data = [offload(batch, Path(config.cache_dir) / f"batch{i}.pt") for i, batch in enumerate(data)]
    return data


def discover(config: DiscoverConfig) -> Circuit:
    """The whole ``hap discover`` pipeline; writes the run directory and returns the circuit."""
    config.check()
    out = Path(config.out)
    if not config.resume:
        for stale in ("train_log.jsonl", "checkpoint.pt", "attribution.pt"):
            (out / stale).unlink(missing_ok=True)  # only reached with --force or a fresh directory
    write_atomically(out / "run.json", json.dumps(config.to_dict(), indent=1))
    runtime: dict[str, float] = {}
    started = time.perf_counter()
    model = load_model(config.model, device=config.device, dtype=config.dtype)
    runtime["load"] = time.perf_counter() - started
    started = time.perf_counter()
    task = load_task(config.task, model.tokenizer, config.n_examples, seed=config.seed)
    runtime["task"] = time.perf_counter() - started

    started = time.perf_counter()
    data = _prepared_batches(model, Graph.from_model(model), task, config, config.batch_size)
    runtime["references"] = time.perf_counter() - started
    circuit = find_circuit(model, task, config, runtime, data)

    started = time.perf_counter()
    metrics = evaluate(model, circuit, task, config.batch_size, config.ablation, progress=True, data=data).to_dict()
    runtime["evaluation"] = time.perf_counter() - started
    if config.curve:
        started = time.perf_counter()
        scores = Scores(circuit.model, circuit.task, circuit.method, circuit.layout, circuit.scores,
                        {"loss": "kl" if config.method in PRUNING_METHODS else config.loss})
        curve = faithfulness_curve(model, scores, task, batch_size=config.batch_size, ablation=config.ablation,
                                   progress=True, data=data)
        metrics["curve"] = curve.to_dict()
        runtime["curve"] = time.perf_counter() - started
    metrics["n_full_model_wrong"] = round((1.0 - metrics["full_model"]["accuracy"]) * len(task))
    circuit.config = {**circuit.config, **config.to_dict()}
    circuit.metrics = metrics
    circuit.runtime_s = {**circuit.runtime_s, **runtime}
    circuit.save(out / "circuit.json")
    if config.report:
        from .report import write_report

        write_report(out)
    return circuit


def format_summary(circuit: Circuit) -> str:
    """The short human summary ``discover`` and ``evaluate`` print."""
    m = circuit.metrics
    full, empty = m.get("full_model", {}), m.get("empty_circuit", {})
    total = Graph.from_layout(circuit.layout).n_edges
    lines = [
        f"{circuit.model} / {circuit.task} / {circuit.method}",
        f"  examples      {m.get('n_examples')} (full model wrong on {m.get('n_full_model_wrong', 'n/a')})",
        f"  edges kept    {circuit.n_edges:,} of {total:,} ({1 - circuit.n_edges / total:.2%} sparsity; "
        f"{circuit.config.get('n_pruned_dangling', 0)} dangling dropped)",
        f"  KL            {m['kl']:.4f}  (empty circuit {empty.get('kl', float('nan')):.4f})",
        f"  logit diff    {m['logit_diff']:.4f}  (full model {full.get('logit_diff', float('nan')):.4f}, "
        f"empty {empty.get('logit_diff', float('nan')):.4f})",
        f"  accuracy      {m['accuracy']:.3f}  (full model {full.get('accuracy', float('nan')):.3f})",
        f"  faithfulness  {m['faithfulness']:.3f}",
    ]
    if "curve" in m:
        lines.append(f"  curve         CPR {m['curve']['cpr']:.3f} · CMD {m['curve']['cmd']:.3f}")
    if circuit.runtime_s:
        stages = " · ".join(f"{stage} {seconds:.1f}" for stage, seconds in circuit.runtime_s.items())
        lines.append(f"  seconds       {stages}")
    return "\n".join(lines)



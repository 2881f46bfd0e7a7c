"""``hap discover``: load, make the task, find a circuit, evaluate it, write ``circuit.json``.

One function per stage, each timed; the result is a ``Circuit`` whose
``runtime_s`` has the seconds of every stage and whose ``metrics`` are the
evaluation's (plus the faithfulness curve with ``curve=True``).
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .attribution import AttributionConfig, Method, attribute
from .circuit import Circuit, Scores, edges_for_sparsity
from .errors import HapError
from .evaluation import evaluate, faithfulness_curve
from .graph import Graph
from .models.loading import DEFAULT_MODEL, Model, load_model
from .tasks import TaskData, load_task

ATTRIBUTION_METHODS = tuple(method.value for method in Method)


@dataclass(frozen=True)
class DiscoverConfig:
    """Every setting of a discovery run (what ``circuit.json`` records under ``config``)."""

    out: str
    model: str = DEFAULT_MODEL
    task: str = "ioi"
    method: str = "eap-ig-inputs"
    edges: int | None = None
    sparsity: float | None = None
    n_examples: int = 64
    batch_size: int = 16
    seed: int = 0
    ig_steps: int = 5
    loss: str = "logit-diff"
    ablation: str = "interchange"
    edges_subset: tuple[str, ...] | None = None
    curve: bool = False
    device: str | None = None
    dtype: str | None = None
    force: bool = False
    command: str = field(default_factory=lambda: shlex.join(["hap", *sys.argv[1:]]))

    def check(self) -> None:
        """Refuse impossible settings before any work is done."""
        if self.method not in ATTRIBUTION_METHODS:
            raise HapError(f"unknown method {self.method!r}; choose one of {', '.join(ATTRIBUTION_METHODS)}")
        if (self.edges is None) == (self.sparsity is None):
            raise HapError("give exactly one of --edges N (edges kept) or --sparsity S (fraction removed)")
        if self.edges is not None and self.edges < 1:
            raise HapError(f"--edges must be at least 1, got {self.edges}")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise HapError(f"--sparsity is the fraction of edges removed and must be in (0, 1), got {self.sparsity}")
        if self.n_examples < 1:
            raise HapError(f"--n-examples must be at least 1, got {self.n_examples}")
        circuit = Path(self.out) / "circuit.json"
        if circuit.exists() and not self.force:
            raise HapError(f"{circuit} exists; choose another --out or pass --force to overwrite it")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["edges_subset"] = list(self.edges_subset) if self.edges_subset else None
        return values


def n_edges_wanted(config: DiscoverConfig, graph: Graph) -> int:
    """The circuit size the settings ask for, checked against the graph."""
    if config.edges is not None:
        if config.edges > graph.n_edges:
            raise HapError(f"--edges {config.edges} is more than the model's {graph.n_edges} edges")
        return config.edges
    return max(1, edges_for_sparsity(graph, config.sparsity))


def find_circuit(model: Model, task: TaskData, config: DiscoverConfig, runtime: dict[str, float]) -> Circuit:
    """Run the method and select the circuit (the stage a new method plugs into)."""
    attribution = AttributionConfig(
        method=config.method, ig_steps=config.ig_steps, loss=config.loss, ablation=config.ablation,
        batch_size=config.batch_size, edges_subset=config.edges_subset,
    )
    scores: Scores = attribute(model, task, config=attribution, progress=True)
    runtime.update(scores.runtime_s)
    started = time.perf_counter()
    circuit = scores.circuit(n_edges_wanted(config, Graph.from_model(model)))
    runtime["selection"] = time.perf_counter() - started
    return circuit


def discover(config: DiscoverConfig) -> Circuit:
    """The whole ``hap discover`` pipeline; writes ``<out>/circuit.json`` and returns the circuit."""
    config.check()
    runtime: dict[str, float] = {}
    started = time.perf_counter()
    model = load_model(config.model, device=config.device, dtype=config.dtype)
    runtime["load"] = time.perf_counter() - started
    started = time.perf_counter()
    task = load_task(config.task, model.tokenizer, config.n_examples, seed=config.seed)
    runtime["task"] = time.perf_counter() - started

    circuit = find_circuit(model, task, config, runtime)

    started = time.perf_counter()
    metrics = evaluate(model, circuit, task, config.batch_size, config.ablation, progress=True).to_dict()
    runtime["evaluation"] = time.perf_counter() - started
    if config.curve:
        started = time.perf_counter()
        scores = Scores(circuit.model, circuit.task, circuit.method, circuit.layout, circuit.scores, circuit.config)
        curve = faithfulness_curve(model, scores, task, batch_size=config.batch_size, ablation=config.ablation,
                                   progress=True)
        metrics["curve"] = curve.to_dict()
        runtime["curve"] = time.perf_counter() - started
    metrics["n_full_model_wrong"] = round((1.0 - metrics["full_model"]["accuracy"]) * len(task))
    circuit.config = {**circuit.config, **config.to_dict()}
    circuit.metrics = metrics
    circuit.runtime_s = runtime
    circuit.save(Path(config.out) / "circuit.json")
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

"""Scores and circuits: what methods produce, and the self-describing ``circuit.json``.

``Scores`` holds one number per real edge. ``Circuit`` is a chosen set of edges
(``in_graph``) with the scores that chose it, the settings, metrics and
runtimes, and the task splits it was fitted and judged on.

``circuit.json`` format ``hap-circuit/4`` keeps metrics per split:
``metrics["test"]`` (held-out: the headline), ``metrics["train"]`` (in-sample,
the examples it was fitted on), ``metrics["gap"]`` (test minus train) and
``metrics["curve"]`` (MIB curve, on the test split); ``splits`` holds the
``TaskSpec`` of each split so ``hap evaluate`` rebuilds exactly the same
examples; ``nodes`` holds, per head and MLP, how much the circuit needs it
(``importance``, with the split it was measured on under ``node_importance``:
``hap.importance``), what it does (``evidence``, with the examples under
``node_evidence``: ``hap.evidence``) and, for heads, its ``role``
(``hap.roles``). Format ``hap-circuit/3`` files (importance only),
``hap-circuit/2`` files (no node importance) and
``hap-circuit/1`` files are read too: the latter's unlabelled metrics were
measured on the training examples and become ``metrics["train"]``. Selection keeps the top edges by |score|, then drops edges that cannot
matter: those whose source has no kept path from ``input`` or whose reader has
no kept path to ``logits``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .display import circuit_html
from .errors import HapError
from .graph import Graph
from .models.adapter import Layout

FORMAT = "hap-circuit/4"
FORMAT_3 = "hap-circuit/3"
FORMAT_2 = "hap-circuit/2"
FORMAT_1 = "hap-circuit/1"
READABLE_FORMATS = (FORMAT, FORMAT_3, FORMAT_2, FORMAT_1)
METRIC_SPLITS = ("test", "train")


class CircuitFileError(HapError):
    """A circuit file that cannot be read as this model's circuit."""


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Write text or bytes to ``path`` through a temporary file and a rename: never half a file.

    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_evidence(document: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The evidence table (``node_evidence`` header, each node's ``evidence``) and the roles (each head's
    ``role``) of a ``hap-circuit/4`` document; None where it has none."""
    header, nodes = document.get("node_evidence"), document.get("nodes")
    if not isinstance(header, dict) or not isinstance(nodes, dict):
        return None, None
    rows = [{"name": name, **node["evidence"]} for name, node in nodes.items()
            if isinstance(node, dict) and isinstance(node.get("evidence"), dict)]
    roles = {name: node["role"] for name, node in nodes.items() if isinstance(node, dict)
             and isinstance(node.get("role"), dict)}
    table = {key: value for key, value in header.items() if key != "has_roles"}
    return {**table, "nodes": rows}, (roles if header.get("has_roles") else None)


def _read_importance(document: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The node-importance table of a ``hap-circuit/3`` or ``/4`` document: its ``node_importance`` header and the
    ``importance`` of each node, most important first (the order it was written in)."""
    header = document.get("node_importance")
    if header is None:
        return None
    nodes = document.get("nodes")
    if not isinstance(header, dict) or not isinstance(nodes, dict):
        raise CircuitFileError(f"{source}: 'node_importance' and 'nodes' must be objects; re-run hap explain")
    rows = [{"name": name, **node["importance"]} for name, node in nodes.items()
            if isinstance(node, dict) and isinstance(node.get("importance"), dict)]
    return {**header, "nodes": sorted(rows, key=lambda row: row.get("rank", 0))}


def prune_dangling(graph: Graph, in_graph: Tensor) -> Tensor:
    """Keep only edges on a kept path from ``input`` to ``logits``. [S, R] bool -> [S, R] bool."""
    kept = in_graph & graph.real
    feeds = graph.feeds()
    reached = torch.zeros(graph.n_sources, dtype=torch.bool)  # sources with a kept path from input
    reached[0] = True
    for block in range(1, graph.n_blocks - 1):
        readers, sources = graph.readers_of_block(block), graph.sources_of_block(block)
        fed = (kept[:, readers] & reached[:, None]).any(0)  # readers of this block that receive something
        reached[sources] = (fed[:, None] & feeds[readers, sources]).any(0)
    useful_reader = torch.zeros(graph.n_readers, dtype=torch.bool)  # readers with a kept path to logits
    useful_reader[-1] = True
    for block in range(graph.n_blocks - 2, 0, -1):
        sources, readers = graph.sources_of_block(block), graph.readers_of_block(block)
        useful_source = (kept[sources] & useful_reader[None]).any(1)
        useful_reader[readers] = (feeds[readers, sources] & useful_source[None]).any(1)
    return kept & reached[:, None] & useful_reader[None]


def top_edges(graph: Graph, scores: Tensor, n_edges: int) -> Tensor:
    """[S, R] bool marking the ``n_edges`` real edges of largest |score|. A cut through tied scores keeps
    the tied edges ``torch.topk`` returns, an order torch leaves unspecified (``Scores.circuit`` records
    such a cut as ``tie_at_cut``)."""
    n_edges = max(0, min(int(n_edges), graph.n_edges))
    flat = torch.where(graph.real, scores.abs().float(), torch.tensor(-1.0)).flatten()
    chosen = torch.zeros(flat.shape, dtype=torch.bool)
    chosen[torch.topk(flat, n_edges, sorted=False).indices] = True
    return chosen.view(graph.real.shape) & graph.real


def edges_for_sparsity(graph: Graph, sparsity: float) -> int:
    """Number of edges kept when a fraction ``sparsity`` of the graph's edges is removed."""
    if not 0.0 <= sparsity <= 1.0 or math.isnan(sparsity):
        raise HapError(f"sparsity must be a fraction of edges removed, in [0, 1]; got {sparsity}")
    return round((1.0 - sparsity) * graph.n_edges)


@dataclass
class Circuit:
    """A set of kept edges of one model's graph, with what produced it.

    ``scores`` [S, R] float and ``in_graph`` [S, R] bool over the graph of
    ``layout``; ``metrics`` / ``runtime_s`` are filled by evaluation and by the
    method that found it.
    """

    model: str
    task: str
    method: str
    layout: Layout
    scores: Tensor
    in_graph: Tensor
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    runtime_s: dict[str, float] = field(default_factory=dict)
    splits: dict[str, Any] = field(default_factory=dict)  # split name -> TaskSpec dict
    kv_per_head: Tensor | None = None  # [S, L, H, 2]: per query head k/v input scores (``--per-head-kv``)
    # ``hap.importance.ImportanceTable.to_dict()``: how much the circuit needs each of its nodes (None: not measured)
    importance: dict[str, Any] | None = None
    # ``hap.evidence.EvidenceTable.to_dict()`` of the circuit's nodes, and each head's ``hap.roles.Role`` as a dict
    # (None: not measured, or no role rules for the task)
    evidence: dict[str, Any] | None = None
    roles: dict[str, dict[str, Any]] | None = None

    @property
    def held_out(self) -> dict[str, Any]:
        """The headline metrics: those of the test split (empty if the circuit was never judged on one)."""
        test = self.metrics.get("test")
        return test if isinstance(test, dict) else {}

    def graph(self) -> Graph:
        """The model's graph with this circuit's scores and selection filled in."""
        graph = Graph.from_layout(self.layout)
        graph.scores = self.scores.float().cpu().clone()
        graph.in_graph = self.in_graph.cpu() & graph.real
        return graph

    @property
    def n_edges(self) -> int:
        return int((self.in_graph.cpu() & Graph.from_layout(self.layout).real).sum())

    def node_in_graph(self, graph: Graph | None = None) -> dict[str, bool]:
        """Source nodes with a kept out-edge, and ``logits`` if it has a kept in-edge."""
        graph = graph or self.graph()
        kept = graph.in_graph
        nodes = {name: bool(kept[i].any()) for i, name in enumerate(graph.source_names)}
        nodes["logits"] = bool(kept[:, -1].any())
        return nodes

    def to_dict(self) -> dict[str, Any]:
        """The ``hap-circuit/4`` document (EAP-IG / MIB names for edges and nodes)."""
        graph = self.graph()
        sources, readers = graph.real.nonzero(as_tuple=True)
        # float32 scores: 9 significant digits give each one back exactly, in about half the characters
        scores = [float(f"{score:.9g}") for score in graph.scores[sources, readers].tolist()]
        kept = graph.in_graph[sources, readers].tolist()
        edges = {
            f"{graph.source_names[s]}->{graph.reader_names[r]}": {"score": score, "in_graph": keep}
            for s, r, score, keep in zip(sources.tolist(), readers.tolist(), scores, kept)
        }
        layout = self.layout
        return {
            "format": FORMAT,
            "model": self.model,
            "task": self.task,
            "method": self.method,
            "config": self.config,
            "splits": self.splits,
            "graph": {
                "family": layout.family,
                "n_layers": layout.n_layers,
                "n_heads": layout.n_heads,
                "n_kv_heads": layout.n_kv_heads,
                "d_model": layout.d_model,
                "head_dim": layout.head_dim,
                "vocab_size": layout.vocab_size,
                "parallel_attn_mlp": layout.parallel_attn_mlp,
                "heads_normed_together": layout.heads_normed_together,
                "kv_ungrouped": layout.kv_ungrouped,
                "n_edges": graph.n_edges,
                "n_edges_in_graph": int(graph.in_graph.sum()),
            },
            "edges": edges,
            "nodes": self._nodes(graph),
            **({"node_importance": {k: v for k, v in self.importance.items() if k != "nodes"}}
               if self.importance is not None else {}),
            **({"node_evidence": {**{k: v for k, v in self.evidence.items() if k != "nodes"},
                                  "has_roles": self.roles is not None}}
               if self.evidence is not None else {}),
            "metrics": self.metrics,
            "runtime_s": self.runtime_s,
            **({"kv_per_head": self.kv_per_head.tolist()} if self.kv_per_head is not None else {}),
        }

    def _nodes(self, graph: Graph) -> dict[str, dict[str, Any]]:
        """Each node's ``in_graph``, and its ``importance`` row where it was measured."""
        nodes: dict[str, dict[str, Any]] = {name: {"in_graph": keep}
                                            for name, keep in self.node_in_graph(graph).items()}
        for row in (self.importance or {}).get("nodes", []):
            nodes[row["name"]]["importance"] = {key: value for key, value in row.items() if key != "name"}
        for row in (self.evidence or {}).get("nodes", []):
            if row["name"] in nodes:
                nodes[row["name"]]["evidence"] = {key: value for key, value in row.items() if key != "name"}
        for name, role in (self.roles or {}).items():
            if name in nodes:
                nodes[name]["role"] = role
        return nodes

    def _repr_html_(self) -> str:
        """Jupyter's view: model, task, method, edges kept, sparsity, held-out metrics (``hap.display``)."""
        return circuit_html(self)

    def save(self, path: str | Path) -> Path:
        """Write ``circuit.json`` atomically (compact JSON); returns the path."""
        write_atomically(path, json.dumps(self.to_dict(), separators=(",", ":")))
        return Path(path)

    def check_fits(self, layout: Layout, source: str = "the circuit") -> None:
        """Refuse a model whose graph is not the one this circuit was found on."""
        mine = (self.layout.n_layers, self.layout.n_heads, self.layout.n_kv_heads)
        theirs = (layout.n_layers, layout.n_heads, layout.n_kv_heads)
        if self.layout.parallel_attn_mlp != layout.parallel_attn_mlp:
            raise CircuitFileError(
                f"{source} is a circuit of a graph whose attention and MLP run "
                f"{'side by side' if self.layout.parallel_attn_mlp else 'one after the other'}, but model "
                f"{self.model!r} runs them {'side by side' if layout.parallel_attn_mlp else 'one after the other'}: "
                "pass the model it was found on with --model")
        if self.layout.kv_ungrouped != layout.kv_ungrouped:
            graphs = ("the per-head key/value graph", "the grouped graph")
            raise CircuitFileError(
                f"{source} is a circuit of {graphs[not self.layout.kv_ungrouped]} but the model is loaded on "
                f"{graphs[not layout.kv_ungrouped]}: load it with hap.load_model(..., per_head_kv_graph="
                f"{self.layout.kv_ungrouped})")
        if mine != theirs:
            raise CircuitFileError(
                f"{source} is a circuit of a graph with {mine[0]} layers, {mine[1]} heads, {mine[2]} key/value "
                f"heads, but model {self.model!r} has {theirs[0]}, {theirs[1]}, {theirs[2]}: the file's 'model' "
                "does not match its graph; fix the file or pass the model it was found on with --model")

    @classmethod
    def from_dict(cls, document: dict[str, Any], model: str | None = None, source: str = "circuit") -> Circuit:
        """Read a ``hap-circuit/4`` (or ``/3``, ``/2``, ``/1``) document; with ``model``, refuse another model's circuit."""
        found = document.get("format")
        if found not in READABLE_FORMATS:
            raise CircuitFileError(
                f"{source} has format {found!r}, this hap-circuits reads {', '.join(map(repr, READABLE_FORMATS))}; "
                "re-run discovery with this version or convert the file"
            )
        if model is not None and document.get("model") != model:
            raise CircuitFileError(
                f"{source} is a circuit of model {document.get('model')!r}, not {model!r}; pass the same "
                "--model as at discovery"
            )
        fix = "re-run hap discover, or restore the file"
        for field_name, kind in (("model", str), ("graph", dict), ("edges", dict)):
            if not isinstance(document.get(field_name), kind):
                problem = "is missing" if field_name not in document else f"is not a {kind.__name__}"
                raise CircuitFileError(f"{source}: field {field_name!r} {problem}; {fix}")
        shape = document["graph"]
        sizes = ("n_layers", "n_heads", "n_kv_heads", "n_edges")
        bad = [name for name in sizes if isinstance(shape.get(name), bool) or not isinstance(shape.get(name), int)]
        if bad:
            raise CircuitFileError(f"{source}: graph field {bad[0]!r} is missing or not an integer; {fix}")
        for name in ("n_layers", "n_heads", "n_kv_heads"):
            if shape[name] < 1 or shape["n_heads"] % shape["n_kv_heads"]:
                raise CircuitFileError(f"{source}: graph shape {shape} is impossible; {fix}")
        layout = Layout(
            family=shape.get("family", "unknown"),
            n_layers=shape["n_layers"],
            n_heads=shape["n_heads"],
            n_kv_heads=shape["n_kv_heads"],
            d_model=shape.get("d_model", 0),
            head_dim=shape.get("head_dim", 0),
            vocab_size=shape.get("vocab_size", 0),
            parallel_attn_mlp=bool(shape.get("parallel_attn_mlp", False)),
            heads_normed_together=bool(shape.get("heads_normed_together", False)),
            kv_ungrouped=bool(shape.get("kv_ungrouped", False)),
        )
        graph = Graph.from_layout(layout)
        if graph.n_edges != shape["n_edges"]:
            raise CircuitFileError(f"{source}: graph shape gives {graph.n_edges} edges, file says {shape['n_edges']}")
        scores = torch.zeros(graph.real.shape)
        in_graph = torch.zeros(graph.real.shape, dtype=torch.bool)
        try:
            for name, edge in document["edges"].items():
                s, r = graph.edge_index(name)
                scores[s, r] = float(edge["score"])
                in_graph[s, r] = bool(edge["in_graph"])
        except KeyError as error:
            raise CircuitFileError(f"{source}: {error.args[0]}") from error
        except (TypeError, ValueError, AttributeError) as error:
            raise CircuitFileError(f"{source}: an entry of 'edges' is malformed ({error}); {fix}") from error
        metrics = document.get("metrics", {})
        if found == FORMAT_1:
            metrics = upgrade_format_1_metrics(metrics)
        evidence, roles = _read_evidence(document) if found == FORMAT else (None, None)
        kv_per_head = None
        if document.get("kv_per_head") is not None:
            want = (graph.n_sources, layout.n_layers, layout.n_heads, 2)
            try:
                kv_per_head = torch.tensor(document["kv_per_head"], dtype=torch.float32)
            except (TypeError, ValueError) as error:
                raise CircuitFileError(f"{source}: 'kv_per_head' is not a nested list of numbers; {fix}") from error
            if tuple(kv_per_head.shape) != want:
                raise CircuitFileError(f"{source}: 'kv_per_head' has shape {tuple(kv_per_head.shape)}, the graph "
                                       f"needs {want}; {fix}")
        return cls(
            model=document["model"],
            task=document.get("task", ""),
            method=document.get("method", ""),
            layout=layout,
            scores=scores,
            in_graph=in_graph,
            config=document.get("config", {}),
            metrics=metrics,
            runtime_s=document.get("runtime_s", {}),
            splits=document.get("splits", {}) if found != FORMAT_1 else {},
            kv_per_head=kv_per_head,
            importance=_read_importance(document, source) if found in (FORMAT, FORMAT_3) else None,
            evidence=evidence,
            roles=roles,
        )

    @classmethod
    def load(cls, path: str | Path, model: str | None = None) -> Circuit:
        """Read ``circuit.json`` (or a run directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "circuit.json"
        if not path.is_file():
            raise CircuitFileError(f"no circuit file at {path}; pass a circuit.json or a run directory")
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CircuitFileError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from error
        return cls.from_dict(document, model=model, source=str(path))


def upgrade_format_1_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Format 1 metrics -> format 2: ``hap discover`` measured them on the examples the circuit was fitted on,
    so they are in-sample (``train``); a stored curve is kept as it was."""
    if not isinstance(metrics, dict):
        return {}
    upgraded: dict[str, Any] = {}
    in_sample = {key: value for key, value in metrics.items() if key != "curve"}
    if in_sample:
        upgraded["train"] = in_sample
    if isinstance(metrics.get("curve"), dict):
        upgraded["curve"] = metrics["curve"]
    return upgraded


def generalisation_gap(test: dict[str, Any], train: dict[str, Any]) -> dict[str, float]:
    """Test minus train for each metric both have (negative faithfulness: the circuit holds less on new examples)."""
    keys = ("kl", "logit_diff", "accuracy", "faithfulness")
    return {key: test[key] - train[key] for key in keys
            if isinstance(test.get(key), (int, float)) and isinstance(train.get(key), (int, float))}


@dataclass
class Scores:
    """One attribution score per real edge: ``values`` [S, R] (zero off the real edges)."""

    model: str
    task: str
    method: str
    layout: Layout
    values: Tensor
    config: dict[str, Any] = field(default_factory=dict)
    runtime_s: dict[str, float] = field(default_factory=dict)
    kv_per_head: Tensor | None = None  # [S, L, H, 2]: each query head's own k/v input's score (MIB's graph)

    def circuit(self, n_edges: int, prune: bool = True) -> Circuit:
        """The top ``n_edges`` by |score|, with dangling edges dropped (``config['n_pruned_dangling']``).
        When the cut splits edges of one score, ``config['tie_at_cut']`` says [how many of them were kept,
        how many tie]: which of them were kept is arbitrary (``top_edges``)."""
        graph = Graph.from_layout(self.layout)
        chosen = top_edges(graph, self.values.cpu(), n_edges)
        kept = prune_dangling(graph, chosen) if prune else chosen
        config = {**self.config, "n_edges_requested": int(n_edges),
                  "n_pruned_dangling": int(chosen.sum() - kept.sum())}
        if bool(chosen.any()):
            magnitude = self.values.cpu().abs()
            tied = graph.real & (magnitude == magnitude[chosen].min())
            if not bool(chosen[tied].all()):
                config["tie_at_cut"] = [int(chosen[tied].sum()), int(tied.sum())]
        return Circuit(self.model, self.task, self.method, self.layout, self.values.cpu().clone(), kept,
                       config=config, runtime_s=dict(self.runtime_s), kv_per_head=self.kv_per_head)

    def top(self, n_edges: int) -> Circuit:
        """Alias of ``circuit(n_edges)``: the API's ``Scores.top(n) -> Circuit``."""
        return self.circuit(n_edges)

    def at_sparsity(self, sparsity: float) -> Circuit:
        """The circuit that removes a fraction ``sparsity`` of the edges (before pruning)."""
        return self.circuit(edges_for_sparsity(Graph.from_layout(self.layout), sparsity))

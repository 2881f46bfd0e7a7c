"""Circuits to other tools' formats: MIB / EAP-IG importances (and back), and Graphviz DOT.

MIB layout (the JSON that EAP-IG's ``Graph.to_json`` writes and
``Graph.from_json`` reads, and that the MIB circuit-localisation track
evaluates)::

    {"cfg":   {"n_layers": L, "n_heads": H, "d_model": D, "parallel_attn_mlp": false, ...},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {...}, ..., "m0": {...}, "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": 0.12, "in_graph": true}, ...}}

with every real edge listed (scores are what MIB re-thresholds to draw its
faithfulness curve). EAP-IG names a key/value input per query head
(``a4.h2<k>``): for grouped-query attention the group's reader ``a4.g0<k>``
is written once per head of the group with the group's ``in_graph``, each with
the head's own score when the circuit has per-head k/v scores (attribution
with ``--per-head-kv``: the gradient through each head's own copy of the
input, as TransformerLens' ungrouped attention gives MIB; they sum to the
group's score), else the group's score divided by the group size (per-group
sums are kept either way). Reading such a
file sums the heads' scores back and keeps a group edge if any head's copy is
kept. A ``"metadata"`` entry (ignored by EAP-IG) carries the model, task,
method, layout, settings, metrics, runtimes and splits, so that the round trip gives
the same ``Circuit``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..circuit import FORMAT, Circuit, write_atomically
from ..errors import HapError
from ..graph import Graph
from ..models.adapter import Layout
from .svg import NEGATIVE, POSITIVE, circuit_elements

MIB_KEYS = ("cfg", "nodes", "edges")
_GROUP_READER = re.compile(r"^a(\d+)\.g(\d+)<([kv])>$")
_HEAD_KV_READER = re.compile(r"^a(\d+)\.h(\d+)<([kv])>$")


class MibFormatError(HapError):
    """A file that is not an MIB / EAP-IG circuit of the expected model shape."""


def _mib_reader_names(layout: Layout, reader: str) -> list[str]:
    """EAP-IG reader names for one of our readers (one per head of the group for a GQA k/v reader)."""
    match = _GROUP_READER.match(reader)
    if match is None:
        return [reader]
    layer, group, port = int(match.group(1)), int(match.group(2)), match.group(3)
    per = layout.heads_per_group
    return [f"a{layer}.h{head}<{port}>" for head in range(group * per, (group + 1) * per)]


_READER_HEAD = re.compile(r"^a(\d+)\.h(\d+)<([kv])>$")


def to_mib(circuit: Circuit) -> dict[str, Any]:
    """The MIB / EAP-IG importances document of a circuit (see the module docstring for the layout)."""
    graph = circuit.graph()
    layout = circuit.layout
    sources, readers = graph.real.nonzero(as_tuple=True)
    edges: dict[str, dict[str, Any]] = {}
    per_head = circuit.kv_per_head
    for s, r, score, kept in zip(sources.tolist(), readers.tolist(), graph.scores[sources, readers].tolist(),
                                 graph.in_graph[sources, readers].tolist()):
        names = _mib_reader_names(layout, graph.reader_names[r])
        for reader in names:
            head = _READER_HEAD.match(reader) if per_head is not None and len(names) > 1 else None
            if head is not None:  # the head's own k/v score (--per-head-kv), not an even share of the group's
                share = float(per_head[s, int(head.group(1)), int(head.group(2)), 0 if head.group(3) == "k" else 1])
            else:
                share = score / len(names)
            edges[f"{graph.source_names[s]}->{reader}"] = {"score": share, "in_graph": bool(kept)}
    nodes = {name: {"in_graph": kept} for name, kept in circuit.node_in_graph(graph).items()}
    return {
        "cfg": {"n_layers": layout.n_layers, "n_heads": layout.n_heads, "n_key_value_heads": layout.n_kv_heads,
                "d_model": layout.d_model, "d_head": layout.head_dim, "d_vocab": layout.vocab_size,
                "parallel_attn_mlp": layout.parallel_attn_mlp},
        "nodes": nodes,
        "edges": edges,
        "metadata": {"written_by": "hap-circuits", "source_format": FORMAT, "model": circuit.model,
                     "task": circuit.task, "method": circuit.method, "family": layout.family,
                     "n_edges_in_graph": circuit.n_edges, "config": circuit.config, "metrics": circuit.metrics,
                     "runtime_s": circuit.runtime_s, "splits": circuit.splits},
    }


def from_mib(document: dict[str, Any], model: str | None = None, task: str | None = None,
             method: str | None = None, source: str = "MIB file") -> Circuit:
    """A ``Circuit`` from an MIB / EAP-IG importances document (ours or one written by EAP-IG).

    ``model``, ``task`` and ``method`` override the file's ``metadata`` (files
    written by EAP-IG have none, and get ``"unknown"``). Edges absent from the
    file get score 0 and are not kept; an edge name the model shape does not
    have raises ``MibFormatError``.
    """
    if not isinstance(document, dict) or any(key not in document for key in MIB_KEYS):
        raise MibFormatError(f"{source} is not an MIB / EAP-IG circuit: it needs the keys {', '.join(MIB_KEYS)}")
    cfg, meta = document["cfg"], document.get("metadata", {})
    try:
        n_layers, n_heads = int(cfg["n_layers"]), int(cfg["n_heads"])
    except (KeyError, TypeError, ValueError) as error:
        raise MibFormatError(f"{source}: cfg must give n_layers and n_heads") from error
    n_kv = int(cfg.get("n_key_value_heads") or n_heads)
    if n_kv <= 0 or n_heads % n_kv:
        raise MibFormatError(f"{source}: n_heads={n_heads} is not a multiple of n_key_value_heads={n_kv}")
    layout = Layout(family=meta.get("family", "unknown"), n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                    d_model=int(cfg.get("d_model", 0)), head_dim=int(cfg.get("d_head", 0)),
                    vocab_size=int(cfg.get("d_vocab", 0)), parallel_attn_mlp=bool(cfg.get("parallel_attn_mlp", False)))
    graph = Graph.from_layout(layout)
    scores = torch.zeros(graph.real.shape, dtype=torch.float64)
    in_graph = torch.zeros(graph.real.shape, dtype=torch.bool)
    gqa = n_kv < n_heads
    source_index = {name: i for i, name in enumerate(graph.source_names)}
    reader_index = {name: i for i, name in enumerate(graph.reader_names)}
    for name, edge in document["edges"].items():
        source_name, _, reader = name.partition("->")
        match = _HEAD_KV_READER.match(reader) if gqa else None
        if match is not None:  # per-head k/v copy of a group's reader
            group = int(match.group(2)) // layout.heads_per_group
            reader = f"a{match.group(1)}.g{group}<{match.group(3)}>"
        s, r = source_index.get(source_name), reader_index.get(reader)
        if s is None or r is None or not graph.real[s, r]:
            raise MibFormatError(f"{source}: no edge {name} in a model of {n_layers} layers, {n_heads} heads and "
                                 f"{n_kv} key/value heads; is this a circuit of another model?")
        try:
            scores[s, r] += float(edge["score"])
            in_graph[s, r] |= bool(edge["in_graph"])
        except (KeyError, TypeError, ValueError) as error:
            raise MibFormatError(f"{source}: edge {name} needs a numeric score and a boolean in_graph") from error
    return Circuit(model=model or meta.get("model", "unknown"), task=task or meta.get("task", "unknown"),
                   method=method or meta.get("method", "unknown"), layout=layout, scores=scores.float(),
                   in_graph=in_graph, config=meta.get("config", {}), metrics=meta.get("metrics", {}),
                   runtime_s=meta.get("runtime_s", {}), splits=meta.get("splits", {}))


def write_mib(circuit: Circuit, path: str | Path) -> Path:
    """Write the MIB / EAP-IG importances JSON of ``circuit`` atomically; returns the path."""
    write_atomically(path, json.dumps(to_mib(circuit)))
    return Path(path)


def load_mib(path: str | Path, model: str | None = None, task: str | None = None,
             method: str | None = None) -> Circuit:
    """Read an MIB / EAP-IG importances JSON file (see ``from_mib``)."""
    path = Path(path)
    if not path.is_file():
        raise MibFormatError(f"no MIB circuit file at {path}")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MibFormatError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from error
    return from_mib(document, model=model, task=task, method=method, source=str(path))


def _dot_id(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(circuit: Circuit, max_edges: int | None = None) -> str:
    """The kept subgraph as a Graphviz DOT digraph, laid out bottom to top like the SVG drawing.

    One rank per attention tier and per MLP tier (``input`` lowest, ``logits``
    highest); each circuit edge carries ``id`` = its edge name, colour by sign,
    ``penwidth`` by |score| and ``style`` solid / dashed / dotted for q / k / v.
    A GQA key/value group is a node of its own, tied to its heads by grey
    ``class="group"`` lines; invisible ``class="layer"`` edges between
    plain-text layer labels keep the tiers in order. Neither is a circuit edge.
    """
    elements = circuit_elements(circuit, max_edges)
    layout = circuit.layout
    max_score = max((abs(edge.score) for edge in elements.edges), default=0.0) or 1.0
    lines = [f"// {circuit.model} / {circuit.task} / {circuit.method}: {elements.n_kept} kept edges",
             "digraph circuit {",
             '  graph [rankdir=BT, ranksep=0.3, nodesep=0.12, fontname="Helvetica", fontsize=11, labelloc=t, '
             f"label={_dot_id(f'{circuit.model} - {circuit.task} - {circuit.method} ({elements.n_kept} edges)')}];",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, height=0.25, '
             'margin="0.06,0.02"];',
             "  edge [arrowsize=0.5];"]
    fills = {"input": "#3a3a3a", "logits": "#3a3a3a", "head": "#e6edf7", "mlp": "#fbecd6", "kv": "#e4f1df"}
    ranks: dict[tuple[int, int], list[str]] = {}
    for node in elements.nodes + elements.groups:
        font = ', fontcolor="white"' if node.kind in ("input", "logits") else ""
        label = f"{node.name} k/v" if node.kind == "kv" else node.name
        lines.append(f"  {_dot_id(node.name)} [label={_dot_id(label)}, fillcolor=\"{fills[node.kind]}\"{font}];")
        ranks.setdefault((node.layer, node.kind == "mlp"), []).append(node.name)
    # Graphviz ranks by edges alone; an invisible chain of layer labels keeps the tiers in forward order.
    previous = None
    for (layer, is_mlp), names in sorted(ranks.items()):
        if 0 <= layer < layout.n_layers:
            anchor = f"L{layer} {'mlp' if is_mlp else 'attn'}"
            lines.append(f'  {_dot_id(anchor)} [shape=plaintext, style="", fontcolor="gray50"];')
            names = [anchor, *names]
        lines.append(f"  {{rank=same; {'; '.join(_dot_id(name) for name in names)}}}")
        if previous is not None:
            lines.append(f'  {_dot_id(previous)} -> {_dot_id(names[0])} [class="layer", style=invis];')
        previous = names[0]
    drawn = {node.name for node in elements.nodes}
    for group in elements.groups:
        per = layout.heads_per_group
        for head in range(group.index * per, (group.index + 1) * per):
            name = f"a{group.layer}.h{head}"
            if name in drawn:
                lines.append(f"  {_dot_id(group.name)} -> {_dot_id(name)} [class=\"group\", color=\"gray70\", "
                             "style=dotted, arrowhead=none, constraint=false];")
    for edge in elements.edges:
        width = 0.6 + 3.4 * abs(edge.score) / max_score
        style = {"k": "dashed", "v": "dotted"}.get(edge.port, "solid")
        colour = POSITIVE if edge.score >= 0 else NEGATIVE
        lines.append(f"  {_dot_id(edge.source)} -> {_dot_id(edge.target)} [id={_dot_id(edge.name)}, "
                     f"color=\"{colour}\", penwidth={width:.2f}, style={style}, "
                     f"tooltip={_dot_id(f'{edge.name} score {edge.score:.4g}')}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(circuit: Circuit, path: str | Path) -> Path:
    """Write ``to_dot(circuit)`` atomically; returns the path."""
    write_atomically(path, to_dot(circuit))
    return Path(path)


EXPORTERS = {"mib": write_mib, "dot": write_dot}

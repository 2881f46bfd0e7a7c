"""Draw a circuit as a layered SVG: ``input`` at the bottom, one band per layer, ``logits`` on top.

The edge graph is a layered DAG whose layers are known before anything is
drawn, so the layout is direct and needs no graph-layout library: every head
has a fixed column (its index, the same in every layer), the MLP has its own
column on the right, and each layer is a band of two tiers, attention below
and MLP above (an MLP reads the heads of its own layer, so it must sit higher).
Each box lies in its own grid cell, and every cell is wider than the longest
label of the model, so no two labels can overlap whatever the circuit.
Only tiers and layers that hold a kept node take vertical space.

An edge is a curve from the top of its source to a port on the bottom of its
reader: a head's query, key and value inputs enter at its left, middle and
right (and are drawn solid, dashed and dotted); with grouped-query attention
the key/value inputs belong to a group, drawn as a small ``kv`` box after the
group's heads. Colour gives the sign of the score, width and opacity its
magnitude. ``circuit_elements`` is what both this drawing and the DOT export
show.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html import escape

import torch

from ..circuit import Circuit
from ..graph import Graph
from ..models.adapter import Layout

_READER = re.compile(r"^a(\d+)\.([hg])(\d+)<([qkv])>$")
_SOURCE = re.compile(r"^(?:a(\d+)\.h(\d+)|m(\d+))$")

POSITIVE = "#2166ac"
NEGATIVE = "#c0392b"
STATUS_COLOURS = {"found": "#1a9850", "extra": "#e66101", "missed": "#8c8c8c"}  # against a known true circuit
DASHES = {"q": None, "k": "6 3", "v": "1.6 2.4"}  # how the three attention inputs are told apart


@dataclass(frozen=True)
class DrawnNode:
    """A box of the drawing: ``kind`` is input, head, mlp, logits or kv (a GQA key/value group)."""

    name: str
    kind: str
    layer: int  # -1 for input, n_layers for logits
    index: int = 0  # head or group index


@dataclass(frozen=True)
class DrawnEdge:
    """A kept edge as drawn: from ``source`` into ``port`` (q, k, v, mlp, logits) of node ``target``."""

    name: str
    source: str
    target: str
    port: str
    score: float
    status: str = ""  # against a known true circuit: "found", "extra" (kept, not true) or "missed" (true, not kept)


@dataclass(frozen=True)
class CircuitElements:
    """The nodes and edges a drawing shows; ``edges`` are sorted by |score|, strongest last.

    ``n_kept`` counts all kept edges; ``edges`` holds fewer when the drawing was
    capped. ``groups`` are the GQA key/value groups that receive a drawn edge.
    """

    layout: Layout
    nodes: list[DrawnNode]
    groups: list[DrawnNode]
    edges: list[DrawnEdge]
    n_kept: int


def _node_of_source(name: str) -> DrawnNode:
    if name == "input":
        return DrawnNode("input", "input", -1)
    match = _SOURCE.match(name)
    if match is None:
        raise ValueError(f"not a source name: {name!r}")
    if match.group(3) is not None:
        return DrawnNode(name, "mlp", int(match.group(3)))
    return DrawnNode(name, "head", int(match.group(1)), int(match.group(2)))


def _node_of_reader(name: str, n_layers: int) -> tuple[DrawnNode, str]:
    """(node receiving the reader's input, port) for a reader name."""
    if name == "logits":
        return DrawnNode("logits", "logits", n_layers), "logits"
    match = _READER.match(name)
    if match is None:
        return _node_of_source(name), "mlp"  # an MLP's reader has the MLP's name
    layer, kind, index, port = int(match.group(1)), match.group(2), int(match.group(3)), match.group(4)
    if kind == "g":
        return DrawnNode(f"a{layer}.g{index}", "kv", layer, index), port
    return DrawnNode(f"a{layer}.h{index}", "head", layer, index), port


def true_edge_names(circuit: Circuit) -> set[str] | None:
    """The true circuit recorded with ``circuit`` (``metrics["ground_truth"]["true_edges"]``), if any."""
    recorded = circuit.metrics.get("ground_truth")
    names = recorded.get("true_edges") if isinstance(recorded, dict) else None
    return set(names) if isinstance(names, list) else None


def circuit_elements(circuit: Circuit, max_edges: int | None = None,
                     truth: set[str] | None = None) -> CircuitElements:
    """The kept subgraph of ``circuit`` as named boxes and edges.

    Nodes are every source and reader-owning node touched by a drawn edge
    (``input``, heads, MLPs, ``logits``); a node without kept edges is left
    out. With ``max_edges``, only that many edges of largest |score| are kept
    in the view (and only their nodes). Edges come sorted by ascending |score|
    so that, drawn in order, the strongest lie on top. With ``truth`` (true
    edge names) every edge gets a status, and true edges the circuit missed
    are drawn too (``status="missed"``).
    """
    graph = circuit.graph()
    shown = graph.in_graph.clone()
    if truth is not None:
        for name in truth:
            source, _, reader = name.partition("->")
            if source in graph.source_names and reader in graph.reader_names:
                shown[graph.source_names.index(source), graph.reader_names.index(reader)] = True
    sources, readers = shown.nonzero(as_tuple=True)
    scores = graph.scores[sources, readers]
    order = torch.argsort(scores.abs(), descending=True, stable=True)
    n_kept = int(graph.in_graph.sum())
    if max_edges is not None:
        order = order[: max(0, int(max_edges))]
    order = order.flip(0)
    n_layers = circuit.layout.n_layers
    nodes: dict[str, DrawnNode] = {}
    groups: dict[str, DrawnNode] = {}
    edges = []
    for i in order.tolist():
        source_name = graph.source_names[sources[i]]
        reader_name = graph.reader_names[readers[i]]
        source = _node_of_source(source_name)
        target, port = _node_of_reader(reader_name, n_layers)
        nodes[source.name] = source
        (groups if target.kind == "kv" else nodes)[target.name] = target
        name = f"{source_name}->{reader_name}"
        status = ""
        if truth is not None:
            kept = bool(graph.in_graph[sources[i], readers[i]])
            status = ("found" if name in truth else "extra") if kept else "missed"
        edges.append(DrawnEdge(name, source.name, target.name, port, float(scores[i]), status))
    return CircuitElements(circuit.layout, sorted(nodes.values(), key=_forward_order),
                           sorted(groups.values(), key=_forward_order), edges, n_kept)


def _forward_order(node: DrawnNode) -> tuple[int, bool, int]:
    return node.layer, node.kind == "mlp", node.index


@dataclass(frozen=True)
class DrawingStyle:
    """Sizes (px) and colours of the drawing; the defaults stay readable from 20 to 1,000 edges."""

    font_size: float = 11.0
    char_width: float = 0.62  # monospace advance in em, with a margin over DejaVu Sans Mono's 0.602
    box_height: float = 18.0
    box_padding: float = 6.0
    column_gap: float = 8.0
    tier_gap: float = 16.0
    margin: float = 14.0
    min_width: float = 640.0
    max_edge_width: float = 4.5
    min_edge_width: float = 0.7
    head_fill: str = "#e6edf7"
    head_stroke: str = "#4e6e9e"
    mlp_fill: str = "#fbecd6"
    mlp_stroke: str = "#b07a2a"
    kv_fill: str = "#e4f1df"
    kv_stroke: str = "#5d8f4e"
    end_fill: str = "#3a3a3a"
    band_fill: str = "#f4f5f8"

    def text_width(self, text: str, size: float | None = None) -> float:
        return len(text) * self.char_width * (size or self.font_size)


@dataclass
class _Box:
    node: DrawnNode
    x: float
    y: float
    w: float
    h: float
    label: str
    ports_in: dict[str, float] = field(default_factory=dict)  # q/k/v port -> x; none: ports spread along


@dataclass
class _Placement:
    boxes: dict[str, _Box]
    bands: list[tuple[int, float, float]]  # (layer, top, bottom)
    gaps: list[tuple[str, float]]  # (text, y) for runs of layers with nothing kept
    brackets: list[tuple[float, float, float, float]]  # GQA group outlines (x, y, w, h)
    width: float
    height: float


@dataclass(frozen=True)
class _Grid:
    """Columns shared by every layer: x of each head, kv group and the MLP, and the box widths."""

    left: float
    right: float
    head_x: dict[int, float]
    group_x: dict[int, float]
    mlp_x: float
    head_w: float
    kv_w: float


def _grid(layout: Layout, style: DrawingStyle) -> _Grid:
    """Head columns in index order (with GQA, each group's heads then its kv column), then the MLP column.
    The margin on the left holds the layer labels ("L29", and "L27-28" for skipped layers)."""
    last = layout.n_layers - 1
    left = style.margin + 8 + max(style.text_width(f"L{last}"),
                                  style.text_width(f"L{last}-{last}", style.font_size - 2))
    head_w = style.text_width(f"a{last}.h{layout.n_heads - 1}") + 2 * style.box_padding
    gqa = layout.n_kv_heads < layout.n_heads
    kv_w = style.text_width(f"g{layout.n_kv_heads - 1}") + 2 * style.box_padding if gqa else 0.0
    per_column = layout.heads_per_group if gqa else layout.n_heads
    head_x, group_x = {}, {}
    x = left
    for group in range(layout.n_kv_heads if gqa else 1):
        for head in range(group * per_column, (group + 1) * per_column):
            head_x[head] = x
            x += head_w + style.column_gap
        if gqa:
            group_x[group] = x
            x += kv_w + 2 * style.column_gap
    mlp_x = x + style.column_gap
    return _Grid(left, mlp_x + head_w, head_x, group_x, mlp_x, head_w, kv_w)


def _place(elements: CircuitElements, style: DrawingStyle, top: float) -> _Placement:
    """Boxes of the drawing from ``top`` down: logits, the layers from last to first (MLP tier above
    attention tier, empty tiers and layers left out), input."""
    layout = elements.layout
    grid = _grid(layout, style)
    head_x, head_w = grid.head_x, grid.head_w
    width = max(grid.right + style.margin, style.min_width)
    center = (grid.left + grid.right) / 2
    # input and logits take edges from everywhere: wide boxes spread their ports and untangle the fans
    end_w = max(style.text_width("logits") + 2 * style.box_padding, 0.7 * (grid.right - grid.left))
    h, pitch = style.box_height, style.box_height + style.tier_gap
    gqa = layout.n_kv_heads < layout.n_heads

    by_layer: dict[int, list[DrawnNode]] = {}
    for node in elements.nodes + elements.groups:
        by_layer.setdefault(node.layer, []).append(node)
    boxes: dict[str, _Box] = {}
    bands, gaps, brackets = [], [], []
    y = top
    if "logits" in {node.name for node in elements.nodes}:
        boxes["logits"] = _Box(by_layer[layout.n_layers][0], center - end_w / 2, y, end_w, h, "logits")
    y += h + 2 * style.tier_gap
    skipped: list[int] = []

    def close_gap() -> None:
        nonlocal y
        if skipped:
            first, last = skipped[-1], skipped[0]
            gaps.append((f"L{first}" if first == last else f"L{first}-{last}", y + 5))
            y += 16
            skipped.clear()

    for layer in range(layout.n_layers - 1, -1, -1):
        members = by_layer.get(layer, [])
        if not members:
            skipped.append(layer)
            continue
        close_gap()
        band_top = y - style.tier_gap / 2 + 2
        mlp = [node for node in members if node.kind == "mlp"]
        attention = [node for node in members if node.kind in ("head", "kv")]
        if mlp:
            boxes[mlp[0].name] = _Box(mlp[0], grid.mlp_x, y, head_w, h, mlp[0].name)
            y += pitch
        if attention:
            for node in attention:
                if node.kind == "head":
                    box = _Box(node, head_x[node.index], y, head_w, h, node.name)
                    box.ports_in = {"q": box.x + box.w / 2} if gqa else \
                        {port: box.x + box.w * f for port, f in (("q", 0.25), ("k", 0.5), ("v", 0.75))}
                else:
                    box = _Box(node, grid.group_x[node.index], y, grid.kv_w, h, f"g{node.index}")
                    box.ports_in = {"k": box.x + box.w * 0.3, "v": box.x + box.w * 0.7}
                    first = head_x[node.index * layout.heads_per_group]
                    brackets.append((first - 3, y - 3, box.x + box.w + 3 - (first - 3), h + 6))
                boxes[node.name] = box
            y += pitch
        bands.append((layer, band_top, y - style.tier_gap / 2 - 2))
    close_gap()
    y += style.tier_gap
    if "input" in {node.name for node in elements.nodes}:
        boxes["input"] = _Box(by_layer[-1][0], center - end_w / 2, y, end_w, h, "input")
    y += h + style.margin
    return _Placement(boxes, bands, gaps, brackets, width, y)


def _spread(edges: list[DrawnEdge], boxes: dict[str, _Box]) -> tuple[dict[int, float], dict[int, float]]:
    """x of each edge's start and end: fixed ports for heads and kv groups; along the box, ordered
    by the other end's x, for input, MLPs and logits (which take many edges)."""
    centre = {name: box.x + box.w / 2 for name, box in boxes.items()}
    start, end = {}, {}
    outgoing: dict[str, list[int]] = {}
    incoming: dict[str, list[int]] = {}
    for i, edge in enumerate(edges):
        outgoing.setdefault(edge.source, []).append(i)
        incoming.setdefault(edge.target, []).append(i)
    for name, indices in outgoing.items():
        box = boxes[name]
        if name != "input":
            for i in indices:
                start[i] = centre[name]
            continue
        indices.sort(key=lambda i: (centre[edges[i].target], edges[i].port))
        for rank, i in enumerate(indices):
            start[i] = box.x + box.w * (rank + 1) / (len(indices) + 1)
    for name, indices in incoming.items():
        box = boxes[name]
        if box.ports_in:
            for i in indices:
                end[i] = box.ports_in[edges[i].port]
            continue
        indices.sort(key=lambda i: (centre[edges[i].source], -boxes[edges[i].source].y))
        for rank, i in enumerate(indices):
            end[i] = box.x + box.w * (rank + 1) / (len(indices) + 1)
    return start, end


def _legend(style: DrawingStyle, width: float, max_score: float, gqa: bool,
            truth: bool = False) -> tuple[list[str], float]:
    """Legend items flowed into rows that fit ``width``; returns SVG snippets and the height used."""
    signs = [("found", "true edge, kept"), ("extra", "kept, not true"), ("missed", "true edge, not kept")] \
        if truth else [("pos", "positive score"), ("neg", "negative score")]
    items: list[tuple[str, str]] = [  # (kind, text)
        *signs,
        ("wide", f"width: |score| (max {max_score:.3g})"),
        ("q", "query input" if gqa else "query input (left port)"),
        ("k", "key input (left port of k/v group)" if gqa else "key input (middle)"),
        ("v", "value input (right port of k/v group)" if gqa else "value input (right)"),
        ("head", "attention head"), ("mlp", "MLP"),
    ]
    if gqa:
        items.append(("kv", "k/v group: shared key/value input of the heads boxed with it"))
    size = style.font_size - 1
    x, y, row_h = style.margin, 0.0, 16.0
    parts = []
    for kind, text in items:
        item_w = 30 + 6 + style.text_width(text, size) + 18
        if x + item_w > width - style.margin and x > style.margin:
            x, y = style.margin, y + row_h
        mid = y + row_h / 2
        if kind in ("pos", "neg", "wide", "q", "k", "v", *STATUS_COLOURS):
            colour = STATUS_COLOURS.get(kind, NEGATIVE if kind == "neg" else POSITIVE)
            stroke_w = style.max_edge_width if kind == "wide" else 2.0
            dash = DASHES.get(kind)
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            parts.append(f'<line x1="{x:.1f}" y1="{mid:.1f}" x2="{x + 30:.1f}" y2="{mid:.1f}" stroke="{colour}" '
                         f'stroke-width="{stroke_w}"{dash_attr}/>')
        else:
            fill, stroke = {"head": (style.head_fill, style.head_stroke), "mlp": (style.mlp_fill, style.mlp_stroke),
                            "kv": (style.kv_fill, style.kv_stroke)}[kind]
            parts.append(f'<rect x="{x + 4:.1f}" y="{mid - 6:.1f}" width="22" height="12" rx="3" fill="{fill}" '
                         f'stroke="{stroke}"/>')
        parts.append(f'<text class="legend" x="{x + 36:.1f}" y="{mid + size * 0.35:.1f}" font-size="{size}">'
                     f'{escape(text)}</text>')
        x += item_w
    return parts, y + row_h


def _background(placement: _Placement, style: DrawingStyle) -> list[str]:
    """Layer bands with their labels, rules for runs of empty layers, GQA group outlines."""
    out = []
    for layer, top, bottom in placement.bands:
        fill = style.band_fill if layer % 2 == 0 else "#ffffff"
        out.append(f'<rect class="band" x="{style.margin / 2:.1f}" y="{top:.1f}" '
                   f'width="{placement.width - style.margin:.1f}" height="{bottom - top:.1f}" fill="{fill}"/>')
        out.append(f'<text class="layer" x="{style.margin:.1f}" '
                   f'y="{(top + bottom) / 2 + style.font_size * 0.35:.1f}" fill="#777">L{layer}</text>')
    for text, y in placement.gaps:
        out.append(f'<line x1="{style.margin / 2:.1f}" y1="{y:.1f}" x2="{placement.width - style.margin / 2:.1f}" '
                   f'y2="{y:.1f}" stroke="#bbb" stroke-dasharray="1 3"/>'
                   f'<text class="gap" x="{style.margin:.1f}" y="{y - 2:.1f}" fill="#999" '
                   f'font-size="{style.font_size - 2}" font-style="italic"><title>no kept node in these layers'
                   f"</title>{escape(text)}</text>")
    for x, y, w, h in placement.brackets:
        out.append(f'<rect class="kv-group" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="4" '
                   f'fill="none" stroke="{style.kv_stroke}" stroke-opacity="0.45" stroke-dasharray="2 2"/>')
    return out


def _edge_paths(elements: CircuitElements, boxes: dict[str, _Box], style: DrawingStyle) -> list[str]:
    """One cubic curve per edge, vertical at both ends, from the source's top to the reader's port."""
    max_score = max((abs(edge.score) for edge in elements.edges), default=0.0)
    start, end = _spread(elements.edges, boxes)
    out = []
    for i, edge in enumerate(elements.edges):
        source, target = boxes[edge.source], boxes[edge.target]
        x1, y1, x2, y2 = start[i], source.y, end[i], target.y + target.h
        bend = max(12.0, (y1 - y2) * 0.45)
        strength = abs(edge.score) / max_score if max_score > 0 else 1.0
        width = style.min_edge_width + (style.max_edge_width - style.min_edge_width) * strength
        dash = f' stroke-dasharray="{DASHES[edge.port]}"' if DASHES.get(edge.port) else ""
        colour = STATUS_COLOURS[edge.status] if edge.status else POSITIVE if edge.score >= 0 else NEGATIVE
        opacity = 0.55 if edge.status == "missed" else 0.3 + 0.6 * strength
        status = f' data-status="{edge.status}"' if edge.status else ""
        tip = f"{edge.name}  score {edge.score:.4g}" + (f"  ({edge.status})" if edge.status else "")
        out.append(f'<path class="edge" data-edge="{escape(edge.name)}" data-source="{escape(edge.source)}" '
                   f'data-target="{escape(edge.target)}" data-port="{edge.port}"{status} '
                   f'd="M{x1:.1f} {y1:.1f}C{x1:.1f} {y1 - bend:.1f} {x2:.1f} {y2 + bend:.1f} {x2:.1f} {y2:.1f}" '
                   f'stroke="{colour}" stroke-width="{width:.2f}" '
                   f'stroke-opacity="{opacity:.2f}"{dash}>'
                   f"<title>{escape(tip)}</title></path>")
    return out


def _node_boxes(elements: CircuitElements, boxes: dict[str, _Box], style: DrawingStyle) -> list[str]:
    """Labelled boxes (``class="node"``, or ``"kv"`` for GQA groups) with tooltips, and dots on used ports."""
    layout = elements.layout
    colours = {"head": (style.head_fill, style.head_stroke, "#1c2a40"),
               "mlp": (style.mlp_fill, style.mlp_stroke, "#3d2a0c"),
               "kv": (style.kv_fill, style.kv_stroke, "#1f3619")}
    counts = {name: [0, 0, 0.0] for name in boxes}  # in-edges, out-edges, sum |score|
    for edge in elements.edges:
        counts[edge.target][0] += 1
        counts[edge.source][1] += 1
        counts[edge.target][2] += abs(edge.score)
        counts[edge.source][2] += abs(edge.score)
    used_ports = {(edge.target, edge.port) for edge in elements.edges}
    out = []
    for name, box in boxes.items():
        kind = box.node.kind
        fill, stroke, ink = colours.get(kind, (style.end_fill, style.end_fill, "#ffffff"))
        n_in, n_out, total = counts[name]
        tip = f"{name}: {n_in} kept in-edges, {n_out} kept out-edges, sum |score| {total:.4g}"
        if kind == "kv":
            first = box.node.index * layout.heads_per_group
            heads = ", ".join(f"h{head}" for head in range(first, first + layout.heads_per_group))
            tip = (f"{name}: the key/value input shared by heads {heads} of layer {box.node.layer}; "
                   f"{n_in} kept in-edges, sum |score| {total:.4g}")
        weight = ' font-weight="bold"' if kind in ("input", "logits") else ""
        out.append(f'<g class="{"kv" if kind == "kv" else "node"}" data-node="{escape(name)}" data-kind="{kind}">'
                   f"<title>{escape(tip)}</title>"
                   f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{box.h:.1f}" rx="3" '
                   f'fill="{fill}" stroke="{stroke}"/>'
                   f'<text x="{box.x + box.w / 2:.1f}" y="{box.y + box.h / 2 + style.font_size * 0.35:.1f}" '
                   f'text-anchor="middle" fill="{ink}"{weight}>{escape(box.label)}</text></g>')
        out += [f'<circle class="port" cx="{x:.1f}" cy="{box.y + box.h:.1f}" r="1.8" fill="{stroke}"/>'
                for port, x in box.ports_in.items() if (name, port) in used_ports]
    return out


def draw_circuit(circuit: Circuit, max_edges: int | None = 1000, style: DrawingStyle | None = None,
                 title: str | None = None) -> str:
    """The circuit as a standalone SVG document (a string, no XML declaration, so it also inlines in HTML).

    Boxes are ``<g class="node" data-node=NAME>`` (plus ``class="kv"`` groups
    for GQA key/value inputs), edges ``<path class="edge" data-edge=NAME>``,
    each with a ``<title>`` tooltip; a header holds the title, the counts and
    the legend. ``max_edges`` caps the drawing at the strongest edges (the
    subtitle says so); ``None`` draws every kept edge. A circuit judged against
    a known true circuit (``metrics["ground_truth"]``) colours its edges found,
    extra or missed instead of by sign, and draws the missed ones too.
    """
    style = style or DrawingStyle()
    truth = true_edge_names(circuit)
    elements = circuit_elements(circuit, max_edges, truth)
    layout = circuit.layout
    max_score = max((abs(edge.score) for edge in elements.edges), default=0.0)
    width = max(_grid(layout, style).right + style.margin, style.min_width)
    legend, legend_h = _legend(style, width, max_score, layout.n_kv_heads < layout.n_heads, truth is not None)
    header_h = 44 + legend_h + 12
    placement = _place(elements, style, header_h)

    n_graph = Graph.from_layout(layout).n_edges
    n_heads = sum(node.kind == "head" for node in elements.nodes)
    n_mlps = sum(node.kind == "mlp" for node in elements.nodes)
    n_missed = sum(edge.status == "missed" for edge in elements.edges)
    capped = "" if len(elements.edges) - n_missed == elements.n_kept else \
        f" (drawing the {len(elements.edges):,} of largest |score|)"
    if n_missed:
        capped += f", and {n_missed} true edges it missed"
    title = title or f"{circuit.model} · {circuit.task} · {circuit.method}"
    subtitle = (f"{elements.n_kept:,} of {n_graph:,} edges kept{capped}; {n_heads} heads, {n_mlps} MLPs; "
                f"sparsity {1 - elements.n_kept / max(n_graph, 1):.2%}")
    size = f'width="{placement.width:.0f}" height="{placement.height:.0f}"'
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="hap-circuit" {size} '
           f'viewBox="0 0 {placement.width:.0f} {placement.height:.0f}" '
           f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="{style.font_size}">',
           "<style>.edge{fill:none}.edge:hover{stroke-opacity:1}.node text,.kv text{pointer-events:none}</style>",
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{style.margin}" y="20" font-size="{style.font_size + 3}" font-weight="bold">'
           f"{escape(title)}</text>",
           f'<text x="{style.margin}" y="37" fill="#555">{escape(subtitle)}</text>',
           '<g transform="translate(0 44)">', *legend, "</g>",
           *_background(placement, style)]
    if not elements.edges:
        out.append(f'<text x="{placement.width / 2:.1f}" y="{header_h + 30:.1f}" text-anchor="middle" '
                   'fill="#999">no kept edges</text>')
    out += _edge_paths(elements, placement.boxes, style)
    out += _node_boxes(elements, placement.boxes, style)
    out.append("</svg>")
    return "\n".join(out)

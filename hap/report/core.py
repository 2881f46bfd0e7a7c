"""The report's first picture: the node-level core of a circuit.

The heads and MLPs that carry most of the circuit's held-out faithfulness (``hap explain``'s node
importance), coloured by role, one rank per block of the model (input at the bottom, logits at the top),
with the kept edges between two nodes aggregated into one line whose width is their summed |score|.
The layout is dagre's (``assets/dagre.min.js``, MIT, vendored: layered placement and crossing
minimisation); each edge asks for as many ranks as its nodes' blocks are apart, so every node sits at
its own block. In the browser: a slider sets the importance threshold, a click on a node shows its
evidence and its attention on one held-out example, hovering an edge shows its score. The page state
can also be set from the address (``#top=10&select=a9.h9``), which is how the browser test drives it.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from ..circuit import Circuit
from ..explain import Explanation, load_explanation
from ..graph import node_kind_and_layer
from .blocks import Cell, number, table

DAGRE = Path(__file__).with_name("assets") / "dagre.min.js"
CORE_NODES = 30  # nodes shown at first: the most important ones
ROLE_COLOURS = {"name mover": "#1f5fa8", "negative name mover": "#c0392b", "S-inhibition": "#7b3fa0",
                "S-suppression": "#0e7490",
                "induction": "#1a7f37", "duplicate-token": "#d97706", "previous-token": "#8d6e63",
                "unlabelled": "#98a2b3", "mlp": "#d0d5dd", "endpoint": "#1d232b"}


def _block(name: str, n_layers: int) -> int:
    """The block that writes (or, for ``logits``, reads) a node: ``Graph``'s numbering."""
    if name == "input":
        return 0
    if name == "logits":
        return 2 * n_layers + 1
    kind, layer = node_kind_and_layer(name)
    return 2 * layer + (2 if kind == "mlp" else 1)


def _reader_nodes(reader: str, heads_per_group: int) -> tuple[list[str], str]:
    """The nodes a reader belongs to and the input kind: ``a3.h1<q>`` -> (["a3.h1"], "q"); a key/value
    group's reader -> every head of the group."""
    if reader == "logits":
        return ["logits"], "logits"
    if not reader.endswith(">"):
        return [reader], "mlp"
    node, kind = reader[:-3], reader[-2]
    layer, unit = node.split(".")
    if unit.startswith("g"):
        group = int(unit[1:])
        return [f"{layer}.h{group * heads_per_group + i}" for i in range(heads_per_group)], kind
    return [node], kind


def core_data(circuit: Circuit, explanation: Explanation) -> dict[str, Any]:
    """Everything the core view draws: nodes with importance, role and evidence; the kept edges aggregated
    per pair of nodes; the held-out example whose attention a node's panel shows."""
    graph = circuit.graph()
    layout = circuit.layout
    evidence = explanation.evidence
    nodes = []
    for node in explanation.nodes():
        row, role = node.importance, node.role
        nodes.append({
            "name": row.name, "kind": row.kind, "layer": row.layer, "block": _block(row.name, layout.n_layers),
            "rank": row.rank, "importance": row.faithfulness_drop, "kl": row.kl_increase, "edges": row.n_edges,
            "direct": node.evidence.direct_effect,
            "role": role.role if role else ("mlp" if row.kind == "mlp" else "unlabelled"),
            "rule": role.rule if role else "", "numbers": role.evidence if role else {},
            "also": role.also if role else [], "detail": role.detail if role else "",
            "readers": node.evidence.readers, "example": node.evidence.example_attention or {}})
    shown = {node["name"] for node in nodes} | {"input", "logits"}
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    sources, readers = graph.in_graph.nonzero(as_tuple=True)
    for source, reader in zip(sources.tolist(), readers.tolist()):
        source_name = graph.source_names[source]
        targets, kind = _reader_nodes(graph.reader_names[reader], layout.heads_per_group)
        for target in targets:
            if source_name not in shown or target not in shown:
                continue
            pair = pairs.setdefault((source_name, target), {"source": source_name, "target": target, "n": 0,
                                                            "score": 0.0, "abs": 0.0, "kinds": []})
            score = float(graph.scores[source, reader])
            pair["n"] += 1
            pair["score"] += score
            pair["abs"] += abs(score)
            if kind not in pair["kinds"]:
                pair["kinds"].append(kind)
    table = explanation.importance
    return {"nodes": nodes, "edges": list(pairs.values()), "final_block": 2 * layout.n_layers + 1,
            "first": min(CORE_NODES, len(nodes)), "colours": ROLE_COLOURS,
            "tokens": evidence.example_tokens, "positions": evidence.example_positions,
            "split": table.split, "n_examples": table.n_examples, "faithfulness": table.faithfulness,
            "has_roles": explanation.roles is not None}


CORE_CSS = """
#core-wrap{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap}
#core-figure{flex:1 1 620px;overflow:auto;border:1px solid var(--line);max-height:900px;background:#fff}
#core-detail{flex:0 1 330px;border:1px solid var(--line);padding:10px 12px;min-height:120px;font-size:13px}
#core-detail h3{margin:0 0 6px}
.core-node{cursor:pointer}.core-node text{font:11px "DejaVu Sans Mono",Menlo,monospace;pointer-events:none}
.core-node.selected rect{stroke:#000;stroke-width:2.5}
.core-edge{fill:none;opacity:.55}.core-edge:hover{opacity:1}
.legend-chip{display:inline-block;width:11px;height:11px;border-radius:2px;margin:0 4px 0 10px;vertical-align:-1px}
.tokens span{display:inline-block;padding:1px 3px;margin:1px;border-radius:3px;font:12px monospace}
.tokens span.at{outline:1.5px solid #000}
"""

CORE_SCRIPT = """
(function(){
  var holder = document.getElementById('core-data'); if (!holder || !window.dagre) return;
  var data = JSON.parse(holder.textContent);
  var slider = document.getElementById('core-threshold'), label = document.getElementById('core-threshold-label');
  var figure = document.getElementById('core-figure'), detail = document.getElementById('core-detail');
  var ns = 'http://www.w3.org/2000/svg', selected = null;
  var byName = {}; data.nodes.forEach(function(n){ byName[n.name] = n; });
  function el(tag, attrs, parent){
    var e = document.createElementNS(ns, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]); if (parent) parent.appendChild(e); return e;
  }
  function fmt(x, d){ return (x >= 0 ? '+' : '') + x.toFixed(d === undefined ? 3 : d); }
  function draw(){
    var count = parseInt(slider.value, 10);
    var shown = data.nodes.slice(0, count);
    var threshold = shown.length ? shown[shown.length - 1].importance : 0;
    label.textContent = count + ' nodes: faithfulness lost \\u2265 ' + threshold.toFixed(4);
    var g = new dagre.graphlib.Graph({multigraph: false});
    g.setGraph({rankdir: 'BT', ranksep: 6, nodesep: 8, edgesep: 1.5, marginx: 10, marginy: 10});
    g.setDefaultEdgeLabel(function(){ return {}; });
    // input and logits are anchors only (not drawn: nearly every node touches them); markers on the nodes say so
    var blocks = {input: 0, logits: data.final_block}, names = {};
    g.setNode('input', {width: 1, height: 1}); g.setNode('logits', {width: 1, height: 1});
    shown.forEach(function(n){ g.setNode(n.name, {width: 64, height: 20}); blocks[n.name] = n.block; names[n.name] = 1; });
    var edges = data.edges.filter(function(e){ return names[e.source] && names[e.target]; });
    var fromInput = {}, toLogits = {};
    data.edges.forEach(function(e){
      if (e.source === 'input' && names[e.target]) fromInput[e.target] = e;
      if (e.target === 'logits' && names[e.source]) toLogits[e.source] = e;
    });
    g.setEdge('input', 'logits', {minlen: data.final_block, weight: 1});
    var into = {}, outof = {};
    edges.forEach(function(e){
      g.setEdge(e.source, e.target, {minlen: Math.max(1, blocks[e.target] - blocks[e.source]), weight: 1});
      into[e.target] = 1; outof[e.source] = 1;
    });
    // Each edge asks for exactly its blocks' distance, so the tightest layout puts every node at its own
    // block; anchors to input and logits (free: weight 0) pin the first and last nodes of each chain there.
    shown.forEach(function(n){
      if (!into[n.name]) g.setEdge('input', n.name, {minlen: n.block, weight: 0});
      if (!outof[n.name]) g.setEdge(n.name, 'logits', {minlen: data.final_block - n.block, weight: 0});
    });
    dagre.layout(g);
    var size = g.graph();
    figure.innerHTML = '';
    var natural = document.getElementById('core-natural').checked;
    var svg = el('svg', {id: 'core-svg', width: natural ? size.width : '100%', viewBox: '0 0 ' + size.width + ' ' +
                         size.height, preserveAspectRatio: 'xMidYMin meet'}, figure);
    if (!natural) svg.setAttribute('style', 'max-width:' + Math.max(size.width, 420) + 'px');
    var largest = Math.max.apply(null, edges.map(function(e){ return e.abs; }).concat([1e-12]));
    function describe(e){
      return e.source + ' \u2192 ' + e.target + ' (' + e.kinds.join(', ') + '): ' + e.n + ' kept edge' +
        (e.n > 1 ? 's' : '') + ', score ' + fmt(e.score, 4) + ', |score| ' + e.abs.toFixed(4);
    }
    edges.forEach(function(e){
      var points = g.edge(e.source, e.target).points;
      var d = 'M' + points.map(function(p){ return p.x.toFixed(1) + ',' + p.y.toFixed(1); }).join(' L');
      var path = el('path', {d: d, 'class': 'core-edge', 'stroke-width': (0.8 + 5 * e.abs / largest).toFixed(2),
                             stroke: e.score >= 0 ? '#1f5fa8' : '#c0392b', 'data-source': e.source,
                             'data-target': e.target}, svg);
      el('title', {}, path).textContent = describe(e);
    });
    shown.forEach(function(n){
      var name = n.name, box = g.node(name);
      var group = el('g', {'class': 'core-node' + (name === selected ? ' selected' : ''), 'data-node': name,
                           transform: 'translate(' + (box.x - box.width / 2) + ',' + (box.y - box.height / 2) + ')'}, svg);
      el('rect', {width: box.width, height: box.height, rx: n.kind === 'mlp' ? 2 : 9,
                  fill: data.colours[n.role] || data.colours.unlabelled}, group);
      var text = el('text', {x: box.width / 2, y: 14, 'text-anchor': 'middle',
                             fill: n.kind === 'mlp' || n.role === 'unlabelled' ? '#1d232b' : '#fff'}, group);
      text.textContent = name;
      el('title', {}, group).textContent = name + ' \u00b7 ' + n.role + ' \u00b7 rank ' + n.rank +
        ' \u00b7 faithfulness lost ' + fmt(n.importance, 4);
      if (toLogits[name]) {
        var out = el('circle', {'class': 'core-logits', cx: box.width - 2, cy: 2, r: 4.5,
                                fill: toLogits[name].score >= 0 ? '#1f5fa8' : '#c0392b', stroke: '#fff'}, group);
        el('title', {}, out).textContent = describe(toLogits[name]);
      }
      if (fromInput[name]) {
        var inp = el('circle', {'class': 'core-input', cx: 2, cy: box.height - 2, r: 4, fill: '#1d232b',
                                stroke: '#fff'}, group);
        el('title', {}, inp).textContent = describe(fromInput[name]);
      }
      group.addEventListener('click', function(){ select(name); });
    });
    document.documentElement.setAttribute('data-core-nodes', String(shown.length));
  }
  function attentionRow(n, from){
    var row = n.example[from]; if (!row) return '';
    var peak = Math.max.apply(null, row.concat([1e-9]));
    return '<div class="tokens">' + data.tokens.map(function(t, i){
      var a = row[i] / peak;
      return '<span' + (i === data.positions[from] ? ' class="at"' : '') + ' title="' + row[i].toFixed(3) +
        '" style="background:rgba(31,95,168,' + a.toFixed(3) + ');color:' + (a > 0.55 ? '#fff' : '#1d232b') + '">' +
        t.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/ /g, '\\u00a0') + '</span>';
    }).join('') + '</div>';
  }
  function select(name){
    selected = name; var n = byName[name];
    figure.querySelectorAll('.core-node').forEach(function(g){
      g.classList.toggle('selected', g.getAttribute('data-node') === name); });
    var numbers = Object.keys(n.numbers).filter(function(k){ return !/_share$/.test(k) && k !== 'direct_effect'; }).map(function(k){
      return '<tr><th>' + k + '</th><td class="num">' + n.numbers[k].toFixed(3) + '</td></tr>'; }).join('');
    var readers = Object.keys(n.readers).map(function(k){ return k + ': ' + n.readers[k].join(', '); }).join('<br>');
    var html = '<h3 id="core-selected">' + name + ' \\u00b7 <span style="color:' + (data.colours[n.role] || '#000') +
      '">' + n.role + '</span></h3>';
    if (n.rule) html += '<p class="note">Rule: ' + n.rule + (n.detail ? ' (' + n.detail + ')' : '') + '</p>';
    if (n.also.length) html += '<p class="note">Also fits: ' + n.also.join(', ') + '</p>';
    html += '<table class="facts" id="core-evidence"><tr><th>importance rank</th><td class="num">' + n.rank +
      '</td></tr><tr><th>faithfulness lost</th><td class="num">' + fmt(n.importance, 4) + '</td></tr>' +
      '<tr><th>KL added</th><td class="num">' + fmt(n.kl, 4) + '</td></tr><tr><th>direct effect</th>' +
      '<td class="num">' + fmt(n.direct) + '</td></tr>' + numbers + '</table>';
    if (readers) html += '<p><b>Read by</b> (in the circuit)<br>' + readers + '</p>';
    var froms = Object.keys(n.example);
    if (froms.length) {
      html += '<p><b>Attention on one held-out example</b>, from <select id="core-from">' + froms.map(function(f){
        return '<option' + (f === 'END' ? ' selected' : '') + '>' + f + '</option>'; }).join('') +
        '</select></p><div id="core-attention">' + attentionRow(n, froms.indexOf('END') >= 0 ? 'END' : froms[0]) + '</div>';
    }
    detail.innerHTML = html;
    var choose = document.getElementById('core-from');
    if (choose) choose.addEventListener('change', function(){
      document.getElementById('core-attention').innerHTML = attentionRow(n, choose.value); });
  }
  slider.max = String(data.nodes.length); slider.min = String(Math.min(1, data.nodes.length));
  slider.value = String(data.first);
  slider.addEventListener('input', draw);
  document.getElementById('core-natural').addEventListener('change', draw);
  var wanted = {}; (location.hash || '').replace(/^#/, '').split('&').forEach(function(kv){
    var p = kv.split('='); if (p[0]) wanted[p[0]] = decodeURIComponent(p[1] || ''); });
  draw();
  if (wanted.top) { slider.value = wanted.top; slider.dispatchEvent(new Event('input')); }
  var first = wanted.select && figure.querySelector('.core-node[data-node="' + wanted.select + '"]');
  if (first) first.dispatchEvent(new MouseEvent('click', {bubbles: true}));
  document.documentElement.setAttribute('data-core-ready', '1');
})();
"""


def core_section(circuit: Circuit, source: Path) -> str:
    """The report's core view (or, for a circuit without node importance, how to get it)."""
    explanation = load_explanation(circuit)
    if explanation is None or not explanation.importance.nodes:
        return ('<p class="note" id="core-missing">This circuit has no node importance yet, so the report cannot '
                f"draw its core: run <code>hap explain {escape(str(source.parent))}</code> (it stores importance, "
                "evidence and roles in circuit.json), then <code>hap report</code> again. The full drawing is "
                "below.</p>")
    data = core_data(circuit, explanation)
    legend = "".join(f'<span class="legend-chip" style="background:{colour}"></span>{escape(role)}'
                     for role, colour in ROLE_COLOURS.items() if role != "endpoint")
    where = {"test": "held-out test", "train": "training (in-sample)"}.get(data["split"], data["split"])
    return "\n".join([
        f'<p class="note">The heads and MLPs the circuit needs most, measured on {data["n_examples"]} {where} '
        f'examples (faithfulness lost when the node leaves the circuit with its edges; the circuit\'s own is '
        f'{data["faithfulness"]:.3f}). One rank per block, the first layers at the bottom; a line is all kept '
        "edges between two nodes (width: summed |score|; blue positive, red negative). A dot at a node's top right: "
        "it writes to the logits; at its bottom left: it reads the embeddings. Click a node for its evidence; "
        "hover a line or a dot for its score." + ("" if data["has_roles"] else " No role rules read this task: colours are "
                                 "heads and MLPs only.") + "</p>",
        f'<p><label for="core-threshold">Show the most important </label><input type="range" id="core-threshold" '
        f'min="1" max="{len(data["nodes"])}" value="{data["first"]}" step="1"> <span id="core-threshold-label">'
        f'</span> <label><input type="checkbox" id="core-natural"> actual size (scroll)</label></p>'
        f'<p class="note">{legend}</p>',
        '<div id="core-wrap"><div id="core-figure"></div><div id="core-detail"><p class="note">Click a node to see '
        "its role, the numbers that earned it, who reads it and its attention on one held-out example.</p></div>"
        "</div>",
        f'<script type="application/json" id="core-data">{_script_json(data)}</script>',
        _top_table(data)])


def _script_json(data: dict[str, Any]) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(data).replace("</", "<\\/")


def _top_table(data: dict[str, Any], limit: int = 12) -> str:
    rows = []
    for node in data["nodes"][:limit]:
        numbers = ", ".join(f"{key} {value:.2f}" for key, value in node["numbers"].items()
                            if not key.endswith("_share") and node["role"] != "unlabelled")
        rows.append([number(node["rank"]), Cell(node["name"], cls="name"), Cell(node["role"]),
                     number(node["importance"]), number(node["kl"]), number(node["direct"]), Cell(numbers)])
    return "<h3>Most important nodes</h3>" + table(
        ["rank", "node", "role", "faithfulness lost", "KL added", "direct effect", "evidence for the role"], rows,
        sortable=True, table_id="core-table")


def core_assets() -> tuple[str, str]:
    """(CSS, the scripts: dagre, then the view) to inline in the page."""
    return CORE_CSS, DAGRE.read_text(encoding="utf-8") + "\n" + CORE_SCRIPT

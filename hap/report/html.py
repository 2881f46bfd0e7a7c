"""The run report: one self-contained ``report.html`` per run directory.

Everything is inside the file (the circuit drawing as inline SVG, curves as
base64 PNG, a few lines of inline JavaScript to sort tables and highlight a
node's edges), so it opens from disk with no network. The building blocks
(``page``, ``table``, ``Cell``, ``fmt``, ``png_image``) are in ``blocks``,
shared with the comparison page and the core view.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..circuit import Circuit, write_atomically
from ..errors import HapError
from ..evaluation import CHANCE_ACCURACY, fails_task
from ..graph import reader_kind
from ..tasks.splits import TaskSpec
from .blocks import Cell, duration, fmt, number, page, png_image, table
from .core import core_assets, core_section
from .curves import CurveSeries, faithfulness_figure, read_train_log, roc_figure, save_figure, training_figure
from .svg import circuit_elements, draw_circuit

TRAIN_LOG = "train_log.jsonl"
METRIC_COLUMNS = (("logit_diff", "logit diff"), ("accuracy", "accuracy"), ("kl", "KL to full model"),
                  ("faithfulness", "faithfulness"))


def metrics_rows(metrics: dict[str, Any]) -> tuple[list[list[Cell | str]], list[str]]:
    """Rows of one split's metrics table: the circuit, then the full model and the empty circuit as references."""
    rows, classes = [], []
    for label, values, cls in (("circuit", metrics, ""), ("full model (all edges)", metrics.get("full_model"), "ref"),
                               ("empty circuit (no edges)", metrics.get("empty_circuit"), "ref")):
        values = values if isinstance(values, dict) else {}
        row: list[Cell | str] = [Cell(label)]
        for key, _ in METRIC_COLUMNS:
            value = values.get(key)
            if key == "faithfulness" and value is None and cls:
                value = 1 if label.startswith("full") else 0  # f is 1 and 0 there by definition
            row.append(number(value))
        rows.append(row)
        classes.append(cls)
    return rows, classes


def node_totals(circuit: Circuit) -> list[dict[str, Any]]:
    """Per head, MLP and (with GQA) key/value group that has a kept edge: kept in/out edge counts and their
    summed |score|, largest total first.

    These are the boxes of the drawing (``circuit_elements``): a GQA group's
    key/value inputs are counted on the group, not on each of its heads.
    """
    kinds = {"head": "head", "mlp": "MLP", "kv": "k/v group"}
    elements = circuit_elements(circuit)
    rows = {node.name: {"name": node.name, "kind": kinds[node.kind], "layer": node.layer, "n_in": 0, "n_out": 0,
                        "score_in": 0.0, "score_out": 0.0}
            for node in elements.nodes + elements.groups if node.kind in kinds}
    for edge in elements.edges:
        if edge.source in rows:
            rows[edge.source]["n_out"] += 1
            rows[edge.source]["score_out"] += abs(edge.score)
        if edge.target in rows:
            rows[edge.target]["n_in"] += 1
            rows[edge.target]["score_in"] += abs(edge.score)
    for row in rows.values():
        row["total"] = row["score_in"] + row["score_out"]
    return sorted(rows.values(), key=lambda row: -row["total"])


def _edge_table(circuit: Circuit, limit: int) -> str:
    graph = circuit.graph()
    sources, readers = graph.in_graph.nonzero(as_tuple=True)
    scores = graph.scores[sources, readers]
    order = torch.argsort(scores.abs(), descending=True, stable=True)
    rows = []
    for rank, i in enumerate(order[:limit].tolist(), start=1):
        source, reader = graph.source_names[sources[i]], graph.reader_names[readers[i]]
        score = float(scores[i])
        rows.append([number(rank), Cell(f"{source}->{reader}", cls="name"), Cell(source, cls="name"),
                     Cell(reader, cls="name"), Cell(reader_kind(reader)), number(score), number(abs(score))])
    note = "" if len(order) <= limit else \
        f'<p class="note">The {limit:,} edges of largest |score| of {len(order):,}; all are in circuit.json.</p>'
    return note + table(["rank", "edge", "source", "reader", "input", "score", "|score|"], rows, sortable=True,
                        table_id="edges", scroll=True)


def _node_table(circuit: Circuit) -> str:
    rows = [[Cell(row["name"], cls="name"), Cell(row["kind"]), number(row["layer"]), number(row["n_in"]),
             number(row["n_out"]), number(row["score_in"]), number(row["score_out"]), number(row["total"])]
            for row in node_totals(circuit)]
    return table(["node", "kind", "layer", "kept in-edges", "kept out-edges", "Σ|score| in", "Σ|score| out",
                  "Σ|score| total"], rows, sortable=True, table_id="nodes", scroll=True)


def _settings(config: dict[str, Any]) -> str:
    rows = []
    for key in sorted(config):
        if key == "command":
            continue
        value = config[key]
        text = value if isinstance(value, str) else json.dumps(value)
        rows.append([Cell(key, cls="name"), Cell(text, cls="name")])
    return table(["setting", "value"], rows, table_id="settings") if rows else \
        '<p class="note">No settings were recorded.</p>'


def _runtime(runtime: dict[str, Any]) -> str:
    stages = {key: value for key, value in runtime.items() if isinstance(value, (int, float))}
    if not stages:
        return '<p class="note">No runtimes were recorded.</p>'
    total = sum(stages.values())
    rows = [[Cell(stage), Cell(duration(seconds), seconds, "num"),
             number(100 * seconds / total if total else None, 3)] for stage, seconds in stages.items()]
    rows.append([Cell("total"), Cell(duration(total), total, "num"), number(100.0 if total else None, 3)])
    return table(["stage", "time", "share (%)"], rows, table_id="runtime")


def _split_line(circuit: Circuit, split: str) -> str:
    recorded = circuit.splits.get(split)
    if not isinstance(recorded, dict):
        return "not recorded"
    try:
        return TaskSpec.from_dict(recorded).describe()
    except HapError:
        return "not readable"


def _metrics_section(circuit: Circuit) -> str:
    """Held-out metrics as the headline table, in-sample ones beside them (labelled), and the gap."""
    test, train, gap = circuit.held_out, circuit.metrics.get("train"), circuit.metrics.get("gap") or {}
    headers = ["", *(label for _, label in METRIC_COLUMNS)]
    parts = ["<h3>Held out: the test split</h3>"]
    if test:
        rows, classes = metrics_rows(test)
        parts += [f'<p class="note">{escape(_split_line(circuit, "test"))}</p>',
                  table(headers, rows, table_id="metrics", row_classes=classes)]
        if fails_task(test.get("full_model")):
            parts.append('<p class="note no" id="weak-model">The full model fails the task on these examples (at '
                         f'or below chance, {CHANCE_ACCURACY:.2f}, or wrong on average): this circuit explains a '
                         "broken behaviour. Check the BOS token (<code>--bos</code>), the prompt format and the "
                         "answer tokens.</p>")
    else:
        parts.append('<p class="note no" id="metrics">This circuit file has no held-out metrics (it predates '
                     "held-out splits, or was never measured on one): run <code>hap evaluate</code> on it. The "
                     "numbers below are in-sample.</p>")
    if isinstance(train, dict) and train:
        rows, classes = metrics_rows(train)
        parts += ["<h3>In-sample: training examples (for comparison only)</h3>",
                  f'<p class="note">{escape(_split_line(circuit, "train"))}; measured on the first '
                  f'{fmt(train.get("n_examples"))} of them. A circuit is judged by the held-out numbers above.</p>',
                  table(headers, rows, table_id="metrics-train", row_classes=classes)]
    if gap:
        row = [Cell("test − train")] + [number(gap.get(key)) for key, _ in METRIC_COLUMNS]
        parts += ["<h3>Generalisation gap</h3>", table(headers, [row], table_id="gap")]
    return "\n".join(parts)


def _convergence(config: dict[str, Any]) -> str:
    if "final_expected_sparsity" not in config or "target_sparsity" not in config:
        return ""
    expected, target = config["final_expected_sparsity"], config["target_sparsity"]
    converged = bool(config.get("converged"))
    words = "within tolerance: converged" if converged else "NOT converged: binarisation removed edges the masks " \
        "still kept; raise --steps or --max-extra-steps"
    cls = "yes" if converged else "no"
    return (f'<p class="note" id="convergence">Expected sparsity before binarisation {expected:.4f}, target '
            f'{target:.4f} ({(expected - target) * 100:+.2f} percentage points, <span class="{cls}">{words}</span>) '
            f'after {fmt(config.get("steps_done"))} steps.</p>')


def _summary(circuit: Circuit, source: Path) -> str:
    graph = circuit.graph()
    nodes = circuit.node_in_graph(graph)
    heads = sum(1 for name, kept in nodes.items() if kept and name.startswith("a"))
    mlps = sum(1 for name, kept in nodes.items() if kept and name.startswith("m"))
    kept, total = circuit.n_edges, graph.n_edges
    layout = circuit.layout
    curve = circuit.metrics.get("curve") if isinstance(circuit.metrics.get("curve"), dict) else {}
    facts = [("model", circuit.model),
             ("shape", f"{layout.family}, {layout.n_layers} layers, {layout.n_heads} heads, "
                       f"{layout.n_kv_heads} key/value heads, d_model {layout.d_model}"),
             ("task", circuit.task), ("method", circuit.method),
             ("edges kept", f"{kept:,} of {total:,} (sparsity {1 - kept / total:.2%})"),
             ("nodes kept", f"{heads} heads, {mlps} MLPs"),
             ("held-out examples", _split_line(circuit, "test")),
             ("training examples", _split_line(circuit, "train")),
             ("CPR (higher is better)", fmt(curve.get("cpr"))), ("CMD (0 is best)", fmt(curve.get("cmd"))),
             ("circuit file", str(source))]
    return table([], [[Cell(k), Cell(v)] for k, v in facts], cls="facts", table_id="summary")


def _ground_truth_section(circuit: Circuit, roc_png: bytes | None) -> str:
    """Precision, recall, exact recovery and AUC against a known true circuit, with the ROC curve."""
    recovered = circuit.metrics.get("ground_truth")
    if not isinstance(recovered, dict):
        return ""
    whole = recovered.get("program_edges")
    facts = [("true circuit", f"{recovered.get('n_true')} edges: {recovered.get('truth')}"
              + (f" (the program's circuit has {whole})" if whole is not None else "")),
             ("kept edges", str(recovered.get("n_chosen"))), ("precision", fmt(recovered.get("precision"))),
             ("recall", fmt(recovered.get("recall"))), ("exact recovery", "yes" if recovered.get("exact") else "no"),
             ("ROC AUC of the scores", fmt(recovered.get("auc"), 3))]
    parts = ["<h2>Ground truth</h2>", table([], [[Cell(k), Cell(v)] for k, v in facts], cls="facts",
                                             table_id="ground-truth"),
             '<p class="note">The drawing colours kept edges that are true green, kept edges that are not '
             "orange, and draws true edges the circuit missed in grey. The ROC curve ranks every edge by the "
             "circuit's |score|.</p>"]
    if roc_png:
        parts.append(f'<div class="figure">{png_image(roc_png, "ROC curve against the true circuit")}</div>')
    return "\n".join(parts)


def _headline(circuit: Circuit) -> str:
    """The held-out numbers in one line ("held-out faithfulness 0.84, accuracy 0.85 (full model 0.95)")."""
    test = circuit.held_out
    if not test:
        return "no held-out metrics"
    full = test.get("full_model") if isinstance(test.get("full_model"), dict) else {}
    return (f"held-out faithfulness {fmt(test.get('faithfulness'), 3)}, accuracy {fmt(test.get('accuracy'), 3)} "
            f"(full model {fmt(full.get('accuracy'), 3)}), KL {fmt(test.get('kl'), 3)}")


def render_report(circuit: Circuit, source: Path, svg: str, curves_png: bytes | None,
                  training_png: bytes | None, max_table_edges: int = 2000, roc_png: bytes | None = None) -> str:
    """The report page of one run as an HTML string (see ``write_report``, which also makes the figures)."""
    title = f"{circuit.model} · {circuit.task} · {circuit.method}"
    command = circuit.config.get("command")
    has_core = circuit.importance is not None and circuit.evidence is not None
    parts = [f"<h1>Circuit report: {escape(title)}</h1>",
             f'<p class="sub">hap-circuits {__version__} · {circuit.n_edges:,} kept edges · {escape(_headline(circuit))}'
             "</p>",
             "<h2>The circuit's core</h2>", core_section(circuit, source),
             f'<details id="all-edges"{"" if has_core else " open"}><summary>Every kept edge (the full '
             "drawing)</summary>",
             '<p class="note">Hover a node to show only its edges; hover an edge for its name and score.</p>',
             f'<div class="figure" id="circuit">{svg}</div></details>',
             '<div class="grid"><section><h2>Run</h2>', _summary(circuit, source), "</section>",
             "<section><h2>Metrics</h2>", _metrics_section(circuit),
             '<p class="note">Faithfulness f = (m(C) − m(∅)) / (m(N) − m(∅)) with m the logit difference; '
             "the reference rows are the full model and the circuit with every edge ablated.</p>",
             _convergence(circuit.config),
             "<h2>Runtime</h2>", _runtime(circuit.runtime_s), "</section></div>",
             "<h2>Reproduce</h2>",
             f"<pre id=\"command\">{escape(command)}</pre>" if command else
             '<p class="note">This run did not record its command line (config["command"]).</p>',
             _ground_truth_section(circuit, roc_png),
             "<h2>Faithfulness curve</h2>",
             f'<p class="note">Measured on the {escape(str((circuit.metrics.get("curve") or {}).get("split", "unrecorded")))} '
             "split.</p>" if curves_png else "",
             f'<div class="figure">{png_image(curves_png, "faithfulness curve")}</div>' if curves_png else
             '<p class="note">No faithfulness curve in circuit.json (metrics["curve"]).</p>']
    if training_png:
        parts += ["<h2>Training</h2>",
                  '<p class="note">KL on each step\'s training batch, and the circuit read off the masks so far '
                  "measured on a fixed batch of held-out test examples: when the two part, the masks over-fit.</p>",
                  f'<div class="figure">{png_image(training_png, "training curves")}</div>']
    elif circuit.method in ("ep", "hap"):
        parts += ["<h2>Training</h2>", f'<p class="note">No {TRAIN_LOG} next to the circuit.</p>']
    parts += ["<h2>Heads and MLPs by total |score|</h2>", _node_table(circuit),
              "<h2>Kept edges</h2>", _edge_table(circuit, max_table_edges),
              "<h2>All settings</h2>", _settings(circuit.config)]
    css, script = core_assets()
    return page(f"hap report: {title}", "\n".join(parts), css, script)


def circuit_path(run: str | Path) -> Path:
    """The ``circuit.json`` of a run directory (or the file itself when given a file)."""
    run = Path(run)
    return run / "circuit.json" if run.is_dir() else run


def faithfulness_point(circuit: Circuit) -> tuple[float, float] | None:
    """(fraction of edges kept, held-out faithfulness) of the circuit itself, when it is known."""
    value = circuit.held_out.get("faithfulness")
    if not isinstance(value, (int, float)):
        return None
    return circuit.n_edges / circuit.graph().n_edges, float(value)


def write_report(run_dir: str | Path, out: str | Path | None = None, max_drawn_edges: int | None = 1000,
                 max_table_edges: int = 2000) -> Path:
    """Write ``report.html`` for a run, with ``circuit.svg`` and the curves as PNG + SVG beside it.

    ``run_dir`` is a run directory holding ``circuit.json`` (and, for ep/hap,
    ``train_log.jsonl``) or a ``circuit.json`` path; ``out`` defaults to
    ``report.html`` in that directory, and the other files go next to
    ``out``: ``circuit.svg``, ``faithfulness.{png,svg}`` when the circuit has
    a curve, ``training.{png,svg}`` when there is a training log. The drawing
    shows at most ``max_drawn_edges`` edges and the edge table at most
    ``max_table_edges`` rows (the strongest). Returns the path of the report.
    """
    source = circuit_path(run_dir)
    circuit = Circuit.load(source)
    out = Path(out) if out is not None else source.parent / "report.html"
    folder = out.parent
    svg = draw_circuit(circuit, max_edges=max_drawn_edges)
    write_atomically(folder / "circuit.svg", svg + "\n")
    curves_png = training_png = None
    curve = circuit.metrics.get("curve")
    if isinstance(curve, dict) and curve.get("fractions"):
        series = CurveSeries(circuit.method, curve, faithfulness_point(circuit))
        curves_png, _, _ = save_figure(faithfulness_figure([series]), folder / "faithfulness")
    records = read_train_log(source.parent / TRAIN_LOG)
    if records:
        training_png, _, _ = save_figure(training_figure(records), folder / "training")
    roc_png = None
    if isinstance(circuit.metrics.get("ground_truth"), dict):
        roc_png, _, _ = save_figure(roc_figure(circuit.metrics["ground_truth"], circuit.method), folder / "roc")
    write_atomically(out, render_report(circuit, source, svg, curves_png, training_png, max_table_edges, roc_png))
    return out

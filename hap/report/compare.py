"""Compare circuits of one model and task found by different methods (or settings).

The page shows the metrics side by side, the overlap of kept edges and of
kept heads/MLPs (Jaccard index), which components one run keeps and another
drops (the view of the HAP paper's IOI case study, where EAP at 94% sparsity
drops the S-inhibition heads that HAP keeps), and all faithfulness curves on
one plot.
"""

from __future__ import annotations

import json

from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Sequence

from ..circuit import Circuit, write_atomically
from ..errors import HapError
from ..graph import Graph
from .blocks import Cell, duration, number, page, png_image, table
from .curves import CurveSeries, faithfulness_figure, render
from .html import METRIC_COLUMNS, circuit_path, faithfulness_point
from .svg import draw_circuit


class IncomparableRunsError(HapError):
    """Runs that cannot be compared: fewer than two, or of different models, tasks or model shapes."""


@dataclass(frozen=True)
class Run:
    """A loaded run: a short ``label`` for columns (its directory name) and its circuit."""

    label: str
    path: Path
    circuit: Circuit


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Load the circuits of 2+ runs and check they can be compared (same model, task and shape).

    Labels are the run directories' names, made unique with the method and
    then a number where they clash. Raises ``IncomparableRunsError`` otherwise.
    """
    if len(paths) < 2:
        raise IncomparableRunsError(f"compare needs at least two runs, got {len(paths)}; pass two or more run "
                                    "directories")
    runs = []
    for path in paths:
        source = circuit_path(path)
        runs.append(Run(source.parent.name if source.name == "circuit.json" else source.stem, source,
                        Circuit.load(source)))
    first = runs[0]
    for run in runs[1:]:
        for what in ("model", "task"):
            mine, theirs = getattr(first.circuit, what), getattr(run.circuit, what)
            if mine != theirs:
                raise IncomparableRunsError(
                    f"cannot compare runs of different {what}s: {first.path} is {what} {mine!r}, {run.path} is "
                    f"{theirs!r}; compare runs of one model and one task")
        if (first.circuit.layout.n_layers, first.circuit.layout.n_heads, first.circuit.layout.n_kv_heads) != (
                run.circuit.layout.n_layers, run.circuit.layout.n_heads, run.circuit.layout.n_kv_heads):
            raise IncomparableRunsError(f"{first.path} and {run.path} name the same model but have graphs of "
                                        "different shapes; re-run one of them with this hap-circuits")
    return [Run(label, run.path, run.circuit) for label, run in zip(_unique_labels(runs), runs)]


def _unique_labels(runs: Sequence[Run]) -> list[str]:
    """Run labels, told apart by method when directory names clash, else by a number."""
    labels = [run.label for run in runs]
    if len(set(labels)) == len(labels):
        return labels
    with_method = [f"{run.label} ({run.circuit.method})" for run in runs]
    if len(set(with_method)) == len(with_method):
        return with_method
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return unique


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; 1.0 for two empty sets (they are equal)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def kept_edges(circuit: Circuit) -> set[str]:
    """Names of the kept edges (``a3.h1->a5.h2<q>``)."""
    graph = circuit.graph()
    sources, readers = graph.in_graph.nonzero(as_tuple=True)
    return {f"{graph.source_names[s]}->{graph.reader_names[r]}" for s, r in zip(sources.tolist(), readers.tolist())}


def kept_components(circuit: Circuit) -> set[str]:
    """Heads and MLPs in the circuit (a kept out-edge), without ``input`` and ``logits``, which nearly
    every circuit has and which would inflate the overlap."""
    return {name for name, kept in circuit.node_in_graph().items() if kept and name not in ("input", "logits")}


def _component_key(name: str) -> tuple[int, int, int]:
    if name.startswith("m"):
        return int(name[1:]), 1, 0
    layer, head = name[1:].split(".h")
    return int(layer), 0, int(head)


def _matrix(runs: Sequence[Run], sets: Sequence[set], table_id: str) -> str:
    rows = []
    for run, mine in zip(runs, sets):
        rows.append([Cell(run.label, cls="name")] + [number(jaccard(mine, theirs), 3) for theirs in sets])
    return table(["", *(run.label for run in runs)], rows, table_id=table_id)


def _differences(runs: Sequence[Run], components: Sequence[set]) -> str:
    """Components kept by some runs and not all: one row each, a column per run."""
    union = set().union(*components)
    common = set.intersection(*components) if components else set()
    differing = sorted(union - common, key=_component_key)
    if not differing:
        return f'<p class="note">All runs keep the same {len(common)} heads and MLPs.</p>'
    rows = []
    for name in differing:
        marks = [Cell("✓", 1, "yes") if name in kept else Cell("–", 0, "no") for kept in components]
        holders = [run.label for run, kept in zip(runs, components) if name in kept]
        rows.append([Cell(name, cls="name"), number(_component_key(name)[0]), *marks, Cell(", ".join(holders))])
    note = (f'<p class="note">{len(common)} heads/MLPs are kept by every run; these {len(differing)} are kept by '
            "some and not others.</p>")
    return note + table(["component", "layer", *(run.label for run in runs), "kept by"], rows, sortable=True,
                        table_id="differences", scroll=True)


def _pairwise(runs: Sequence[Run], components: Sequence[set]) -> str:
    items = []
    for i, a in enumerate(runs):
        for j, b in enumerate(runs):
            if i == j:
                continue
            only = sorted(components[i] - components[j], key=_component_key)
            heads = [name for name in only if name.startswith("a")]
            text = ", ".join(heads) if heads else "none"
            items.append(f"<li><b>{escape(a.label)}</b> keeps, <b>{escape(b.label)}</b> drops "
                         f"({len(heads)} heads): <code>{escape(text)}</code></li>")
    return f'<ul id="pairwise">{"".join(items)}</ul>'


def read_roles(path: str | Path) -> dict[str, dict]:
    """Head roles from a file: a ``circuit.json`` with roles (``nodes.NAME.role``, ``hap explain``) or
    ``{"roles": {"a9.h9": {"role": "name mover", ...}, ...}}`` (the case study's ``roles.json``)."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise HapError(f"--roles {path}: cannot read it as JSON ({error})") from None
    if isinstance(document.get("roles"), dict):
        return document["roles"]
    nodes = document.get("nodes")
    roles = {name: node["role"] for name, node in (nodes or {}).items()
             if isinstance(node, dict) and isinstance(node.get("role"), dict)} if isinstance(nodes, dict) else {}
    if not roles:
        raise HapError(f"--roles {path}: no roles in it; give a circuit.json that hap explain has filled, or a "
                       '{"roles": {...}} file')
    return roles


def run_roles(runs: Sequence[Run], given: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every head's role known to the comparison: ``given``, then those the runs' circuits carry."""
    roles: dict[str, dict] = {}
    for run in runs:
        for name, role in (run.circuit.roles or {}).items():
            roles.setdefault(name, role)
    return {**roles, **(given or {})}


def _kept_roles(runs: Sequence[Run], components: Sequence[set], roles: dict[str, dict]) -> str:
    """Per role class, how many of its heads each run keeps, and per labelled head whether each run keeps it."""
    from ..roles import IOI_RULES

    labelled = {name: role["role"] for name, role in roles.items() if role.get("role") not in (None, "unlabelled")}
    if not labelled:
        return ('<p class="note" id="kept-roles">No head roles are known for these runs: run <code>hap explain'
                "</code> on one of them, or pass <code>--roles FILE</code>.</p>")
    order = [rule.role for rule in IOI_RULES] + sorted({r for r in labelled.values()} - {r.role for r in IOI_RULES})
    rows = []
    for role in order:
        heads = sorted((name for name, held in labelled.items() if held == role), key=_component_key)
        if not heads:
            continue
        cells = []
        for kept in components:
            inside = [name for name in heads if name in kept]
            cells.append(Cell(f"{len(inside)} of {len(heads)}", len(inside) / len(heads), "num",
                              title=", ".join(inside) or "none"))
        rows.append([Cell(role), Cell(", ".join(heads), cls="name"), *cells])
    head_rows = []
    for name in sorted(labelled, key=_component_key):
        marks = [Cell("✓", 1, "yes") if name in kept else Cell("–", 0, "no") for kept in components]
        head_rows.append([Cell(name, cls="name"), Cell(labelled[name]), *marks])
    return ('<p class="note" id="kept-roles">Roles are found on the full model (hap explain: attention between '
            "named positions, direct effect, path patching for S-inhibition); a run keeps a head when its circuit "
            "has a kept edge out of it.</p>"
            + table(["role", "heads", *(run.label for run in runs)], rows, table_id="roles-kept")
            + "<details><summary>Every labelled head</summary>"
            + table(["head", "role", *(run.label for run in runs)], head_rows, sortable=True, table_id="role-heads",
                    scroll=True) + "</details>")


def render_comparison(runs: Sequence[Run], roles: dict[str, dict] | None = None) -> str:
    """The comparison page of loaded runs as an HTML string (``roles``: head roles to show kept side by side,
    besides those the circuits carry)."""
    first = runs[0].circuit
    total = Graph.from_layout(first.layout).n_edges
    edges = [kept_edges(run.circuit) for run in runs]
    components = [kept_components(run.circuit) for run in runs]
    overview = []
    for run, kept, comps in zip(runs, edges, components):
        c = run.circuit
        seconds = sum(value for value in c.runtime_s.values() if isinstance(value, (int, float)))
        overview.append([Cell(run.label, cls="name"), Cell(c.method), number(len(kept)),
                         number(1 - len(kept) / total, 4), number(sum(n.startswith("a") for n in comps)),
                         number(sum(n.startswith("m") for n in comps)),
                         Cell(duration(seconds) if c.runtime_s else "n/a", seconds if c.runtime_s else None, "num"),
                         Cell(str(run.path), cls="name")])
    metric_rows = []
    for key, label in METRIC_COLUMNS:
        metric_rows.append([Cell(f"{label} (test, held out)")] + [number(run.circuit.held_out.get(key))
                                                                  for run in runs])
    for key, label in (("cpr", "CPR (higher is better)"), ("cmd", "CMD (0 is best)")):
        metric_rows.append([Cell(label)] + [number((run.circuit.metrics.get("curve") or {}).get(key))
                                            for run in runs])
    for ref, label in (("full_model", "full model"), ("empty_circuit", "empty circuit")):
        for key, name in METRIC_COLUMNS[:3]:
            metric_rows.append([Cell(f"{label}: {name} (test)")] + [
                number((run.circuit.held_out.get(ref) or {}).get(key)) for run in runs])
    for key, label in METRIC_COLUMNS:
        metric_rows.append([Cell(f"{label} (train, in-sample)")] + [
            number((run.circuit.metrics.get("train") or {}).get(key)) for run in runs])
    same_test = len({json.dumps(run.circuit.splits.get("test"), sort_keys=True) for run in runs}) == 1
    split_note = ("All runs were measured on the same held-out test split." if same_test and first.splits.get("test")
                  else "The runs were not all measured on the same test split: compare their test numbers with "
                  "care, or re-score them with hap evaluate on one split.")
    series = [CurveSeries(run.label, run.circuit.metrics["curve"], faithfulness_point(run.circuit)) for run in runs
              if isinstance(run.circuit.metrics.get("curve"), dict)]
    curve_html = '<p class="note">None of these runs has a faithfulness curve.</p>'
    if series:
        png, _ = render(faithfulness_figure(series))
        curve_html = f'<div class="figure">{png_image(png, "faithfulness curves")}</div>'
    drawings = "".join(f"<details><summary>{escape(run.label)} ({escape(run.circuit.method)})</summary>"
                       f'<div class="figure">{draw_circuit(run.circuit)}</div></details>' for run in runs)
    title = f"{first.model} · {first.task}: {len(runs)} circuits"
    parts = [f"<h1>Comparison: {escape(title)}</h1>",
             f'<p class="sub">{", ".join(escape(f"{r.label} ({r.circuit.method})") for r in runs)}</p>',
             "<h2>Runs</h2>",
             table(["run", "method", "edges", "sparsity", "heads", "MLPs", "runtime", "circuit file"], overview,
                   sortable=True, table_id="runs"),
             "<h2>Metrics</h2>", f'<p class="note" id="split-note">{escape(split_note)}</p>',
             table(["", *(run.label for run in runs)], metric_rows, table_id="metrics"),
             "<h2>Overlap</h2>", '<div class="grid"><section><h3>Kept edges (Jaccard)</h3>',
             _matrix(runs, edges, "edge-jaccard"), "</section><section><h3>Kept heads and MLPs (Jaccard)</h3>",
             _matrix(runs, components, "node-jaccard"), "</section></div>",
             "<h2>Kept heads by role</h2>", _kept_roles(runs, components, run_roles(runs, roles)),
             "<h2>Heads and MLPs kept by some runs only</h2>", _differences(runs, components),
             "<h3>Heads one run keeps and another drops</h3>", _pairwise(runs, components),
             "<h2>Faithfulness curves</h2>", curve_html,
             "<h2>Circuits</h2>", drawings]
    return page(f"hap compare: {title}", "\n".join(parts))


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path, roles: dict[str, dict] | None = None) -> Path:
    """Write a self-contained comparison page of 2+ runs of one model and task to ``out``; returns it.
    ``roles``: head roles (``read_roles``) to show which each run keeps.

    Raises ``IncomparableRunsError`` for fewer than two runs or runs of
    different models, tasks or graph shapes.
    """
    out = Path(out)
    write_atomically(out, render_comparison(load_runs(run_dirs), roles))
    return out

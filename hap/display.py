"""How a ``Circuit``, an ``Explanation`` and ``Metrics`` look in a Jupyter notebook (their ``_repr_html_``).

Small HTML tables with the numbers the CLI summary leads with: the circuit's model, task, method, edges
kept of the graph's total and sparsity, its held-out metrics beside the in-sample ones, the nodes it
needs most; the explanation's roles table. Every piece of text is escaped: names come from files and
tokenizers.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any, Iterable

from .graph import Graph
from .tasks import TaskSpec

if TYPE_CHECKING:
    from .circuit import Circuit
    from .evaluation import Metrics
    from .explain import Explanation

CORE_ROWS = 5  # nodes of the circuit shown, the most important first
EXPLANATION_ROWS = 20  # as ``hap explain``'s default --top
METRIC_ROWS = (("kl", "KL"), ("logit_diff", "logit diff"), ("accuracy", "accuracy"), ("faithfulness", "faithfulness"))


def _number(value: Any, digits: int = 4, signed: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """An HTML table; every cell is escaped here."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts(rows: Iterable[tuple[str, str]]) -> str:
    """Label: value lines, as a two-column table without header."""
    body = "".join(f"<tr><th style=\"text-align:left\">{escape(label)}</th><td style=\"text-align:left\">"
                   f"{escape(value)}</td></tr>" for label, value in rows)
    return f"<table>{body}</table>"


def circuit_html(circuit: Circuit) -> str:
    """The circuit in a notebook: what found it, edges kept of the total and sparsity, the splits, held-out
    metrics (with the in-sample ones and the gap, when measured) and its most important nodes."""
    total = Graph.from_layout(circuit.layout).n_edges
    kept = circuit.n_edges
    dangling = circuit.config.get("n_pruned_dangling")
    facts = [("edges kept", f"{kept:,} of {total:,} ({1 - kept / total:.2%} sparsity"
                            + (f"; {dangling:,} dangling dropped)" if isinstance(dangling, int) else ")"))]
    for name, label in (("test", "held out"), ("train", "fitted on")):
        spec = circuit.splits.get(name)
        if isinstance(spec, dict):
            try:
                facts.append((label, TaskSpec.from_dict(spec).describe()))
            except Exception:  # noqa: BLE001 (a display must not fail on a split it cannot read)
                facts.append((label, f"{name} split (unreadable record)"))
    parts = [f"<div class=\"hap-circuit\"><strong>{escape(f'{circuit.model} / {circuit.task} / {circuit.method}')}"
             "</strong>", _facts(facts)]
    metrics = circuit.metrics or {}
    columns = [(label, metrics.get(key)) for key, label in (("test", "test (held out)"), ("train", "train (in-sample)"))
               if isinstance(metrics.get(key), dict)]
    gap = metrics.get("gap") if isinstance(metrics.get("gap"), dict) else None
    if columns:
        numerical = circuit.layout.vocab_size == 1  # one output column: the divergence is a squared error
        header = ["", *(label for label, _ in columns)] + (["gap"] if gap else [])
        rows = []
        for key, label in METRIC_ROWS:
            label = {"kl": "sq. error", "logit_diff": "value metric"}.get(key, label) if numerical else label
            rows.append([label, *(_number(values.get(key)) for _, values in columns)]
                        + ([_number(gap.get(key), signed=True)] if gap else []))
        for key, label in (("full_model", "full model"), ("empty_circuit", "empty circuit")):
            refs = [values.get(key) or {} for _, values in columns]
            rows.append([label, *(f"ld {_number(ref.get('logit_diff'), 2)} acc {_number(ref.get('accuracy'), 2)}"
                                  for ref in refs)] + ([""] if gap else []))
        rows.append(["examples", *(str(values.get("n_examples", "n/a")) for _, values in columns)]
                    + ([""] if gap else []))
        parts.append(_table(header, rows))
    else:
        parts.append("<p>No held-out metrics yet: <code>hap.evaluate(model, circuit, test)</code> measures them "
                     "(store them with <code>circuit.metrics[\"test\"] = metrics.to_dict()</code>).</p>")
    nodes = (circuit.importance or {}).get("nodes") or []
    if nodes:
        roles = circuit.roles or {}
        rows = [[str(row.get("name")), (roles.get(row.get("name")) or {}).get("role", "-"),
                 _number(row.get("faithfulness_drop"), signed=True), _number(row.get("kl_increase"), signed=True)]
                for row in nodes[:CORE_ROWS]]
        where = (circuit.importance or {}).get("split", "?")
        parts.append(f"<p>The {min(CORE_ROWS, len(nodes))} of {len(nodes)} heads and MLPs the circuit needs most "
                     f"({escape(str(where))} split):</p>")
        parts.append(_table(["node", "role", "faithfulness lost", "KL added"], rows))
    return "".join(parts) + "</div>"


def explanation_html(explanation: Explanation, top: int | None = EXPLANATION_ROWS) -> str:
    """The roles table in a notebook: rank, node, role, importance (faithfulness lost, KL added, the
    attribution estimate when there is one), direct effect and the numbers behind the role; the rules."""
    table, evidence = explanation.importance, explanation.evidence
    where = {"test": "held-out test", "train": "training (in-sample)"}.get(table.split, table.split)
    intro = (f"Circuit on {table.n_examples} {where} examples: faithfulness {table.faithfulness:.4f}, KL "
             f"{table.kl:.4f} ({table.ablation} ablation). Importance: what the circuit loses without the node "
             f"and its edges. Evidence, on the full model: attention between named positions "
             f"({', '.join(evidence.positions)}) and the direct effect (full-model metric "
             f"{evidence.full_metric:+.3f}).")
    header = ["rank", "node", "role", "faithfulness lost", "KL added"]
    header += ["attribution"] if table.attribution_method else []
    header += ["direct effect", "evidence"]
    nodes = explanation.nodes()
    rows = []
    for node in nodes[:top]:
        row = node.importance
        role = node.role.role if node.role else "-"
        cells = [str(row.rank), row.name, role, _number(row.faithfulness_drop, signed=True),
                 _number(row.kl_increase, signed=True)]
        if table.attribution_method:
            cells.append(_number(row.attribution, signed=True) if row.attribution is not None else "")
        cells += [_number(node.evidence.direct_effect, 3, signed=True), node.evidence_text()]
        rows.append(cells)
    parts = [f"<div class=\"hap-explanation\"><p>{escape(intro)}</p>", _table(header, rows)]
    if top is not None and len(nodes) > top:
        parts.append(f"<p>... {len(nodes) - top} more nodes (<code>explanation.nodes()</code>).</p>")
    if explanation.roles is not None:
        counts = explanation.role_counts()
        summary = ", ".join(f"{role} {count}" for role, count in counts.items()) or "none"
        rules = "".join(f"<li>{escape(rule.role)}: {escape(rule.rule)}</li>" for rule in explanation.rules)
        parts.append(f"<p>Roles in the circuit: {escape(summary)}.</p><details><summary>The role rules"
                     f"</summary><ul>{rules}</ul></details>")
    else:
        parts.append("<p>No role rules for this task (they read IOI's named positions): evidence only.</p>")
    return "".join(parts) + "</div>"


def metrics_html(metrics: Metrics) -> str:
    """A circuit's scores with the full model's and the empty circuit's beside them."""
    rows = [[label, _number(getattr(metrics, key)),
             _number(metrics.full_model.get(key)) if key != "faithfulness" else "1.0000",
             _number(metrics.empty_circuit.get(key)) if key != "faithfulness" else "0.0000"]
            for key, label in METRIC_ROWS]
    caption = f"{metrics.n_edges:,} edges on {metrics.n_examples} examples"
    return (f"<div class=\"hap-metrics\"><p>{escape(caption)}</p>"
            + _table(["", "circuit", "full model", "empty circuit"], rows) + "</div>")

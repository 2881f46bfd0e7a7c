"""Curves of a run with matplotlib: the MIB faithfulness curve and the Edge Pruning / HAP training curves.

Figures are built with matplotlib's object API (``Figure``, no ``pyplot``), so
nothing global is touched and no display is needed. ``render`` turns a figure
into PNG and SVG bytes; ``save_figure`` writes both next to each other.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ..circuit import write_atomically
from ..errors import HapError

COLOURS = ["#1f5fa8", "#c0392b", "#2e8b57", "#8e44ad", "#d4820b", "#17a2b8", "#555555", "#b5651d"]


class TrainLogError(HapError):
    """A ``train_log.jsonl`` line that is not a JSON object."""


@dataclass(frozen=True)
class CurveSeries:
    """One method's faithfulness curve (the ``metrics["curve"]`` of ``circuit.json``) and, optionally,
    the run's own circuit as a point: ``point`` = (fraction of edges kept, faithfulness)."""

    label: str
    curve: dict[str, Any]
    point: tuple[float, float] | None = None


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (one JSON object per line), in file order.

    Blank lines are skipped, and so is a truncated last line (a run that was
    killed while writing); any other line that is not a JSON object raises
    ``TrainLogError`` naming the line. A missing file gives an empty list.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break  # the run stopped mid-line
            raise TrainLogError(f"{path}:{number} is not JSON ({error.msg}); fix or delete that line") from error
        if not isinstance(record, dict):
            raise TrainLogError(f"{path}:{number} is not a JSON object; each line must be one {{...}} record")
        records.append(record)
    return records


def _percent(value: float, _position: Any = None) -> str:
    return f"{value * 100:g}%"


def _numbers(values: Any) -> list[float] | None:
    if not isinstance(values, (list, tuple)) or not values:
        return None
    return [float("nan") if value is None else float(value) for value in values]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def faithfulness_figure(series: Sequence[CurveSeries]) -> Figure:
    """Faithfulness f(k) against the fraction k of edges kept, one line per series, on two panels.

    Left: edges ranked by signed score (CPR is the area under f, higher is
    better); right: ranked by |score| (CMD is the area of |1 - f|, 0 is best).
    The x axis is logarithmic over the MIB fractions; dotted lines mark the
    full model (f = 1) and the empty circuit (f = 0). CPR and CMD of each
    series are in the legend; a series' ``point`` is drawn as a star.
    """
    figure = Figure(figsize=(10, 4.4), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    panels = (("faithfulness_signed", "ranked by signed score  (CPR: area under f, higher is better)"),
              ("faithfulness_abs", "ranked by |score|  (CMD: area of |1 - f|, 0 is best)"))
    handles = []
    for i, item in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        fractions = _numbers(item.curve.get("fractions"))
        label = f"{item.label}:  CPR {_fmt(item.curve.get('cpr'))},  CMD {_fmt(item.curve.get('cmd'))}"
        drawn = None
        for axis, (key, _) in zip(axes, panels):
            values = _numbers(item.curve.get(key))
            if fractions and values and len(values) == len(fractions):
                (drawn,) = axis.plot(fractions, values, marker="o", markersize=3.5, linewidth=1.6, color=colour)
            if item.point is not None:
                axis.plot([item.point[0]], [item.point[1]], marker="*", markersize=11, color=colour,
                          markeredgecolor="black", markeredgewidth=0.6, linestyle="none")
        if drawn is None:
            (drawn,) = axes[0].plot([], [], color=colour)
        drawn.set_label(label)
        handles.append(drawn)
    for axis, (key, title) in zip(axes, panels):
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(FuncFormatter(_percent))
        axis.axhline(1.0, color="#888", linestyle=":", linewidth=1)
        axis.axhline(0.0, color="#888", linestyle=":", linewidth=1)
        axis.set_title(title, fontsize=9.5)
        axis.set_xlabel("edges kept (fraction of the graph)")
        axis.grid(True, which="major", alpha=0.25)
        if not any(_numbers(item.curve.get(key)) for item in series):
            axis.text(0.5, 0.5, "not measured", transform=axis.transAxes, ha="center", color="#999")
    axes[0].set_ylabel("faithfulness f = (m(C) - m(empty)) / (m(full) - m(empty))", fontsize=8.5)
    axes[0].text(0.01, 1.0, "full model", transform=axes[0].get_yaxis_transform(), va="bottom", ha="left",
                 fontsize=7.5, color="#777")
    axes[0].text(1.0, 0.0, " empty circuit", transform=axes[0].get_yaxis_transform(), va="bottom", ha="right",
                 fontsize=7.5, color="#777")
    if any(item.point is not None for item in series):
        (star,) = axes[1].plot([], [], marker="*", markersize=11, color="#ccc", markeredgecolor="black",
                               markeredgewidth=0.6, linestyle="none", label="the run's circuit")
        handles.append(star)
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2), fontsize=8.5,
                      frameon=False)
    return figure


def training_figure(records: Sequence[dict[str, Any]]) -> Figure:
    """Training curves of an Edge Pruning / HAP run from its ``train_log.jsonl`` records, against step.

    Six panels: loss; KL to the full model on each step's training batch and,
    where logged, of the circuit read off the masks on held-out test examples
    (log scale when positive); that circuit's held-out faithfulness and
    accuracy; expected edge sparsity with its (warming-up) target; the Lagrange
    multipliers lambda1 and lambda2; the learning rate. A quantity missing from
    the log is shown as "not logged".
    """
    figure = Figure(figsize=(12, 6.4), layout="constrained")
    axes = figure.subplots(2, 3, sharex=True).flatten()
    steps = [record.get("step", i) for i, record in enumerate(records)]

    def series(key: str) -> tuple[list[float], list[float]]:
        pairs = [(step, record[key]) for step, record in zip(steps, records)
                 if isinstance(record.get(key), (int, float))]
        return [p[0] for p in pairs], [float(p[1]) for p in pairs]

    panels = [("loss", [("loss", "loss", COLOURS[0])]),
              ("KL(full || circuit)", [("kl", "training batch (soft masks)", COLOURS[1]),
                                       ("test_kl", "held-out (binarised circuit)", COLOURS[0])]),
              ("held-out circuit", [("test_faithfulness", "faithfulness", COLOURS[2]),
                                    ("test_accuracy", "accuracy", COLOURS[3])]),
              ("edge sparsity", [("expected_sparsity", "expected sparsity", COLOURS[0]),
                                 ("target_sparsity", "target", "#888")]),
              ("Lagrange multipliers", [("lambda1", "lambda1", COLOURS[2]), ("lambda2", "lambda2", COLOURS[3])]),
              ("mask learning rate", [("lr", "lr", COLOURS[4])])]
    for axis, (title, lines) in zip(axes, panels):
        drawn = 0
        for key, label, colour in lines:
            x, y = series(key)
            if x:
                style = "--" if key == "target_sparsity" else "-"
                marker = "o" if key.startswith("test_") else None
                axis.plot(x, y, style, color=colour, linewidth=1.4, label=label, marker=marker, markersize=3)
                drawn += 1
        axis.set_title(title, fontsize=10)
        axis.grid(True, alpha=0.25)
        if not drawn:
            axis.text(0.5, 0.5, "not logged", transform=axis.transAxes, ha="center", color="#999")
            continue
        if lines[0][0] == "kl" and all(value > 0 for key in ("kl", "test_kl") for value in series(key)[1]):
            axis.set_yscale("log")
        if len(lines) > 1:
            axis.legend(fontsize=8, frameon=False)
    for axis in axes[3:]:
        axis.set_xlabel("step")
    return figure


def roc_figure(recovery: dict[str, Any], label: str) -> Figure:
    """The ROC curve of a circuit's score ranking against a known true circuit (``metrics["ground_truth"]``),
    with the chance diagonal and the circuit's own kept edges as a point."""
    figure = Figure(figsize=(4.6, 4.2), layout="constrained")
    axis = figure.subplots()
    roc = recovery.get("roc") or {}
    axis.plot([0, 1], [0, 1], "--", color="#bbb", linewidth=1, label="chance")
    axis.plot(roc.get("fpr", []), roc.get("tpr", []), color=COLOURS[0], linewidth=1.6,
              label=f"{label} (AUC {recovery.get('auc', float('nan')):.3f})")
    n_true, n_chosen, hits = recovery.get("n_true"), recovery.get("n_chosen"), recovery.get("true_positives")
    n_false = recovery.get("n_false")
    if isinstance(n_true, int) and isinstance(hits, int) and isinstance(n_chosen, int) and n_false:
        axis.plot([(n_chosen - hits) / n_false], [hits / n_true], "o", color=COLOURS[1], label="kept edges")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_xlim(-0.02, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.grid(True, alpha=0.25)
    axis.legend(fontsize=8, frameon=False, loc="lower right")
    return figure


def render(figure: Figure) -> tuple[bytes, bytes]:
    """(PNG at 150 dpi, SVG) bytes of a figure; no timestamps, so equal figures give equal files."""
    png, svg = io.BytesIO(), io.BytesIO()
    figure.savefig(png, format="png", dpi=150, metadata={"Software": None})
    figure.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    return png.getvalue(), svg.getvalue()


def save_figure(figure: Figure, stem: str | Path) -> tuple[bytes, Path, Path]:
    """Write ``stem.png`` and ``stem.svg``; returns the PNG bytes (for embedding) and both paths."""
    stem = Path(stem)
    png, svg = render(figure)
    png_path, svg_path = stem.with_suffix(".png"), stem.with_suffix(".svg")
    write_atomically(png_path, png)
    write_atomically(svg_path, svg)
    return png, png_path, svg_path

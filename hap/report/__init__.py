"""Reports of circuits: drawings, curves, HTML pages, comparisons and exports.

``write_report(run_dir)`` writes a run's self-contained ``report.html``
(``html``); ``compare_runs`` puts 2+ runs of one model and task side by side
(``compare``); ``draw_circuit`` is the layered SVG drawing (``svg``);
``faithfulness_figure`` / ``training_figure`` the matplotlib curves
(``curves``); ``write_mib`` / ``load_mib`` / ``write_dot`` the exports
(``export``); ``commands.register`` adds ``hap report|compare|export``.

Names are imported on first use (matplotlib is slow to import).
"""

from __future__ import annotations

from ..lazy import lazy_attributes

# name -> the submodule that defines it; imported on first use (PEP 562)
_EXPORTS = {
    "IncomparableRunsError": ".compare",
    "compare_runs": ".compare",
    "jaccard": ".compare",
    "faithfulness_figure": ".curves",
    "read_train_log": ".curves",
    "training_figure": ".curves",
    "MibFormatError": ".export",
    "from_mib": ".export",
    "load_mib": ".export",
    "to_dot": ".export",
    "to_mib": ".export",
    "write_dot": ".export",
    "write_mib": ".export",
    "write_report": ".html",
    "DrawingStyle": ".svg",
    "circuit_elements": ".svg",
    "draw_circuit": ".svg",
}

__all__ = [
    "DrawingStyle",
    "IncomparableRunsError",
    "MibFormatError",
    "circuit_elements",
    "compare_runs",
    "draw_circuit",
    "faithfulness_figure",
    "from_mib",
    "jaccard",
    "load_mib",
    "read_train_log",
    "to_dot",
    "to_mib",
    "training_figure",
    "write_dot",
    "write_mib",
    "write_report",
]


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())

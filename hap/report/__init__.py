"""Reports of circuits: drawings, curves, HTML pages, comparisons and exports.

``write_report(run_dir)`` writes a run's self-contained ``report.html``
(``html``); ``compare_runs`` puts 2+ runs of one model and task side by side
(``compare``); ``draw_circuit`` is the layered SVG drawing (``svg``);
``faithfulness_figure`` / ``training_figure`` the matplotlib curves
(``curves``); ``write_mib`` / ``load_mib`` / ``write_dot`` the exports
(``export``); ``commands.register`` adds ``hap report|compare|export``.
"""

from .compare import IncomparableRunsError, compare_runs, jaccard
from .curves import faithfulness_figure, read_train_log, training_figure
from .export import MibFormatError, from_mib, load_mib, to_dot, to_mib, write_dot, write_mib
from .html import write_report
from .svg import DrawingStyle, circuit_elements, draw_circuit

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

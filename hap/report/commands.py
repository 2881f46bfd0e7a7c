"""The ``hap report``, ``hap compare`` and ``hap export`` subcommands (added to the CLI by ``register``)."""

from __future__ import annotations

import argparse

EXPORT_FORMATS = ("dot", "mib")  # hap.report.export.EXPORTERS, known before matplotlib and torch are imported


def _report(args: argparse.Namespace) -> int:
    from .html import write_report

    path = write_report(args.run_dir, out=args.out, max_drawn_edges=args.max_drawn_edges or None,
                        max_table_edges=args.max_table_edges)
    print(path)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare_runs, read_roles

    print(compare_runs(args.runs, args.out, read_roles(args.roles) if args.roles else None))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..circuit import Circuit
    from .export import EXPORTERS

    circuit = Circuit.load(args.circuit)  # a circuit.json or a run directory
    print(EXPORTERS[args.format](circuit, args.out))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``report``, ``compare`` and ``export`` to the ``hap`` subcommands; each sets ``run=handler``."""
    report = commands.add_parser(
        "report", help="write report.html for a run: circuit drawing, metrics, curves, tables",
        description="Write RUN/report.html (one self-contained file) with circuit.svg, faithfulness.{png,svg} "
        "and, for ep/hap runs, training.{png,svg} beside it.")
    report.add_argument("run_dir", metavar="RUN", help="run directory holding circuit.json (or a circuit.json path)")
    report.add_argument("--out", default=None, help="report path (default RUN/report.html)")
    report.add_argument("--max-drawn-edges", type=int, default=1000,
                        help="draw at most this many edges, the strongest (default 1000; 0 draws all)")
    report.add_argument("--max-table-edges", type=int, default=2000,
                        help="list at most this many kept edges in the table (default 2000)")
    report.set_defaults(run=_report)

    compare = commands.add_parser(
        "compare", help="compare 2+ runs of one model and task: metrics, overlap, curves",
        description="Write one self-contained HTML page comparing the circuits of runs of the same model and task.")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or circuit.json paths)")
    compare.add_argument("--out", default="compare.html", help="output HTML path (default compare.html)")
    compare.add_argument("--roles", default=None, metavar="FILE",
                         help="head roles to show kept side by side: a circuit.json filled by hap explain, or a "
                         '{"roles": {...}} file (default: the roles the runs carry)')
    compare.set_defaults(run=_compare)

    export = commands.add_parser(
        "export", help="export a circuit for other tools: MIB / EAP-IG importances JSON, Graphviz DOT",
        description="mib: the JSON layout of EAP-IG's Graph.to_json that the MIB circuit track reads (every edge "
        "with score and in_graph); dot: the kept subgraph for Graphviz.")
    export.add_argument("circuit", help="circuit.json or a run directory")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="mib")
    export.add_argument("--out", required=True, help="output path")
    export.set_defaults(run=_export)

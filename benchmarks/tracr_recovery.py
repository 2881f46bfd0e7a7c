"""Does each method find the right edges? Recovery of the shipped tracr programs' true circuits (issue 9).

For every shipped program, every ablation in ``--ablations`` and every method in ``--methods``, one
``hap discover`` run on the program's own task (256 training and 200 held-out (input, position)
examples; inputs hashed into train and test) keeping as many edges as the true circuit has under that
ablation (``hap.ground_truth.program_truth``: the program's circuit, less the edges that ablation does
not need). Each run records precision, recall, exact recovery and the ROC AUC of its score ranking;
this script collects them into ``results.json`` and a Markdown table, and prints the table.

Pruning runs (Edge Pruning; HAP with its warm start; ``hap-cold``, HAP whose masks start open as Edge
Pruning's do) use ``--steps`` (default 1000), learning rates 0.1 (``--lr``, ``--lambda-lr``; the
tool's 0.8 is tuned for SmolLM2, and on graphs of 23 to 77 edges it closes gates in a few steps, for
good: a gate clamped shut gets no gradient) and the target warm-up of Edge Pruning's published
schedule, 5/6 of the steps (``--warmup-fraction``). ``acdc`` bisects its threshold for the size;
``ensemble`` is ``hap ensemble --how mean`` of the EAP-IG, EP and HAP runs (so it comes after them in
``--methods``). Runs already finished in ``--out`` are read, not
redone (``--force`` redoes them). The models are tiny: one thread is faster than two here, and
immune to another process using the cores.

    python benchmarks/tracr_recovery.py --out benchmarks/tracr
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hap.batches import TaskBatches
from hap.circuit import Circuit, write_atomically
from hap.discovery import DiscoverConfig, discover
from hap.ensemble import ensemble_run
from hap.graph import Graph
from hap.ground_truth import program_truth
from hap.models.loading import load_model
from hap.models.tracr import shipped_programs
from hap.tasks import load_split, task_splits

METHODS = ("eap", "eap-ig-inputs", "exact", "acdc", "ep", "hap", "hap-cold", "ensemble")
ENSEMBLED = ("eap-ig-inputs", "ep", "hap")  # the ensemble column: the mean of these runs' ranks
PRUNING = ("ep", "hap", "hap-cold")  # hap-cold: HAP without the warm start (its masks start open, as EP's)


def truth_size(program: str, ablation: str, n_test: int, seed: int) -> tuple[int, int]:
    """(edges the ablation needs, edges of the whole program's circuit) on the run's test split."""
    model = load_model(program)
    graph = Graph.from_model(model)
    _, test = task_splits(program, model.tokenizer, 1, n_test, seed)
    task = load_split(test, model.tokenizer)
    truth, whole = program_truth(model, graph, TaskBatches(model, graph, task, 50, ablation))
    return int(truth.sum()), whole


def run_one(program: str, ablation: str, method: str, n_edges: int, args: argparse.Namespace) -> dict:
    out = args.out / "runs" / program / ablation / method
    if (out / "circuit.json").is_file() and not args.force:
        circuit = Circuit.load(out / "circuit.json")
    elif method == "ensemble":
        runs = [out.parent / member for member in ENSEMBLED]
        circuit = ensemble_run(runs, "mean", out, edges=n_edges, force=True, report=False,
                               command=f"benchmarks/tracr_recovery.py ({program}, {ablation}, ensemble)")
    else:
        pruning = {"steps": args.steps, "lr": args.lr, "lambda_lr": args.lambda_lr,
                   "sparsity_warmup": round(args.steps * args.warmup_fraction)} if method in PRUNING else {}
        if method == "hap-cold":
            pruning["warm_start"] = False
        if method in PRUNING and args.mask_init is not None:
            pruning["init_mean"] = args.mask_init
        if method in PRUNING and args.readoff_every is not None:
            pruning["readoff_every"] = args.readoff_every
        config = DiscoverConfig(out=str(out), model=program, method=method.removesuffix("-cold"), edges=n_edges,
                                ablation=ablation,
                                n_test=args.n_test, seed=args.seed, force=True, report=False,
                                command=f"benchmarks/tracr_recovery.py ({program}, {ablation}, {method})", **pruning)
        circuit = discover(config)
    recovered, test = circuit.metrics["ground_truth"], circuit.metrics["test"]
    return {"program": program, "ablation": ablation, "method": method, "n_true": recovered["n_true"],
            "program_edges": recovered["program_edges"], "n_chosen": recovered["n_chosen"],
            "precision": recovered["precision"], "recall": recovered["recall"], "exact": recovered["exact"],
            "auc": recovered["auc"], "test_kl": test["kl"], "test_faithfulness": test["faithfulness"],
            "seconds": sum(circuit.runtime_s.values())}


def _cell(row: dict) -> str:
    """AUC, then "exact" or the precision and recall of the chosen edges."""
    chosen = "exact" if row["exact"] else f"P {row['precision']:.2f} R {row['recall']:.2f}"
    return f"{row['auc']:.3f} · {chosen}"


def table(rows: list[dict]) -> str:
    """Markdown: one row per program and ablation, one column per method (AUC · exact)."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    keys = list(dict.fromkeys((row["program"], row["ablation"]) for row in rows))
    lines = ["| program | ablation | true edges (of program's) | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for program, ablation in keys:
        cells = {row["method"]: row for row in rows if (row["program"], row["ablation"]) == (program, ablation)}
        first = next(iter(cells.values()))
        line = f"| {program} | {ablation} | {first['n_true']} ({first['program_edges']}) |"
        for method in methods:
            line += f" {_cell(cells[method])} |" if method in cells else " n/a |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/tracr"))
    parser.add_argument("--programs", nargs="*", default=[f"tracr-{name}" for name in shipped_programs()])
    parser.add_argument("--ablations", nargs="*", default=["zero", "interchange"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--lambda-lr", type=float, default=0.1)
    parser.add_argument("--warmup-fraction", type=float, default=5 / 6, help="target warm-up, share of the steps")
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-init", type=float, default=None,
                        help="log alpha of masks that start open (ep, hap-cold); default: the tool's (tracr: 3)")
    parser.add_argument("--readoff-every", type=int, default=None,
                        help="ep, hap, hap-cold: record the read-off every N steps and return the best on the "
                        "training examples; 0: the final read-off only (before 2026-12-07); default: the tool's "
                        "(tracr: every 10 of the 1,000 steps)")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    rows = []
    for program in args.programs:
        for ablation in args.ablations:
            n_true, _ = truth_size(program, ablation, args.n_test, args.seed)
            for method in args.methods:
                rows.append(run_one(program, ablation, method, n_true, args))
                print(json.dumps(rows[-1]), flush=True)
                write_atomically(args.out / "results.json", json.dumps({"settings": settings, "rows": rows}, indent=1))
    markdown = table(rows)
    write_atomically(args.out / "results.md", markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()

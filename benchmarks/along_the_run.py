"""Held-out and in-sample quality of the circuit read off each snapshot of a pruning run.

A run's monitor measures 64 held-out examples; this reads the circuit off every saved snapshot of the
masks exactly as the run would at that step (top edges by log alpha at the target sparsity, dangling edges
dropped) and measures it on the whole held-out split and on as many training examples (in-sample), so one
sees where the held-out KL stops improving while the training KL still falls. A validation split (fresh
draws of the training distribution that no run fitted on) is measured too, so a step budget can be chosen
without reading the test split.

Reads ``settings.json`` of the ``converged.py`` folder the run is in; writes ``along_the_run.json`` (after
every snapshot: an interrupted run resumes, skipping the snapshots whose asked-for columns are there;
delete the file to measure again) and ``along_the_run.md`` into the run's folder.

    .venv/bin/python benchmarks/along_the_run.py benchmarks/converged/ioi/hap
    .venv/bin/python benchmarks/along_the_run.py benchmarks/converged/ioi/hap --splits validation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import hap
from hap.circuit import edges_for_sparsity, write_atomically
from hap.evaluation import HeldOutMonitor
from hap.pruning import circuit_of_masks
from hap.tasks import load_split, task_splits, validation_split


SPLITS = ("test", "validation", "train")
COLUMNS = {"test": ("test_kl", "test_faithfulness"), "validation": ("validation_kl", "validation_faithfulness"),
           "train": ("train_kl", "train_faithfulness")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a pruning run folder with snapshots/, inside a converged.py folder")
    parser.add_argument("--splits", default=",".join(SPLITS),
                        help="which of test, validation, train to measure (default all); columns measured before "
                             "and not asked for now are kept")
    args = parser.parse_args()
    wanted = [name.strip() for name in args.splits.split(",") if name.strip()]
    if not wanted or any(name not in SPLITS for name in wanted):
        raise SystemExit(f"--splits: give some of {', '.join(SPLITS)}, got {args.splits!r}")
    settings = json.loads((args.run.parent / "settings.json").read_text())
    snapshots = sorted((args.run / "snapshots").glob("step-*.pt"))
    if not snapshots:
        raise SystemExit(f"{args.run}: no snapshots (a run with --snapshot-every keeps them)")
    model = hap.load_model(settings["model"])
    graph = hap.Graph.from_model(model)
    train_spec, test_spec = task_splits(settings["task"], model.tokenizer, settings["n_examples"], settings["n_test"],
                                        settings["seed"])
    test, train = load_split(test_spec, model.tokenizer), load_split(train_spec, model.tokenizer)
    n = min(len(test), len(train))
    examples = {"test": lambda: test, "train": lambda: train.slice(0, n),
                "validation": lambda: validation_split(train_spec, model.tokenizer, n)}
    monitors = {name: HeldOutMonitor.build(model, examples[name](), n) for name in wanted}
    n_keep = edges_for_sparsity(graph, settings["sparsity"])
    out = args.run / "along_the_run.json"
    rows = {row["step"]: row for row in (json.loads(out.read_text()) if out.is_file() else [])}
    for path in snapshots:
        snapshot = torch.load(path, weights_only=True)
        row = rows.setdefault(int(snapshot["step"]), {"step": int(snapshot["step"])})
        if all(COLUMNS[name][0] in row for name in wanted):  # measured by an earlier (interrupted) run
            continue
        live = torch.zeros(graph.real.shape, dtype=torch.bool)
        live[snapshot["sources"], snapshot["readers"]] = True
        kept, _, _ = circuit_of_masks(graph, live, snapshot["log_alpha"], n_keep)  # snapshots keep edge masks only
        row["edges"] = int(kept.sum())
        for name, monitor in monitors.items():
            with torch.no_grad():
                numbers = monitor.measure(model, kept)
            row[COLUMNS[name][0]], row[COLUMNS[name][1]] = numbers["test_kl"], numbers["test_faithfulness"]
        print(json.dumps(row), flush=True)
        write_atomically(out, json.dumps([rows[step] for step in sorted(rows)], indent=1))
    ordered = [rows[step] for step in sorted(rows)]
    write_atomically(args.run / "along_the_run.md", _table(args.run, n, ordered))
    print(_table(args.run, n, ordered))


def _table(run: Path, n: int, rows: list[dict]) -> str:
    """The markdown page: one row per snapshot, a column per measured split."""
    present = [column for name in SPLITS for column in COLUMNS[name] if any(column in row for row in rows)]
    heads = {"test_kl": "test KL", "test_faithfulness": "test faithfulness", "validation_kl": "validation KL",
             "validation_faithfulness": "validation faithfulness", "train_kl": "train KL (in-sample)",
             "train_faithfulness": "train faithfulness (in-sample)"}
    title = (f"{run}: the circuit read off each snapshot, on {n} examples of each split: test (held out: templates "
             "and names no training example uses), validation (fresh draws of the training distribution, never "
             "fitted on: `hap.tasks.validation_split`) and train (the first training examples, in-sample)")
    lines = [title, "",
             "| step | edges | " + " | ".join(heads[c] for c in present) + " |",
             "| --- | --- | " + " | ".join("---" for _ in present) + " |"]
    lines += [f"| {row['step']} | {row['edges']} | " +
              " | ".join(f"{row[c]:.3f}" if c in row else "" for c in present) + " |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

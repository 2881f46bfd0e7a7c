"""Held-out and in-sample quality of the circuit read off each snapshot of a pruning run.

A run's monitor measures 64 held-out examples; this reads the circuit off every saved snapshot of the
masks exactly as the run would at that step (top edges by log alpha at the target sparsity, dangling edges
dropped) and measures it on the whole held-out split and on as many training examples (in-sample), so one
sees where the held-out KL stops improving while the training KL still falls.

Reads ``settings.json`` of the ``converged.py`` folder the run is in; writes ``along_the_run.json`` and
``along_the_run.md`` into the run's folder.

    .venv/bin/python benchmarks/along_the_run.py benchmarks/converged/ioi/hap
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
from hap.tasks import load_split, task_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a pruning run folder with snapshots/, inside a converged.py folder")
    args = parser.parse_args()
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
    held_out = HeldOutMonitor.build(model, test, n)
    in_sample = HeldOutMonitor.build(model, train.slice(0, n), n)
    n_keep = edges_for_sparsity(graph, settings["sparsity"])
    rows = []
    for path in snapshots:
        snapshot = torch.load(path, weights_only=True)
        live = torch.zeros(graph.real.shape, dtype=torch.bool)
        live[snapshot["sources"], snapshot["readers"]] = True
        kept, _, _ = circuit_of_masks(graph, live, snapshot["log_alpha"], n_keep)  # snapshots keep edge masks only
        with torch.no_grad():
            test_numbers, train_numbers = held_out.measure(model, kept), in_sample.measure(model, kept)
        rows.append({"step": int(snapshot["step"]), "edges": int(kept.sum()), "test_kl": test_numbers["test_kl"],
                     "test_faithfulness": test_numbers["test_faithfulness"], "train_kl": train_numbers["test_kl"]})
        print(json.dumps(rows[-1]), flush=True)
    title = (f"{args.run}: the circuit read off each snapshot, on {n} held-out examples (test) and the first {n} "
             "training examples (train, in-sample)")
    lines = [title, "", "| step | edges | test KL | train KL (in-sample) | test faithfulness |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['step']} | {r['edges']} | {r['test_kl']:.3f} | {r['train_kl']:.3f} | "
              f"{r['test_faithfulness']:.3f} |" for r in rows]
    write_atomically(args.run / "along_the_run.json", json.dumps(rows, indent=1))
    write_atomically(args.run / "along_the_run.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

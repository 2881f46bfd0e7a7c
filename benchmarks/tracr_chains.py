"""When and why Edge Pruning closes a tracr program's true edges: their log alpha over the steps.

One Edge Pruning run on a shipped tracr program (``tracr_recovery.py``'s settings: 1,000 steps, learning
rates 0.1, target warm-up 5/6 of the steps, as many edges as the true circuit has) with the masks kept
every ``--every`` steps. The table has one row per true edge and one column per kept step (log alpha:
above about 2.4 a gate is open in every sample, below about -2.4 shut in every sample, clamped to
[-10, 10]), then the largest log alpha of any false edge, then the training log at the same steps (KL,
expected and target sparsity, the first Lagrange multiplier). It ends with the circuit read off and its
recovery. Written to ``benchmarks/tracr/chains-<program>-<ablation>.md``.

    .venv/bin/python benchmarks/tracr_chains.py --program tracr-sort_freq --ablation zero   # about 20 s
    .venv/bin/python benchmarks/tracr_chains.py --program tracr-sort_freq --ablation zero --mask-init 10  # -init10.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from hap.circuit import write_atomically
from hap.discovery import DiscoverConfig, discover
from hap.graph import Graph
from hap.models.loading import load_model

HERE = Path(__file__).resolve().parent / "tracr"


def trajectories(run: Path, graph: Graph, true_edges: list[str]) -> tuple[list[int], dict[str, list[float]], list[float]]:
    """(steps, log alpha of each true edge at those steps, the largest false edge's) from the snapshots."""
    wanted = {(graph.source_index(e.split("->")[0]), graph.reader_index(e.split("->")[1])): e for e in true_edges}
    steps, values, top_false = [], {edge: [] for edge in true_edges}, []
    for path in sorted((run / "snapshots").glob("step-*.pt")):
        snapshot = torch.load(path, weights_only=True)
        steps.append(int(snapshot["step"]))
        pairs = list(zip(snapshot["sources"].tolist(), snapshot["readers"].tolist()))
        log_alpha = snapshot["log_alpha"]
        false = [float(log_alpha[i]) for i, pair in enumerate(pairs) if pair not in wanted]
        top_false.append(max(false) if false else float("nan"))
        for i, pair in enumerate(pairs):
            if pair in wanted:
                values[wanted[pair]].append(float(log_alpha[i]))
    return steps, values, top_false


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--program", default="tracr-sort_freq")
    parser.add_argument("--ablation", default="zero", choices=("zero", "interchange"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--mask-init", type=float, default=None, help="log alpha the masks start at (default: the tool's)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tracr_recovery import truth_size  # the benchmark beside this script: the same truth and settings

    n_true, _ = truth_size(args.program, args.ablation, 200, 0)
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder)
        circuit = discover(DiscoverConfig(
            out=str(run), model=args.program, method="ep", edges=n_true, ablation=args.ablation, n_test=200,
            steps=args.steps, lr=0.1, lambda_lr=0.1, sparsity_warmup=round(args.steps * 5 / 6),
            snapshot_every=args.every, force=True, report=False, explain_examples=0, init_mean=args.mask_init))
        graph = Graph.from_model(load_model(args.program, device="cpu"))
        truth = circuit.metrics["ground_truth"]
        steps, values, top_false = trajectories(run, graph, truth["true_edges"])
        log = {line["step"]: line for line in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())}
    kept = {f"{graph.source_names[s]}->{graph.reader_names[r]}" for s, r in circuit.in_graph.nonzero().tolist()}
    head = "| edge | " + " | ".join(str(step) for step in steps) + " | kept |"
    flag = "" if args.mask_init is None else f" --mask-init {args.mask_init:g}"
    lines = [f"# Edge Pruning on {args.program}, {args.ablation} ablation: the true edges' log alpha", "",
             f"`python benchmarks/tracr_chains.py --program {args.program} --ablation {args.ablation}{flag}` "
             f"({args.steps} steps, lr 0.1, masks from log alpha {circuit.config['init_mean']:g}, {n_true} edges "
             "kept)", "", head, "|---|" + "---|" * (len(steps) + 1)]
    for edge, series in values.items():
        mark = "yes" if edge in kept else "no"
        lines.append(f"| {edge} | " + " | ".join(f"{v:.1f}" for v in series) + f" | {mark} |")
    lines.append("| largest false edge | " + " | ".join(f"{v:.1f}" for v in top_false) + " | |")
    for name, key, digits in (("training KL", "kl", 3), ("expected sparsity", "expected_sparsity", 3),
                              ("target sparsity", "target_sparsity", 3), ("lambda 1", "lambda1", 2)):
        lines.append(f"| *{name}* | " + " | ".join(f"{log[s][key]:.{digits}f}" if s in log else "" for s in steps)
                     + " | |")
    lines += ["", f"Read off: {truth['n_chosen']} edges, precision {truth['precision']:.2f}, recall "
              f"{truth['recall']:.2f}, exact {'yes' if truth['exact'] else 'no'} "
              f"({circuit.config.get('n_pruned_dangling', 0)} dangling edges dropped after binarisation); "
              f"held-out KL {circuit.metrics['test']['kl']:.4f}."]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.mask_init is None else f"-init{args.mask_init:g}"
    write_atomically(args.out / f"chains-{args.program.removeprefix('tracr-')}-{args.ablation}{suffix}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

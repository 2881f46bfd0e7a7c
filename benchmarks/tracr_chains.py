"""When and why Edge Pruning (or HAP) closes a tracr program's true edges: their log alpha over the steps.

One pruning run on a shipped tracr program (``tracr_recovery.py``'s settings: 1,000 steps, learning
rates 0.1, target warm-up 5/6 of the steps, as many edges as the true circuit has) with the masks kept
every ``--every`` steps. ``--method hap`` (or ``hap-cold``, HAP's masks starting open) adds, per true edge,
its stage-1 attribution (|score| and rank among all the graph's edges, "-" where it is not a candidate)
and the log alpha its mask starts at. The table has one row per true edge and one column per kept step (log alpha:
above about 2.4 a gate is open in every sample, below about -2.4 shut in every sample, clamped to
[-10, 10]), then the largest log alpha of any false edge, then the training log at the same steps (KL,
expected and target sparsity, the first Lagrange multiplier). It ends with the circuit read off and its
recovery. Written to ``benchmarks/tracr/chains-<program>-<ablation>[-<method>][-seed<N>].md`` (the method
and seed named where they are not EP and 0).

    .venv/bin/python benchmarks/tracr_chains.py --program tracr-sort_freq --ablation zero   # about 20 s
    .venv/bin/python benchmarks/tracr_chains.py --program tracr-sort_freq --ablation zero --mask-init 10  # -init10.md
    .venv/bin/python benchmarks/tracr_chains.py --program tracr-reverse --ablation zero --method hap --seed 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from hap.circuit import write_atomically
from hap.circuit import edges_for_sparsity
from hap.discovery import DiscoverConfig, discover
from hap.graph import Graph
from hap.hybrid import select_candidates, warm_start
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


def stage_one(run: Path, graph: Graph, config: dict, true_edges: list[str]) -> dict[str, tuple[float, int, float]]:
    """Per true edge of a HAP run: (|attribution score|, its rank among all edges (1 = largest), the log alpha
    its mask starts at: the warm start's, or ``init_mean`` for a cold run; nan where it is not a candidate)."""
    scores = torch.load(run / "attribution.pt", weights_only=True)
    pruning = config["pruning"]
    candidates = select_candidates(graph, scores, config["candidates"],
                                   at_least=edges_for_sparsity(graph, pruning["target_sparsity"]))
    if config["warm_start"]:
        start = warm_start(graph, scores, candidates, pruning["target_sparsity"], pruning["beta"],
                           config.get("warm_start_sparsity"))
    else:
        start = torch.full(graph.real.shape, float(pruning["init_mean"]))
    magnitude = scores.abs().float()
    order = magnitude[graph.real].sort(descending=True).values
    found = {}
    for edge in true_edges:
        source, reader = graph.source_index(edge.split("->")[0]), graph.reader_index(edge.split("->")[1])
        value = float(magnitude[source, reader])
        rank = int((order > value).sum()) + 1
        found[edge] = (value, rank, float(start[source, reader]) if candidates[source, reader] else float("nan"))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--program", default="tracr-sort_freq")
    parser.add_argument("--ablation", default="zero", choices=("zero", "interchange"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--mask-init", type=float, default=None, help="log alpha the masks start at (default: the tool's)")
    parser.add_argument("--method", default="ep", choices=("ep", "hap", "hap-cold"))
    parser.add_argument("--seed", type=int, default=0,
                        help="the task draw's and the masks' seed (as tracr_recovery.py)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tracr_recovery import truth_size  # the benchmark beside this script: the same truth and settings

    n_true, _ = truth_size(args.program, args.ablation, 200, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder)
        circuit = discover(DiscoverConfig(
            out=str(run), model=args.program, method=args.method.removesuffix("-cold"), edges=n_true,
            ablation=args.ablation, n_test=200, seed=args.seed, warm_start=args.method != "hap-cold",
            steps=args.steps, lr=0.1, lambda_lr=0.1, sparsity_warmup=round(args.steps * 5 / 6),
            snapshot_every=args.every, force=True, report=False, explain_examples=0, init_mean=args.mask_init))
        graph = Graph.from_model(load_model(args.program, device="cpu"))
        truth = circuit.metrics["ground_truth"]
        steps, values, top_false = trajectories(run, graph, truth["true_edges"])
        first = stage_one(run, graph, circuit.config, truth["true_edges"]) if args.method != "ep" else {}
        log = {line["step"]: line for line in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())}
    kept = {f"{graph.source_names[s]}->{graph.reader_names[r]}" for s, r in circuit.in_graph.nonzero().tolist()}
    name = {"ep": "Edge Pruning", "hap": "HAP", "hap-cold": "HAP without warm start"}[args.method]
    extra = ["|attribution| (rank)", "start"] if first else []
    head = "| edge | " + "".join(f"{cell} | " for cell in extra) + " | ".join(str(step) for step in steps) + " | kept |"
    flag = "" if args.mask_init is None else f" --mask-init {args.mask_init:g}"
    flag += "" if args.method == "ep" else f" --method {args.method}"
    flag += "" if args.seed == 0 else f" --seed {args.seed}"
    start = ("masks from HAP's warm start" if circuit.config.get("warm_start") and args.method != "ep"
             else f"masks from log alpha {circuit.config['init_mean']:g}")
    lines = [f"# {name} on {args.program}, {args.ablation} ablation: the true edges' log alpha", "",
             f"`python benchmarks/tracr_chains.py --program {args.program} --ablation {args.ablation}{flag}` "
             f"({args.steps} steps, lr 0.1, {start}, {n_true} edges kept)", "", head,
             "|---|" + "---|" * (len(steps) + len(extra) + 1)]
    for edge, series in values.items():
        mark = "yes" if edge in kept else "no"
        cells = []
        if first:
            score, rank, begin = first[edge]
            cells = [f"{score:.2g} ({rank})", "-" if begin != begin else f"{begin:.1f}"]
        series_cells = [f"{v:.1f}" for v in series] if series else ["-"] * len(steps)
        lines.append(f"| {edge} | " + " | ".join(cells + series_cells) + f" | {mark} |")
    blank = "| " * len(extra)
    lines.append("| largest false edge | " + blank + " | ".join(f"{v:.1f}" for v in top_false) + " | |")
    for label, key, digits in (("training KL", "kl", 3), ("expected sparsity", "expected_sparsity", 3),
                               ("target sparsity", "target_sparsity", 3), ("lambda 1", "lambda1", 2)):
        lines.append(f"| *{label}* | " + blank + " | ".join(f"{log[s][key]:.{digits}f}" if s in log else ""
                                                          for s in steps) + " | |")
    lines += ["", f"Read off: {truth['n_chosen']} edges, precision {truth['precision']:.2f}, recall "
              f"{truth['recall']:.2f}, exact {'yes' if truth['exact'] else 'no'} "
              f"({circuit.config.get('n_pruned_dangling', 0)} dangling edges dropped after binarisation); "
              f"held-out KL {circuit.metrics['test']['kl']:.4f}."]
    read_off = circuit.config.get("read_off_check")
    if read_off:
        chosen = read_off["loss"][read_off["steps"].index(read_off["returned_step"])]
        lines.append(f"Read-offs (every {circuit.config['readoff_every']} steps, compared on the training examples): "
                     f"{len(read_off['steps'])} distinct "
                     f"circuits; returned the one read off at step {read_off['returned_step']}, training loss "
                     f"{chosen:.4f} against the final read-off's {read_off['final_loss']:.4f} (the read-off "
                     "above is the returned circuit).")
    check = circuit.config.get("stage_one_check")
    if check:
        lines.append(f"Training loss (KL over the {check['n_examples']} training examples): pruned "
                     f"{check['training_loss_pruned']:.4f}, stage 1's top-{n_true} "
                     f"{check['training_loss_stage_one']:.4f}"
                     + (" (stage 1's circuit returned)." if circuit.config.get("returned") else "."))
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.mask_init is None else f"-init{args.mask_init:g}"
    suffix += ("" if args.method == "ep" else f"-{args.method}") + ("" if args.seed == 0 else f"-seed{args.seed}")
    write_atomically(args.out / f"chains-{args.program.removeprefix('tracr-')}-{args.ablation}{suffix}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

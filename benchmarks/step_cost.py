"""Cost of one Edge Pruning / HAP training step against a plain forward+backward, measured in one process.

Steps are timed exactly as ``hap.pruning.prune`` runs them (gates sampled, the step's plan built from
the gates that are not exactly 0, masked run, KL, backward) at three points of a run:

* EP, start: every edge live, gates open (log alpha ~ N(10, 0.01));
* EP, middle: every edge live, half of them open (log alpha +5 on the top half by |EAP score|, -5 on
  the rest), as around the middle of the published schedule;
* EP, end: every edge live, expected sparsity 0.95: log alpha high on a circuit of 5% of the edges
  (the top |EAP score|, so concentrated as a trained circuit is) and -10 on the rest;
* HAP: the candidates (1.5x the circuit, top |EAP score|) live, warm-started masks.

Usage: .venv/bin/python benchmarks/step_cost.py [--model smollm2-135m] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

import hap
from hap.ablation import AblationKind, run_masked
from hap.batches import ReferenceCache, TaskBatches
from hap.evaluation import kl_divergence
from hap.hybrid import select_candidates, warm_start_log_alpha
from hap.pruning import gate_stretched, step_plan_of


def timed(function, repeats: int) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = hap.load_model(args.model)
    graph = hap.Graph.from_model(model)
    task = hap.load_task("ioi", model.tokenizer, args.batch_size, seed=0)
    batch = TaskBatches(model, graph, task, args.batch_size, cache=ReferenceCache(10**11))[0]
    kind = AblationKind.INTERCHANGE
    rows = torch.arange(len(batch.clean))

    def plain() -> None:
        embedded = model.hf_model.get_input_embeddings()(batch.clean).detach().requires_grad_(True)
        logits = model.hf_model(inputs_embeds=embedded).logits[rows, batch.positions]
        kl_divergence(batch.clean_logits, logits).mean().backward()

    def step_with(live: torch.Tensor, log_alpha: torch.Tensor):
        sources, readers = live.nonzero(as_tuple=True)
        log_alpha = log_alpha.clone().requires_grad_(True)
        generator = torch.Generator().manual_seed(0)

        def step() -> None:
            stretched = gate_stretched(log_alpha, 2 / 3, generator)
            mask = torch.zeros(graph.real.shape).index_put((sources, readers), stretched.clamp(0, 1))
            plan, entries = step_plan_of(graph, live, stretched, None, kind)
            logits = run_masked(model, graph, batch.clean, batch.reference, mask, plan, batch.positions,
                                grad_entries=entries)
            kl_divergence(batch.clean_logits, logits).mean().backward()

        return step

    n_real = int(graph.real.sum())
    generator = torch.Generator().manual_seed(1)
    ep_start = step_with(graph.real, 10 + 0.01 * torch.randn(n_real, generator=generator))
    scores = hap.attribute(model, task, "eap").values
    half = select_candidates(graph, scores, 0.5)
    ep_middle = step_with(graph.real, torch.where(half, 5.0, -5.0)[graph.real])
    circuit = select_candidates(graph, scores, 0.05)
    ep_end = step_with(graph.real, torch.where(circuit, 5.0, -10.0)[graph.real])
    candidates = select_candidates(graph, scores, 0.075)
    warm = warm_start_log_alpha(graph, scores, candidates, min(0.95, 0.1 * n_real / int(candidates.sum())), 2 / 3)
    hap_step = step_with(candidates, warm[candidates])

    results = {}
    for name, function in (("plain", plain), ("ep_start", ep_start), ("ep_middle", ep_middle), ("ep_end", ep_end),
                           ("hap", hap_step), ("plain_again", plain)):
        results[name] = timed(function, args.repeats)
        print(f"{name:12s} {results[name]:.3f} s", flush=True)
    base = (results["plain"] + results["plain_again"]) / 2
    print(f"\nbatch {tuple(batch.clean.shape)}, {n_real} edges, {int(candidates.sum())} HAP candidates")
    for name in ("ep_start", "ep_middle", "ep_end", "hap"):
        print(f"{name:12s} / plain fwd+bwd: {results[name] / base:.2f}")


if __name__ == "__main__":
    main()

"""Cost of one Edge Pruning / HAP training step against a plain forward+backward, measured in one process.

Steps are timed exactly as ``hap.pruning.prune`` runs them (gates sampled, the step's plan built from
the gates that are not exactly 0, masked run, KL, backward) at three points of a run:

* EP, start: every edge live, gates open (log alpha ~ N(10, 0.01));
* EP, middle: every edge live, half of them open (log alpha +5 on the top half by |EAP score|, -5 on
  the rest), as around the middle of the published schedule;
* EP, end: every edge live, expected sparsity 0.95: log alpha high on a circuit of 5% of the edges
  (the top |EAP score|, so concentrated as a trained circuit is) and -10 on the rest;
* HAP: the candidates (top |EAP score|) live, warm-started masks: at the default margin of a run of 120
  steps (1.5x the circuit) and of 500 steps (2.39x);
* circuit only: just the edges of a 0.95 circuit live, gates open: the least any pruning step over a
  circuit of this size computes, and so the floor of a HAP step whatever its candidates.

Each row also prints how many sources its step plan recomputes and how many readers it forms: the
model's own work (matrix products, norms, attention) follows those, not the number of live edges.

Usage: .venv/bin/python benchmarks/step_cost.py [--model smollm2-135m] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

import hap
from hap.ablation import AblationKind, ComputePlan, run_masked
from hap.batches import Batch, ReferenceCache, TaskBatches
from hap.circuit import edges_for_sparsity
from hap.evaluation import kl_divergence
from hap.graph import Graph
from hap.hybrid import candidate_margin, select_candidates, warm_start_log_alpha
from hap.models.loading import Model
from hap.pruning import gate_stretched, step_plan_of


def timed(function, repeats: int) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def plain_step(model: Model, batch: Batch) -> Callable[[], None]:
    """A plain forward+backward of the Hugging Face model on ``batch.clean`` (KL to the full model's logits
    at the answer positions, the gradient taken with respect to the input embeddings: no weight gradients)."""
    rows = torch.arange(len(batch.clean))

    def step() -> None:
        embedded = model.hf_model.get_input_embeddings()(batch.clean).detach().requires_grad_(True)
        logits = model.hf_model(inputs_embeds=embedded).logits[rows, batch.positions]
        kl_divergence(batch.clean_logits, logits).mean().backward()

    return step


def pruning_step(model: Model, graph: Graph, batch: Batch, live: Tensor, log_alpha: Tensor,
                 kind: AblationKind = AblationKind.INTERCHANGE) -> Callable[[], ComputePlan]:
    """One training step exactly as ``hap.pruning.prune`` runs it, without the optimiser: gates sampled from
    ``log_alpha`` [E] (the ``live`` [S, R] edges, in their order), the step's plan built from the gates
    that are not exactly 0, the masked run, KL and backward. The step returns its compute plan."""
    sources, readers = live.nonzero(as_tuple=True)
    index = (sources.to(model.device), readers.to(model.device))
    log_alpha = log_alpha.to(model.device).clone().requires_grad_(True)
    generator = torch.Generator().manual_seed(0)

    def step() -> ComputePlan:
        stretched = gate_stretched(log_alpha, 2 / 3, generator)
        mask = torch.zeros(graph.real.shape, device=model.device, dtype=model.dtype).index_put(
            index, stretched.clamp(0, 1).to(model.dtype))
        plan, entries = step_plan_of(graph, live, stretched, None, kind)
        logits = run_masked(model, graph, batch.clean, batch.reference, mask, plan, batch.positions,
                            grad_entries=entries)
        kl = kl_divergence(batch.clean_logits, logits).mean()
        if kl.requires_grad:  # not when every sampled gate is clamped at 0 or 1 (as prune)
            kl.backward()
        return plan

    return step


def ep_middle_log_alpha(graph: Graph, scores: Tensor) -> Tensor:
    """Edge Pruning's masks around the middle of a run, [E] over every real edge: half of them open
    (log alpha +5 on the top half by |score|), the rest nearly closed (-5)."""
    return torch.where(select_candidates(graph, scores, 0.5), 5.0, -5.0)[graph.real]


def hap_start(graph: Graph, scores: Tensor, fraction: float, target: float = 0.05) -> tuple[Tensor, Tensor]:
    """HAP's candidates (the top ``fraction`` of the edges by |score|, [S, R] bool; at least the circuit,
    ``target`` of the edges) and their warm-started log alphas [E], which keep twice the circuit open at the
    start: as ``hap.hybrid.hybrid`` with ``warm_start``."""
    candidates = select_candidates(graph, scores, fraction, at_least=edges_for_sparsity(graph, 1 - target))
    keep = min(0.95, 2 * target * graph.n_edges / max(1, int(candidates.sum())))
    return candidates, warm_start_log_alpha(graph, scores, candidates, keep, 2 / 3)[candidates]


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
    plain = plain_step(model, batch)
    n_real = int(graph.real.sum())
    generator = torch.Generator().manual_seed(1)
    ep_start = pruning_step(model, graph, batch, graph.real, 10 + 0.01 * torch.randn(n_real, generator=generator))
    scores = hap.attribute(model, task, "eap").values
    ep_middle = pruning_step(model, graph, batch, graph.real, ep_middle_log_alpha(graph, scores))
    circuit = select_candidates(graph, scores, 0.05)
    ep_end = pruning_step(model, graph, batch, graph.real, torch.where(circuit, 5.0, -10.0)[graph.real])
    candidates, warm = hap_start(graph, scores, candidate_margin(120) * 0.05)
    hap_step = pruning_step(model, graph, batch, candidates, warm)
    long_candidates, long_warm = hap_start(graph, scores, candidate_margin(500) * 0.05)
    hap_500 = pruning_step(model, graph, batch, long_candidates, long_warm)
    # The least a pruning step over a circuit of this size can compute: only the circuit's own edges live.
    circuit_only = pruning_step(model, graph, batch, circuit, torch.full((int(circuit.sum()),), 5.0))

    results, plans = {}, {}
    for name, function in (("plain", plain), ("ep_start", ep_start), ("ep_middle", ep_middle), ("ep_end", ep_end),
                           ("hap", hap_step), ("hap_500", hap_500), ("circuit_only", circuit_only),
                           ("plain_again", plain)):
        results[name] = timed(function, args.repeats)
        plans[name] = function()
        print(f"{name:12s} {results[name]:.3f} s", flush=True)
    base = (results["plain"] + results["plain_again"]) / 2
    print(f"\nbatch {tuple(batch.clean.shape)}, {n_real} edges; HAP candidates {int(candidates.sum())} "
          f"(margin {candidate_margin(120):.2f}, the default up to 120 steps), hap_500 "
          f"{int(long_candidates.sum())} (margin {candidate_margin(500):.2f}, the default at 500 steps); "
          f"circuit_only: the {int(circuit.sum())} edges of a 0.95 circuit alone")
    print(f"{'':12s}   / plain fwd+bwd   / EP middle   sources recomputed (of {graph.n_sources})   "
          f"readers formed (of {graph.n_readers})")
    for name in ("ep_start", "ep_middle", "ep_end", "hap", "hap_500", "circuit_only"):
        plan = plans[name]
        print(f"{name:12s}   {results[name] / base:15.2f}   {results[name] / results['ep_middle']:11.2f}   "
              f"{int(plan.active.sum()):31d}   {int(plan.formed.sum()):22d}")


if __name__ == "__main__":
    main()

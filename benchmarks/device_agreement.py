"""The masked run on another device against the CPU: logits and mask gradients, every path a training step takes.

The CPU path is checked against its slow twin by the tests (``tests/test_ablation.py``); this script checks
that a device (a GPU) computes the same: tiny-llama (grouped-query attention, RMS norm: the fused
projection) and tiny-gpt2 (LayerNorm), float32, under interchange and mean ablation, with a mask shared by
the batch or one per example, every edge or a sparse plan live, logits everywhere or at one answer position
per example, and a second backward pass over the same graph. Prints one line per case and exits 1 when a
difference exceeds the tolerance. Seconds on a GPU; nothing is downloaded.

    .venv/bin/python benchmarks/device_agreement.py --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

import hap
from hap.ablation import (
    AblationKind,
    ComputePlan,
    interchange_reference,
    mean_reference,
    run_masked,
)
from hap.models.tiny_vocab import SPECIAL_TOKENS


def gradients(model: hap.Model, graph: hap.Graph, clean: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor,
              live: torch.Tensor, kind: AblationKind, positions: torch.Tensor | None,
              weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, mask gradient after one backward pass, after a second one over the same graph), on the CPU."""
    device = model.device
    clean, corrupted = clean.to(device), corrupted.to(device)
    reference = interchange_reference(model, corrupted) if kind is AblationKind.INTERCHANGE else \
        mean_reference(model, graph, corrupted)
    values = mask.to(device).clone().requires_grad_(True)
    plan = ComputePlan.build(graph, live, kind)
    logits = run_masked(model, graph, clean, reference, values, plan,
                        None if positions is None else positions.to(device))
    loss = (logits @ weights.to(device)).square().mean()
    loss.backward(retain_graph=True)
    once = values.grad.detach().cpu().clone()
    loss.backward()
    return logits.detach().cpu(), once, values.grad.detach().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |difference| / max |CPU value|")
    args = parser.parse_args()
    worst, failed = 0.0, False
    for name in ("tiny-llama", "tiny-gpt2"):
        here, there = hap.load_model(name, device="cpu"), hap.load_model(name, device=args.device)
        graph = hap.Graph.from_model(here)
        generator = torch.Generator().manual_seed(0)
        low, vocab = len(SPECIAL_TOKENS), here.layout.vocab_size
        clean = torch.randint(low, vocab, (4, 9), generator=generator)
        corrupted = torch.randint(low, vocab, (4, 9), generator=generator)
        weights = torch.randn(vocab, generator=generator)
        for kind, per_example, sparse, at_answer in itertools.product(
                (AblationKind.INTERCHANGE, AblationKind.MEAN), (False, True), (False, True), (False, True)):
            live = (torch.rand(graph.real.shape, generator=generator) < 0.3) & graph.real if sparse else graph.real
            shape = (len(clean), *graph.real.shape) if per_example else graph.real.shape
            mask = torch.rand(shape, generator=generator) * live
            positions = torch.tensor([8, 3, 5, 1]) if at_answer else None
            cpu = gradients(here, graph, clean, corrupted, mask, live, kind, positions, weights)
            device = gradients(there, graph, clean, corrupted, mask, live, kind, positions, weights)
            errors = [float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(cpu, device)]
            bad = max(errors) > args.tolerance or not torch.allclose(cpu[2], 2 * cpu[1], rtol=1e-5, atol=1e-7)
            failed |= bad
            worst = max(worst, *errors)
            print(f"{name:10s} {kind.value:11s} {'per-example' if per_example else 'shared':11s} "
                  f"{'sparse' if sparse else 'every-edge':10s} {'at-answer' if at_answer else 'all-positions':13s} "
                  f"logits {errors[0]:.1e}  grad {errors[1]:.1e}  second pass {errors[2]:.1e}"
                  f"{'  FAILED' if bad else ''}", flush=True)
    print(f"{args.device} against cpu: worst relative difference {worst:.1e} (tolerance {args.tolerance:g}): "
          f"{'FAILED' if failed else 'agree'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Memory of one Edge Pruning / HAP step against the formula in benchmarks/README.md (issue 12, item 3).

Each setting runs in a fresh process (``ru_maxrss`` is a per-process peak): a random Llama-shaped model of
the given size is built from its config, one batch of IOI prompts (the tiny word-level tokenizer) is
prepared (its reference and the full model's logits), and then ``prune`` takes a few steps over the
given fraction of candidate edges. The step's working memory is the peak after the steps minus the peak
before them; the prediction is

    a * B*T*D * (S + 2*C + 2L+2 + k_read * R) + a * B*T*I * L * k_mlp

with S sources, C contributing sources, R formed readers (both from the step's compute plan), L layers,
I the MLP width, a bytes per activation, and the constants k_read and k_mlp printed by --fit (fitted on the
first size, checked on the others).

Usage: .venv/bin/python benchmarks/step_memory.py [--sizes 256x6,512x12] [--batch 16] [--candidates 1.0,0.05]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parent process stays light: its peak memory is where each child's starts
    import torch
    from transformers import PretrainedConfig

    from hap.models.loading import Model

# Bytes an activation takes per (reader or source) x B x T x D, counted from the masked run:
K_READ = 4.0  # a formed reader's input, its normed copy and the float32 norm's intermediates
K_MLP = 5.0  # gate, up, activation and product [B, T, I], and the down projection's input


def predict_gib(counts: dict, k_read: float = K_READ, k_mlp: float = K_MLP) -> float:
    """The formula, in GiB, from the counts a child reports."""
    btd = counts["batch"] * counts["tokens"] * counts["d_model"]
    per_row = counts["sources"] + 2 * counts["contributing"] + 2 * counts["layers"] + 2
    activations = btd * (per_row + k_read * counts["formed"])
    mlp = counts["batch"] * counts["tokens"] * counts["intermediate"] * counts["layers"] * k_mlp
    return counts["bytes"] * (activations + mlp) / 2**30


def random_model(config: PretrainedConfig, name: str, device: str = "cpu", dtype: torch.dtype | None = None,
                 seed: int = 0) -> Model:
    """A hap ``Model`` of random weights built from a transformers ``config`` (seeded, built on ``device`` in
    ``dtype``, default float32), with the tiny word-level tokenizer: its ids are small, so valid in any vocab."""
    import torch
    from transformers import AutoModelForCausalLM

    from hap.models.loading import Model, adapter_for
    from hap.models.placement import placed
    from hap.models.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    hf_model = hf_model.eval().requires_grad_(False)
    return Model(name, hf_model, tiny_tokenizer(), placed(adapter_for(hf_model, name), torch.device(device)),
                 "built-in")


def child(size: str, batch: int, candidates: float, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig

    import hap
    from hap.ablation import ComputePlan
    from hap.batches import TaskBatches
    from hap.circuit import top_edges
    from hap.models.tiny import tiny_tokenizer
    from hap.pruning import PruningConfig, prune
    from hap.tasks import load_task

    width, layers = (int(part) for part in size.split("x"))
    heads = width // 64
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         tie_word_embeddings=False)
    model = random_model(config, f"llama-{size}")
    graph = hap.Graph.from_model(model)
    task = load_task("ioi", tokenizer, batch, seed=0)
    data = TaskBatches(model, graph, task, batch, "interchange")
    first = data[0]  # reference and logits made (and kept) before the measurement
    live = None
    if candidates < 1.0:
        live = top_edges(graph, torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(1)),
                         int(candidates * graph.n_edges))
    plan = ComputePlan.build(graph, live, first.reference.kind)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prune(model, task, PruningConfig(target_sparsity=min(0.95, 1 - candidates / 2), steps=steps, batch_size=batch),
          live=live, data=data)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"size": size, "candidates": candidates, "batch": batch, "tokens": int(first.clean.shape[1]),
            "d_model": width, "layers": layers, "intermediate": 4 * width, "sources": graph.n_sources,
            "contributing": int(plan.contributing.sum()), "formed": int(plan.formed.sum()), "bytes": 4,
            "edges": graph.n_edges, "measured_gib": (after - before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256x6,512x12", help="width x layers, 64-wide heads, half as many kv")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--candidates", default="1.0,0.05", help="fractions of the edges that are live")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, batch, candidates, steps = args.child
        print(json.dumps(child(size, int(batch), float(candidates), int(steps))))
        return
    rows = []
    for size in args.sizes.split(","):
        for candidates in args.candidates.split(","):
            done = subprocess.run([sys.executable, __file__, "--child", size, str(args.batch), candidates,
                                   str(args.steps)], check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| model (width x layers) | edges | live | B x T | S / C / R | measured GiB | formula GiB | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        predicted = predict_gib(row)
        print(f"| {row['size']} | {row['edges']:,} | {row['candidates']:.0%} | {row['batch']} x {row['tokens']} | "
              f"{row['sources']} / {row['contributing']} / {row['formed']} | {row['measured_gib']:.3f} | "
              f"{predicted:.3f} | {row['measured_gib'] / predicted:.2f} |")


if __name__ == "__main__":
    main()

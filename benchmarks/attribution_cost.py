"""Cost of attribution relative to the plain passes it cannot avoid (issue 3's benchmark).

On SmolLM2-135M IOI, times ``eap`` over the task and, on the same batches in
the same process, 2 plain forwards (corrupted without gradient, clean with) and
1 backward to the input embeddings through the Hugging Face model: the least
any EAP implementation must do. Prints the ratio (target <= 1.3) and the cost
of one ``eap-ig-inputs`` step. Timings alternate and take the median of
``--repeats`` runs because these machines are noisy.

    .venv/bin/python benchmarks/attribution_cost.py [--model smollm2-135m] [--n-examples 32] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import hap
from hap.attribution import AttributionConfig, attribute
from hap.tasks import load_task


def plain_passes(model: hap.Model, task, batch_size: int) -> float:
    """Seconds of 2 forwards + 1 backward per batch over the task (the EAP floor)."""
    started = time.perf_counter()
    embed = model.hf_model.get_input_embeddings()
    for part in task.batches(batch_size):
        with torch.no_grad():
            model.hf_model(part.corrupted_ids)
        embeddings = embed(part.clean_ids).detach().requires_grad_(True)
        logits = model.hf_model(inputs_embeds=embeddings).logits
        rows = torch.arange(len(part))
        picked = logits[rows, part.lengths - 1]
        part.logit_diff(picked).mean().backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = hap.load_model(args.model, device="cpu")
    task = load_task("ioi", model.tokenizer, args.n_examples, seed=0)
    config = AttributionConfig(batch_size=args.batch_size)
    plain_passes(model, task, args.batch_size)  # warm up
    eap_times, plain_times, ig_times = [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        attribute(model, task, "eap", config)
        eap_times.append(time.perf_counter() - started)
        plain_times.append(plain_passes(model, task, args.batch_size))
        started = time.perf_counter()
        attribute(model, task, "eap-ig-inputs", config)
        ig_times.append(time.perf_counter() - started)
    eap, plain, ig = (statistics.median(t) for t in (eap_times, plain_times, ig_times))
    n_batches = -(-len(task) // args.batch_size)
    print(f"model {args.model}, IOI, {len(task)} examples in batches of {args.batch_size}, "
          f"tokens per prompt {task.clean_ids.shape[1]}, median of {args.repeats}")
    print(f"2 forwards + 1 backward (HF):   {plain:7.2f} s")
    print(f"eap:                            {eap:7.2f} s")
    print(f"eap / (2 fwd + 1 bwd):          {eap / plain:7.2f}   (target <= 1.3)")
    print(f"eap-ig-inputs (5 steps):        {ig:7.2f} s = {ig / (5 * n_batches):.2f} s per step per batch "
          f"({ig / eap:.2f}x eap)")


if __name__ == "__main__":
    main()

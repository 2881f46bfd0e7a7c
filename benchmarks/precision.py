"""Which reduced precision is faster than float32 on this machine? (PAHQ's premise, issue 10 item 2.)

PAHQ (Wang et al. 2025) runs the parts of the model that ACDC is not currently testing in reduced
precision. That only pays where reduced precision is faster. This script times, in one process on the
model's device, one plain forward and one masked forward (every edge live: ``hap.run_masked``, what
ACDC and exact patching run) of a batch of IOI prompts in float32, bfloat16 and float16, and the plain
forward with dynamically quantised int8 linear layers (``torch.ao.quantization.quantize_dynamic``,
CPU only), and prints each time and its ratio to float32.

Usage: .venv/bin/python benchmarks/precision.py [--model smollm2-135m] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch

import hap
from hap.ablation import interchange_reference, run_masked
from hap.graph import Graph
from step_cost import timed  # the sibling script's timer (this folder is on the path when a script runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    rows = []
    base_plain = base_masked = None
    for dtype in ("float32", "bfloat16", "float16"):
        model = hap.load_model(args.model, device=args.device, dtype=dtype)
        graph = Graph.from_model(model)
        task = hap.load_task("ioi", model.tokenizer, args.batch_size, seed=0)
        clean, corrupted = task.clean_ids.to(model.device), task.corrupted_ids.to(model.device)
        positions = task.answer_positions.to(model.device)
        with torch.no_grad():
            reference = interchange_reference(model, corrupted)
            mask = graph.real.to(model.device, model.dtype)
            plain = timed(lambda: model.hf_model(clean), args.repeats)
            masked = timed(lambda: run_masked(model, graph, clean, reference, mask, positions=positions),
                           args.repeats)
        base_plain = base_plain or plain
        base_masked = base_masked or masked
        rows.append((dtype, plain, masked))
        if dtype == "float32" and model.device.type == "cpu":
            quantised = torch.ao.quantization.quantize_dynamic(model.hf_model, {torch.nn.Linear}, dtype=torch.qint8)
            with torch.no_grad():
                rows.append(("int8 dynamic (linear layers)", timed(lambda: quantised(clean), args.repeats), None))
    print(f"{args.model}, batch {args.batch_size} x {task.clean_ids.shape[1]} tokens, device "
          f"{args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'precision':<30}{'plain forward s':>16}{'ratio':>8}{'masked forward s':>18}{'ratio':>8}")
    for name, plain, masked in rows:
        masked_cells = f"{masked:>18.3f}{masked / base_masked:>8.2f}" if masked is not None else f"{'n/a':>18}{'':>8}"
        print(f"{name:<30}{plain:>16.3f}{plain / base_plain:>8.2f}{masked_cells}")


if __name__ == "__main__":
    main()

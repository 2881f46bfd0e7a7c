"""Does PAHQ's mixed precision change ACDC's circuit, and what does it save? Full-precision ACDC against
``--mixed-precision`` at the same tau on the same training batches: edges kept by each, edges on which
they disagree, the twin's distance from the model, each circuit's KL and faithfulness on held-out examples
(measured in full precision), each sweep's seconds and peak memory (CUDA: the allocator's peak; CPU: the
process's peak resident set, which only grows, so the second sweep's figure includes the first's).

    .venv/bin/python benchmarks/pahq_agreement.py                  # tiny-llama, CPU, int8 (about 20 s)
    python3 benchmarks/pahq_agreement.py --device cuda --precision bfloat16 --models tiny-llama tiny-gpt2
    python3 benchmarks/pahq_agreement.py --device cuda --precision bfloat16 --models smollm2-135m \\
        --ablations interchange --tau 3e-4 --memory-gib 40

On CPU the speed check is off for tiny models (int8 is not faster on 64-wide layers), so there it checks
the bookkeeping, not a realistic quantisation error; SmolLM2's int8 twin is refused
(``benchmarks/acdc_cost.py``). ``--json FILE`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

import hap
from hap.acdc import AcdcConfig, acdc, acdc_circuit
from hap.batches import TaskBatches
from hap.errors import HapError
from hap.evaluation import evaluate
from hap.precision import check_twin_below_threshold, reduced_twin
from hap.tasks import load_split, task_splits

THRESHOLDS = {"interchange": 1e-5, "mean": 1e-4, "zero": 1e-3}  # on tiny-llama each keeps some edges, removes others


def peak_gib(device: torch.device) -> float:
    """The peak memory so far: the CUDA allocator's since the last reset, or the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="int8", help="the --mixed-precision compared with float32")
    parser.add_argument("--ablations", nargs="+", default=list(THRESHOLDS), choices=list(THRESHOLDS))
    parser.add_argument("--tau", type=float, default=None, help="one tau for every ablation (default: per ablation)")
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--memory-gib", type=float, default=1.0, help="ACDC's budget for batched tests (sets k)")
    parser.add_argument("--check-speed", action="store_true", help="refuse a twin that is not faster (as the CLI)")
    parser.add_argument("--progress", action="store_true", help="show each sweep's progress bar")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print(f"| model | device | ablation | tau | kept (fp32) | kept ({args.precision}) | edges that differ | twin KL "
          f"| test KL fp32 | test KL {args.precision} | test faithfulness fp32 | test faithfulness {args.precision} "
          "| seconds fp32 | seconds mixed | peak GiB fp32 | peak GiB mixed |")
    print("| --- " * 16 + "|")
    for name in args.models:
        model = hap.load_model(name, device=args.device)
        graph = hap.Graph.from_model(model)
        train_spec, test_spec = task_splits("ioi", model.tokenizer, args.n_train, args.n_test, 0)
        train, test = load_split(train_spec, model.tokenizer), load_split(test_spec, model.tokenizer)
        for ablation in args.ablations:
            tau = args.tau if args.tau is not None else THRESHOLDS[ablation]
            data = list(TaskBatches(model, graph, train, args.batch_size, ablation))
            try:
                twin = reduced_twin(model, args.precision, check_speed=args.check_speed, sample=data[0])
            except HapError as refused:
                print(f"| {name} | {model.device} | {ablation} | {tau:g} | refused: {refused} |", flush=True)
                continue
            result: dict = {"model": name, "device": str(model.device), "ablation": ablation, "tau": tau,
                            "precision": args.precision, "n_train": args.n_train, "n_test": args.n_test,
                            "twin_kl": twin.divergence}  # measured on data[0] by reduced_twin
            kept = []
            try:
                check_twin_below_threshold(model, twin, data[0], tau)
            except HapError as refused:  # what the CLI would answer; the float32 sweep alone says nothing here
                print(f"| {name} | {model.device} | {ablation} | {tau:g} | refused: {refused} |", flush=True)
                continue
            for mixed in (None, args.precision):
                config = AcdcConfig(threshold=tau, ablation=ablation, mixed_precision=mixed,
                                    memory_gib=args.memory_gib)
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                    torch.cuda.reset_peak_memory_stats(model.device)
                started = time.perf_counter()
                state = acdc(model, train, config, data, twin=twin if mixed else None, progress=args.progress)
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                seconds = time.perf_counter() - started
                peak = peak_gib(model.device)
                circuit = acdc_circuit(model, train, config, state)
                metrics = evaluate(model, circuit, test, batch_size=args.batch_size, ablation=ablation)
                kept.append(state.kept & graph.real)
                key = "fp32" if mixed is None else "mixed"
                result.update({f"kept_{key}": int(kept[-1].sum()), f"test_kl_{key}": metrics.kl,
                               f"test_faithfulness_{key}": metrics.faithfulness, f"seconds_{key}": seconds,
                               f"peak_gib_{key}": peak, f"forwards_{key}": state.forwards})
            result["differ"] = int((kept[0] ^ kept[1]).sum())
            rows.append(result)
            r = result
            print(f"| {name} | {r['device']} | {ablation} | {tau:g} | {r['kept_fp32']} | {r['kept_mixed']} | "
                  f"{r['differ']} | {r['twin_kl']:.1e} | {r['test_kl_fp32']:.4f} | {r['test_kl_mixed']:.4f} | "
                  f"{r['test_faithfulness_fp32']:.3f} | {r['test_faithfulness_mixed']:.3f} | "
                  f"{r['seconds_fp32']:.1f} | {r['seconds_mixed']:.1f} | {r['peak_gib_fp32']:.2f} | "
                  f"{r['peak_gib_mixed']:.2f} |", flush=True)
            if args.json is not None:  # atomically: a killed run leaves the previous rows
                staging = args.json.with_suffix(".tmp")
                staging.write_text(json.dumps(rows, indent=1))
                staging.replace(args.json)
        del model, graph
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

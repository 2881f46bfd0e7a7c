"""Does PAHQ's mixed precision change ACDC's circuit? Full-precision ACDC against ``--mixed-precision int8``
at the same tau, on tiny-llama, all three ablations: edges kept by each, edges on which they
disagree, the twin's distance from the model, and each circuit's KL on held-out examples (measured in
full precision). The speed check is off here (int8 is not faster on 64-wide layers); the fidelity
check's number is printed instead. SmolLM2's int8 twin is refused (``benchmarks/acdc_cost.py``).

    .venv/bin/python benchmarks/pahq_agreement.py
"""

from __future__ import annotations

import time

import torch

import hap
from hap.acdc import AcdcConfig, acdc, acdc_circuit
from hap.batches import TaskBatches
from hap.evaluation import evaluate
from hap.precision import reduced_twin, twin_divergence
from hap.tasks import load_split, task_splits

THRESHOLDS = {"interchange": 1e-6, "mean": 1e-4, "zero": 1e-3}  # each keeps some edges and removes others


def main() -> None:
    print("| model | ablation | tau | kept (fp32) | kept (int8) | edges that differ | twin KL | test KL fp32 "
          "| test KL int8 | seconds fp32 | seconds int8 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in ("tiny-llama",):  # tiny-gpt2's MLPs are Conv1D: no int8 twin
        model = hap.load_model(name, device="cpu")
        graph = hap.Graph.from_model(model)
        train_spec, test_spec = task_splits("ioi", model.tokenizer, 16, 32, 0)
        train, test = load_split(train_spec, model.tokenizer), load_split(test_spec, model.tokenizer)
        for ablation, tau in THRESHOLDS.items():
            data = list(TaskBatches(model, graph, train, 8, ablation))
            twin = reduced_twin(model, "int8", check_speed=False)
            row, kept = [], []
            for mixed in (None, "int8"):
                config = AcdcConfig(threshold=tau, ablation=ablation, mixed_precision=mixed)
                started = time.perf_counter()
                state = acdc(model, train, config, data, twin=twin if mixed else None)
                seconds = time.perf_counter() - started
                circuit = acdc_circuit(model, train, config, state)
                metrics = evaluate(model, circuit, test, ablation=ablation)
                kept.append(state.kept & graph.real)
                row.append((int(kept[-1].sum()), metrics.kl, seconds))
            differ = int((kept[0] ^ kept[1]).sum())
            divergence = twin_divergence(model, twin, data[0])
            print(f"| {name} | {ablation} | {tau:g} | {row[0][0]} | {row[1][0]} | {differ} | {divergence:.1e} | "
                  f"{row[0][1]:.4f} | {row[1][1]:.4f} | {row[0][2]:.1f} | {row[1][2]:.1f} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

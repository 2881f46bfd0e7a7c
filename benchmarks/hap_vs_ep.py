"""HAP against full Edge Pruning: same model, task, examples, seed and target, one process.

Two settings:

(a) ``small``: a 4-layer Llama (8 heads in 4 groups, width 128) trained for about a
    minute on IOI in the tiny word vocabulary, then pruned to convergence with the
    published step counts (EP 3000 steps; HAP with warm start 1000 and 300 steps).
(b) ``smollm2``: SmolLM2-135M IOI with a CPU budget (``--ep-steps``,
    ``--hap-steps``), plus the EP step time divided by a plain forward+backward
    of the same batch.

Prints one table per setting: seconds per step, steps, total seconds, the
speed-up of each HAP run over EP, and the final KL, logit difference, accuracy,
faithfulness and sparsity.

    .venv/bin/python benchmarks/hap_vs_ep.py --setting small
    .venv/bin/python benchmarks/hap_vs_ep.py --setting smollm2 --ep-steps 150 --hap-steps 100
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hap
from hap.ablation import AblationKind
from hap.attribution import AttributionConfig
from hap.batches import batches
from hap.evaluation import evaluate
from hap.hybrid import HybridConfig, hybrid
from hap.models.llama import LlamaAdapter
from hap.models.tiny import tiny_tokenizer
from hap.pruning import PruningConfig, prune, pruned_circuit
from hap.tasks import load_task


def trained_small_llama(seconds: float = 60.0, seed: int = 0) -> hap.Model:
    """A 4-layer Llama trained on IOI (answer position only) for about ``seconds``."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    module = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)
    started, step = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        data = load_task("ioi", tokenizer, 64, seed=1000 + step)
        logits = module(data.clean_ids).logits[torch.arange(64), data.lengths - 1]
        loss = torch.nn.functional.cross_entropy(logits, data.answer_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    module.eval().requires_grad_(False)
    print(f"trained the small model for {step} steps ({time.perf_counter() - started:.0f} s), final loss {loss.item():.3f}")
    return hap.Model("small-llama-ioi", module, tokenizer, LlamaAdapter(module), "built-in")


def plain_step_seconds(model: hap.Model, task, batch_size: int, repeats: int = 3) -> float:
    """Median seconds of one plain forward+backward (to the input embeddings) of one batch."""
    part = next(task.batches(batch_size))
    embed = model.hf_model.get_input_embeddings()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        embeddings = embed(part.clean_ids).detach().requires_grad_(True)
        logits = model.hf_model(inputs_embeds=embeddings).logits[torch.arange(len(part)), part.lengths - 1]
        part.logit_diff(logits).mean().backward()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def run_all(model: hap.Model, task, eval_task, sparsity: float, batch_size: int, ep_steps: int,
            hap_steps: list[int], candidates: float, seed: int) -> list[dict]:
    graph = hap.Graph.from_model(model)
    data = list(batches(model, graph, task, batch_size, AblationKind.INTERCHANGE))
    rows = []

    def row(name: str, circuit, seconds: float, steps: int, seconds_per_step: float) -> dict:
        metrics = evaluate(model, circuit, eval_task, batch_size)
        return {"method": name, "s/step": seconds_per_step, "steps": steps, "total s": seconds,
                "kl": metrics.kl, "logit diff": metrics.logit_diff, "accuracy": metrics.accuracy,
                "faithfulness": metrics.faithfulness, "sparsity": 1 - metrics.n_edges / graph.n_edges}

    started = time.perf_counter()
    config = PruningConfig(target_sparsity=sparsity, steps=ep_steps, batch_size=batch_size, seed=seed)
    result = prune(model, task, config, data=data, progress=True)
    rows.append(row("ep", pruned_circuit(model, task, "ep", result, {}), time.perf_counter() - started,
                    ep_steps, result.seconds_per_step))
    for steps in hap_steps:
        started = time.perf_counter()
        hybrid_config = HybridConfig(
            pruning=PruningConfig(target_sparsity=sparsity, steps=steps, batch_size=batch_size, seed=seed),
            attribution=AttributionConfig(batch_size=batch_size), candidates=candidates, warm_start=True)
        circuit = hybrid(model, task, hybrid_config, data=data, progress=True)
        seconds = time.perf_counter() - started
        rows.append(row(f"hap ({steps} steps)", circuit, seconds, steps, circuit.config["seconds_per_step"]))
    for entry in rows[1:]:
        entry["speed-up"] = rows[0]["total s"] / entry["total s"]
    rows[0]["speed-up"] = 1.0
    return rows


def print_table(rows: list[dict]) -> None:
    columns = ["method", "s/step", "steps", "total s", "speed-up", "kl", "logit diff", "accuracy", "faithfulness",
               "sparsity"]
    print(" | ".join(f"{c:>16}" if i == 0 else f"{c:>12}" for i, c in enumerate(columns)))
    for entry in rows:
        cells = [f"{entry['method']:>16}"]
        for column in columns[1:]:
            value = entry[column]
            cells.append(f"{value:>12d}" if isinstance(value, int) else f"{value:>12.4f}")
        print(" | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("small", "smollm2"), required=True)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--n-examples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--ep-steps", type=int, default=None)
    parser.add_argument("--hap-steps", type=int, nargs="+", default=None)
    parser.add_argument("--candidates", type=float, default=None, help="default: 1.5 x the circuit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.setting == "small":
        model = trained_small_llama()
        n_examples, batch_size = args.n_examples or 64, args.batch_size or 32
        ep_steps, hap_steps = args.ep_steps or 3000, args.hap_steps or [1000, 300]
    else:
        model = hap.load_model("smollm2-135m", device="cpu")
        n_examples, batch_size = args.n_examples or 32, args.batch_size or 16
        ep_steps, hap_steps = args.ep_steps or 150, args.hap_steps or [100]
    task = load_task("ioi", model.tokenizer, n_examples, seed=args.seed)
    eval_task = load_task("ioi", model.tokenizer, n_examples, seed=args.seed + 1)
    graph = hap.Graph.from_model(model)
    print(f"{model.name}: {graph.n_edges} edges; IOI, {n_examples} examples in batches of {batch_size}; "
          f"target sparsity {args.sparsity}; HAP candidates {args.candidates or '1.5x the circuit'} with warm start; "
          f"metrics on {n_examples} fresh examples; {time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads")
    rows = run_all(model, task, eval_task, args.sparsity, batch_size, ep_steps, hap_steps, args.candidates,
                   args.seed)
    print_table(rows)
    plain = plain_step_seconds(model, task, batch_size)
    print(f"plain forward+backward of one batch: {plain:.3f} s; EP step / plain: {rows[0]['s/step'] / plain:.2f} "
          "(target <= 1.5)")


if __name__ == "__main__":
    main()

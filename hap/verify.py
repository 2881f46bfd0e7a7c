"""``hap verify``: the invariants a user checks before trusting a checkpoint.

(i)   the adapter with every edge on reproduces the Hugging Face forward;
(ii)  the masked forward with every mask at 1 reproduces the clean logits;
(iii) the masked forward with every mask at 0 (interchange) reproduces the
      corrupted run's logits;
(iv)  a run that skips what cannot change (a random 20% of edges live) gives the
      same logits as the run that recomputes everything.

Tolerance: 1e-4 in float32. SmolLM2's residual stream carries "massive
activations" (|x| ~ 2.5e4 at the first token), where float32 rounding alone is
about that size: the Hugging Face forward in float32 differs from the same
forward in float64 by up to 1.6e-4 on these very prompts. So when a float32
figure exceeds 1e-4, verify measures that noise floor (one float64 forward of
the Hugging Face model, for models of up to 2e9 parameters) and also accepts a
figure within 1e-4 + floor; the floor is printed as ``float32_noise_floor``.

A tracr model gets its own inputs: BOS, tokens of its vocabulary, padding. Other
models get the sentences as hap tokenises every prompt: with the tokenizer's BOS
when it prepends one by default (``bos`` overrides).

Beside the invariants, ``full_model_task`` says whether the full model does a
task at all: its accuracy and mean logit difference on a small IOI batch (a
tracr model: its own program), flagged ``weak`` at or below chance or with a
negative mean. A weak model does not fail ``verify`` (the adapter may still be
exact), but no circuit of it explains the task.

Prompts are plain sentences by default. On random token ids SmolLM2 grows
extra "massive activations" (|x| ~ 10^4) at arbitrary positions, where float32
itself is only good to ~1e-3 (the Hugging Face forward in float32 differs from
float64 by that much there), so ``random_tokens=True`` is a stress test, not a
pass/fail one.
"""

from __future__ import annotations

import copy

import torch

from .ablation import ComputePlan, interchange_reference, run_masked, trace
from .errors import DataError
from .evaluation import CHANCE_ACCURACY, check_full_model
from .graph import Graph
from .models.loading import Model
from .models.tracr import TracrTransformer, sample_inputs
from .tasks import ioi_task, program_task, prompt_prefix

TASK_CHECK_EXAMPLES = 32

# Same-length pairs are made by truncating all prompts to the shortest one.
SENTENCES = [
    "When Mary and John went to the store, John gave a drink to Mary",
    "When Alice and Bob went to the park, Carl gave a book to Alice",
    "After the lunch, Tom and James went to the garden. James gave a ring to Tom",
    "Then, Kate and Leo had a long argument. Afterwards Leo said to Kate",
    "Friends Sam and Amy found a necklace at the beach. Amy gave it to Sam",
    "While Dan and Sid were working at the office, Sid gave a pen to Dan",
    "The war lasted from the year 1732 to the year 1799, and the peace then",
    "The expedition lasted from the year 1745 to the year 1750 in the forest",
]

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-1, torch.bfloat16: 5e-1}


def verify_prompts(model: Model, random_tokens: bool = False, seed: int = 0,
                   bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted token ids [4, T] of equal length for the invariants (sentences begin as every
    prompt does: ``bos``, None for the tokenizer's default)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model.hf_model, TracrTransformer):  # BOS, the program's tokens, padding; pairs share lengths
        config = model.hf_model.config
        lengths = torch.randint(1, config.max_seq_len + 1, (4,), generator=generator)
        return sample_inputs(config, lengths, generator), sample_inputs(config, lengths, generator)
    if random_tokens:
        ids = torch.randint(0, model.layout.vocab_size, (8, 16), generator=generator)
    else:
        prefix = prompt_prefix(model.tokenizer, bos)
        rows = [prefix + model.tokenizer(text, add_special_tokens=False).input_ids for text in SENTENCES]
        length = min(len(row) for row in rows)
        ids = torch.tensor([row[:length] for row in rows])
    return ids[0::2], ids[1::2]


def full_model_task(model: Model, seed: int = 0, bos: bool | None = None,
                    n_examples: int = TASK_CHECK_EXAMPLES) -> dict:
    """The full model on a small IOI batch (a tracr model: its own program): ``accuracy``, mean
    ``logit_diff``, ``weak`` (at or below chance, or a negative mean); ``error`` when the task cannot be
    built for this tokenizer."""
    tracr = isinstance(model.hf_model, TracrTransformer)
    name = model.name if tracr else "ioi"
    try:
        task = program_task(model.name, n_examples, seed) if tracr else \
            ioi_task(model.tokenizer, n_examples, seed, bos=bos)
    except DataError as error:
        return {"task": name, "error": str(error)}
    check = check_full_model(model, task, "verify", n_examples=None)
    return {"task": name, "n_examples": len(task), "bos": task.bos, "accuracy": check.accuracy,
            "logit_diff": check.logit_diff, "weak": check.weak}


def describe_task_check(result: dict) -> str:
    """The one line ``hap verify`` prints about the full model doing a task."""
    if "error" in result:
        return f"full model on {result['task']}: not measured ({result['error']})"
    line = (f"full model on {result['n_examples']} {result['task']} examples"
            f"{' (BOS first)' if result['bos'] else ' (no BOS)'}: accuracy {result['accuracy']:.2f}, mean logit "
            f"difference {result['logit_diff']:+.2f}")
    if result["weak"]:
        hint = "missing BOS? try --bos" if not result["bos"] else "a BOS it does not expect? try --no-bos"
        line += (f"  WEAK: at or below chance ({CHANCE_ACCURACY:.2f}) or wrong on average; a circuit of it would "
                 f"explain a broken behaviour ({hint}; or a prompt format it was not trained on)")
    return line


def verify_model(model: Model, random_tokens: bool = False, seed: int = 0, bos: bool | None = None) -> dict:
    """Run the invariants on a loaded model; returns the JSON-ready report (``full_model_task``: the full
    model on a small IOI batch, which does not decide ``passed``)."""
    graph = Graph.from_model(model)
    clean, corrupted = (ids.to(model.device) for ids in verify_prompts(model, random_tokens, seed, bos))
    with torch.no_grad():
        hf_clean = model.hf_model(clean).logits
        hf_corrupted = model.hf_model(corrupted).logits
        adapter = trace(model, clean).logits
        reference = interchange_reference(model, corrupted)
        ones = torch.ones(graph.real.shape)
        all_on = run_masked(model, graph, clean, reference, ones)
        all_off = run_masked(model, graph, clean, reference, torch.zeros_like(ones))
        generator = torch.Generator().manual_seed(seed)
        live = (torch.rand(graph.real.shape, generator=generator) < 0.2) & graph.real
        mask = torch.rand(graph.real.shape, generator=generator) * live
        plan = ComputePlan.build(graph, live, reference.kind)
        skipped = run_masked(model, graph, clean, reference, mask, plan=plan)
        full = run_masked(model, graph, clean, reference, mask)

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    tolerance = TOLERANCE[model.weights_dtype]
    figures = {
        "adapter_vs_hf_max_abs_diff": diff(adapter, hf_clean),
        "all_on_vs_clean_max_abs_diff": diff(all_on, hf_clean),
        "all_off_vs_corrupted_max_abs_diff": diff(all_off, hf_corrupted),
        "skipped_vs_full_max_abs_diff": diff(skipped, full),
    }
    floor = None
    if model.weights_dtype == torch.float32 and max(figures.values()) > tolerance:
        floor = float32_noise_floor(model, clean, corrupted, hf_clean, hf_corrupted)
    report = {
        "model": model.name,
        "family": model.layout.family,
        "device": str(model.device),
        "dtype": str(model.weights_dtype).removeprefix("torch."),
        "n_edges": graph.n_edges,
        "prompts": ("program-inputs" if isinstance(model.hf_model, TracrTransformer)
                    else "random-tokens" if random_tokens else "sentences"),
        "batch": list(clean.shape),
        **figures,
        "tolerance": tolerance,
    }
    if floor is not None:
        report["float32_noise_floor"] = floor
        tolerance = tolerance + floor
    report["passed"] = all(value <= tolerance for value in figures.values())
    report["full_model_task"] = full_model_task(model, seed, bos)
    return report


MAX_PARAMETERS_FOR_FLOOR = 2e9


def float32_noise_floor(
    model: Model, clean: torch.Tensor, corrupted: torch.Tensor, hf_clean: torch.Tensor, hf_corrupted: torch.Tensor
) -> float | None:
    """How far the Hugging Face float32 forward is from its own float64 forward on these prompts.

    Runs a float64 copy of the model (None when the model is too large for that).
    """
    n_parameters = sum(p.numel() for p in model.hf_model.parameters())
    if n_parameters > MAX_PARAMETERS_FOR_FLOOR:
        return None
    exact = copy.deepcopy(model.hf_model).to(torch.float64)
    with torch.no_grad():
        floor = max(
            float((exact(clean).logits - hf_clean.double()).abs().max()),
            float((exact(corrupted).logits - hf_corrupted.double()).abs().max()),
        )
    del exact
    return floor

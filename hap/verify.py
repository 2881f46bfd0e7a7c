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

A tracr model gets its own inputs: BOS, tokens of its vocabulary, padding.

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
from .graph import Graph
from .models.loading import Model
from .models.tracr import TracrTransformer, sample_inputs

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


def verify_prompts(model: Model, random_tokens: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted token ids [4, T] of equal length for the invariants."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model.hf_model, TracrTransformer):  # BOS, the program's tokens, padding; pairs share lengths
        config = model.hf_model.config
        lengths = torch.randint(1, config.max_seq_len + 1, (4,), generator=generator)
        return sample_inputs(config, lengths, generator), sample_inputs(config, lengths, generator)
    if random_tokens:
        ids = torch.randint(0, model.layout.vocab_size, (8, 16), generator=generator)
    else:
        rows = [model.tokenizer(text, add_special_tokens=False).input_ids for text in SENTENCES]
        length = min(len(row) for row in rows)
        ids = torch.tensor([row[:length] for row in rows])
    return ids[0::2], ids[1::2]


def verify_model(model: Model, random_tokens: bool = False, seed: int = 0) -> dict:
    """Run the invariants on a loaded model; returns the JSON-ready report."""
    graph = Graph.from_model(model)
    clean, corrupted = (ids.to(model.device) for ids in verify_prompts(model, random_tokens, seed))
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

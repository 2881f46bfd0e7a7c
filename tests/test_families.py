"""Model families beyond Llama and GPT-2: exact on tiny configs with noisy weights, for every ablation.

Every parameter is perturbed (random init leaves biases at 0 and norm weights at 1, which would hide a
bias or norm applied in the wrong place). ``hap verify`` compares the adapter with the Hugging Face
forward; the masked run is compared with the slow twin under each ablation, with compute skipping.
"""

from __future__ import annotations

import json

import pytest
import torch
from naive import naive_masked_logits
from transformers import (GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import hap
from hap.ablation import ComputePlan, interchange_reference, mean_reference, run_masked, zero_reference
from hap.errors import UnsupportedArchitectureError
from hap.models.tiny import tiny_tokenizer
from hap.verify import verify_model, verify_prompts

SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64}
FAMILIES = {
    "llama-bias": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "qwen2-sliding": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": 2,
                                                      "max_window_layers": 1}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 2}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16, "attention_bias": True}),
    "qwen3-sliding": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16, "use_sliding_window": True,
                                                      "sliding_window": 2, "max_window_layers": 2}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 16}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"sliding_window": 2, "pad_token_id": 0}),
    "phi3-partial-rotary": (Phi3Config, Phi3ForCausalLM, {"partial_rotary_factor": 0.5, "pad_token_id": 0}),
    "gpt2": (GPT2Config, GPT2LMHeadModel, {"n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 64}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def noisy_model(request, tmp_path_factory) -> hap.Model:
    config_class, model_class, extra = FAMILIES[request.param]
    tokenizer = tiny_tokenizer()
    shape = {} if config_class is GPT2Config else SHAPE  # GPT-2 names its sizes differently
    config = config_class(vocab_size=len(tokenizer), **shape, **extra)
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hap.load_model(str(folder), device="cpu", dtype="float64")


def test_verify_is_exact(noisy_model):
    report = verify_model(noisy_model)
    assert report["passed"], report
    assert report["adapter_vs_hf_max_abs_diff"] <= 1e-6


def test_the_features_are_really_exercised(noisy_model):
    config = noisy_model.hf_model.config
    attention = noisy_model.adapter.attention[0]
    if config.model_type == "qwen3":
        assert attention.q_norm is not None and attention.k_norm is not None
        assert not torch.allclose(noisy_model.hf_model.model.layers[0].self_attn.q_norm.weight,
                                  torch.ones(16, dtype=torch.float64))
    windows = getattr(noisy_model.adapter, "windows", [])
    if getattr(config, "sliding_window", None) and (config.model_type in ("mistral", "phi3")
                                                    or config.use_sliding_window):
        assert any(window == 2 for window in windows)
        clean, _ = verify_prompts(noisy_model)
        assert clean.shape[1] > 2  # longer than the window, so the window cuts something


@pytest.mark.parametrize("kind", ["interchange", "mean", "zero"])
def test_masked_run_equals_the_slow_twin_with_compute_skipping(noisy_model, kind):
    model = noisy_model
    graph = hap.Graph.from_model(model)
    clean, corrupted = verify_prompts(model)
    reference = {"interchange": lambda: interchange_reference(model, corrupted),
                 "mean": lambda: mean_reference(model, graph, corrupted),
                 "zero": lambda: zero_reference(model, graph, clean.shape[1])}[kind]()
    generator = torch.Generator().manual_seed(1)
    mask = torch.rand(graph.real.shape, generator=generator, dtype=torch.float64)
    live = (torch.rand(graph.real.shape, generator=generator) < 0.3) & graph.real
    with torch.no_grad():
        slow = naive_masked_logits(model, graph, clean, reference.outputs, mask)
        fast = run_masked(model, graph, clean, reference, mask)
        skipped = run_masked(model, graph, clean, reference, mask * live, ComputePlan.build(graph, live, kind))
        slow_skipped = naive_masked_logits(model, graph, clean, reference.outputs, mask * live) \
            if kind == "interchange" else None
    assert torch.allclose(fast, slow, atol=1e-9)
    if slow_skipped is not None:  # mean/zero: sources outside the plan write z^, checked by verify
        assert torch.allclose(skipped, slow_skipped, atol=1e-9)


def test_a_layer_type_the_adapter_does_not_model_is_refused(tmp_path):
    tokenizer = tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), **SHAPE)
    config.layer_types = ["full_attention", "chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedArchitectureError, match="chunked_attention"):
        from hap.models.llama import layer_windows

        layer_windows(config)


@pytest.mark.parametrize("config_name", ["Gemma2Config", "GPTNeoXConfig", "Olmo2Config", "Starcoder2Config"])
def test_families_not_yet_modelled_are_refused_with_the_supported_list(tmp_path, config_name):
    import transformers

    getattr(transformers, config_name)().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="supported families are Llama-style"):
        hap.load_model(str(tmp_path))


def test_a_saved_checkpoint_works_with_discover_evaluate_and_report(noisy_model, tmp_path, capsys):
    from hap.cli import main

    folder = noisy_model.name  # the save_pretrained directory the fixture loaded
    out = tmp_path / "run"
    assert main(["discover", "--model", folder, "--method", "eap-ig-inputs", "--edges", "25", "--n-examples", "4",
                 "--n-test", "4", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_edges"] <= 25
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").stat().st_size > 1000 and (out / "circuit.svg").is_file()

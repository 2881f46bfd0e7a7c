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
from transformers import (FalconConfig, FalconForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
                          GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Olmo2Config, Olmo2ForCausalLM, Phi3Config,
                          Phi3ForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Starcoder2Config, Starcoder2ForCausalLM)

import hap
from hap.ablation import ComputePlan, interchange_reference, mean_reference, run_masked, trace, zero_reference
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
    # post-norms, soft-capped attention and logits, sliding-window layers every other layer
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 16, "sliding_window": 2, "query_pre_attn_scalar": 8,
                                                 "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0}),
    # post-norms, per-head q/k norms, local layers with their own rotary frequencies
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"head_dim": 16, "sliding_window": 2,
                                                     "layer_types": ["sliding_attention", "full_attention",
                                                                     "sliding_attention"]}),
    # no pre-norms, post-norms, q/k norms over all heads at once
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {"attention_bias": True}),
    "starcoder2": (Starcoder2Config, Starcoder2ForCausalLM, {"sliding_window": 2, "use_bias": True}),
    # parallel attention and MLP, fused per-head qkv, partial rotary (multi-head: no key/value groups)
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, {"num_key_value_heads": 4, "rotary_pct": 0.5}),
    "gpt_neox-sequential": (GPTNeoXConfig, GPTNeoXForCausalLM, {"num_key_value_heads": 4,
                                                               "use_parallel_residual": False}),
    # parallel attention and MLP sharing one norm, per-head q/k LayerNorms, partial rotary, lm_head bias
    "phi": (PhiConfig, PhiForCausalLM, {"qk_layernorm": True, "partial_rotary_factor": 0.5}),
    # Falcon-7B: multi-query, parallel, one shared norm; Falcon-40B: grouped per-group fused qkv, two norms
    "falcon-7b": (FalconConfig, FalconForCausalLM, {"multi_query": True, "parallel_attn": True, "bias": True}),
    "falcon-40b": (FalconConfig, FalconForCausalLM, {"new_decoder_architecture": True, "num_kv_heads": 2,
                                                     "bias": True}),
    "falcon-sequential": (FalconConfig, FalconForCausalLM, {"multi_query": False, "parallel_attn": False}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def noisy_model(request, tmp_path_factory) -> hap.Model:
    config_class, model_class, extra = FAMILIES[request.param]
    tokenizer = tiny_tokenizer()
    shape = {} if config_class is GPT2Config else SHAPE  # GPT-2 names its sizes differently
    config = config_class(vocab_size=len(tokenizer), **{**shape, **extra})
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hap.load_model(str(folder), device="cpu", dtype="float64")


def test_a_soft_capped_model_is_loaded_with_the_attention_that_caps(tmp_path):
    """Gemma-2's attention logits are soft-capped only in the eager attention; transformers 5.17 loads it with
    SDPA, which drops the cap (verify then failed by 0.85 on the logits), so the loader asks for eager."""
    config_class, model_class, extra = FAMILIES["gemma2"]
    tokenizer = tiny_tokenizer()
    model_class(config_class(vocab_size=len(tokenizer), **{**SHAPE, **extra})).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = hap.load_model(str(tmp_path), device="cpu")
    assert model.hf_model.config.attn_logit_softcapping == extra["attn_logit_softcapping"]
    assert model.hf_model.config._attn_implementation == "eager"


def test_verify_is_exact(noisy_model):
    report = verify_model(noisy_model)
    assert report["passed"], report
    # Post-normed layers write the float64 sum of their heads' shares; Hugging Face computes those norms in
    # float32 even in a float64 model, so there the two agree to float32 rounding, not to float64's.
    bound = 1e-5 if noisy_model.layout.heads_normed_together else 1e-6
    assert report["adapter_vs_hf_max_abs_diff"] <= bound


def test_the_features_are_really_exercised(noisy_model):
    config = noisy_model.hf_model.config
    attention = noisy_model.adapter.attention[0]
    if config.model_type == "qwen3":
        assert attention.q_norm is not None and attention.k_norm is not None
        assert not torch.allclose(noisy_model.hf_model.model.layers[0].self_attn.q_norm.weight,
                                  torch.ones(16, dtype=torch.float64))
    windows = getattr(noisy_model.adapter, "windows", [])
    if config.model_type in ("gemma2", "gemma3_text"):
        assert attention.softcap == (2.0 if config.model_type == "gemma2" else None)
        assert noisy_model.adapter.final_softcap == (5.0 if config.model_type == "gemma2" else None)
        assert attention.scale == config.query_pre_attn_scalar ** -0.5
    if config.model_type == "gemma3_text":  # local and global layers turn with different frequencies
        ctx = noisy_model.adapter.prepare(torch.zeros(1, 8, dtype=torch.long))
        assert not torch.allclose(ctx.layer_rope[0][0], ctx.layer_rope[1][0])
    if config.model_type == "olmo2":
        assert attention.qk_norm_spans_heads and attention.norm(torch.ones(3)).equal(torch.ones(3))
    layout = noisy_model.layout
    assert layout.heads_normed_together == (config.model_type in ("gemma2", "gemma3_text", "olmo2"))
    if layout.heads_normed_together:  # the post-norm's gain is not 1, so a misplaced norm would show
        assert attention.post_norm is not None
        assert not torch.allclose(attention.post_norm(torch.ones(64, dtype=torch.float64)).std(),
                                  torch.zeros((), dtype=torch.float64))
    graph = hap.Graph.from_model(noisy_model)
    beside = graph.real[graph.source_index("a1.h0"), graph.reader_index("m1")]
    assert bool(beside) != layout.parallel_attn_mlp
    parallel = (config.model_type == "phi" or getattr(config, "use_parallel_residual", False)
                or getattr(config, "parallel_attn", False) or getattr(config, "new_decoder_architecture", False))
    assert layout.parallel_attn_mlp == parallel
    if getattr(config, "sliding_window", None) and (config.model_type in ("mistral", "phi3", "starcoder2", "gemma2",
                                                                          "gemma3_text")
                                                    or getattr(config, "use_sliding_window", False)):
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


def test_head_inputs_project_each_reader_as_if_alone(noisy_model, monkeypatch):
    # A layer's q, k and v readers, each with its own input, in one call (for an RMS norm: one fused product
    # for all of them; float64 admitted to the fused path here so that the comparison is exact) against
    # each reader projected alone through the norm module: values and the inputs' gradients. Hugging Face's
    # RMS norms compute in float32 even in a float64 model: the two agree to float32 rounding (up to 7e-7).
    monkeypatch.setattr("hap.models.normed.FUSED_DTYPES", (torch.float32, torch.float64))
    adapter, layout = noisy_model.adapter, noisy_model.layout
    monkeypatch.setattr(adapter, "_rms_found", {})
    clean, _ = verify_prompts(noisy_model)
    ctx = adapter.prepare(clean)
    heads = torch.tensor([0, 2, layout.n_heads - 1])
    groups = torch.unique(torch.tensor([0, layout.n_kv_heads - 1]))
    n_heads, n_groups = len(heads), len(groups)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n_heads + 2 * n_groups, *clean.shape, layout.d_model, generator=generator,
                    dtype=torch.float64).requires_grad_(True)
    layer = 1
    fused = adapter.head_inputs(layer, x, ctx, heads, groups)
    alone = (torch.cat([adapter.queries(layer, x[i : i + 1], ctx, heads[i : i + 1]) for i in range(n_heads)], 1),
             torch.cat([adapter.keys(layer, x[n_heads + j : n_heads + j + 1], ctx, groups[j : j + 1])
                        for j in range(n_groups)], 1),
             torch.cat([adapter.values(layer, x[n_heads + n_groups + j : n_heads + n_groups + j + 1], ctx,
                                       groups[j : j + 1]) for j in range(n_groups)], 1))
    upstream = [torch.randn(part.shape, generator=generator, dtype=torch.float64) for part in alone]
    for got, expected in zip(fused, alone):
        assert torch.allclose(got, expected, atol=1e-5)
    (grad_fused,) = torch.autograd.grad(sum((g * u).sum() for g, u in zip(fused, upstream)), x)
    (grad_alone,) = torch.autograd.grad(sum((g * u).sum() for g, u in zip(alone, upstream)), x)
    assert torch.allclose(grad_fused, grad_alone, atol=1e-5)
    rms_norm = noisy_model.hf_model.config.model_type in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2",
                                                          "gemma3_text", "phi3")
    assert (adapter._rms_parameters(layer, x) is not None) == rms_norm  # the fused path is really exercised


def test_a_layer_type_the_adapter_does_not_model_is_refused(tmp_path):
    tokenizer = tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), **SHAPE)
    config.layer_types = ["full_attention", "chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedArchitectureError, match="chunked_attention"):
        from hap.models.rotary import layer_windows

        layer_windows(config)


def test_families_not_modelled_are_refused_with_the_supported_list(tmp_path):
    from transformers import MambaConfig

    MambaConfig().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="supported families are rotary decoders"):
        hap.load_model(str(tmp_path))


def test_falcon_with_alibi_positions_is_refused_with_the_reason_and_leaves_no_run(tmp_path, capsys):
    from hap.cli import main

    tokenizer = tiny_tokenizer()
    folder = tmp_path / "falcon-rw"
    FalconForCausalLM(FalconConfig(vocab_size=len(tokenizer), **SHAPE, alibi=True)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(UnsupportedArchitectureError, match="ALiBi"):
        hap.load_model(str(folder))
    out = tmp_path / "run"
    assert main(["discover", "--model", str(folder), "--edges", "5", "--out", str(out)]) != 0
    assert "ALiBi" in capsys.readouterr().err
    assert not out.exists()


def test_a_saved_checkpoint_works_with_discover_evaluate_and_report(noisy_model, tmp_path, capsys):
    from hap.cli import main

    folder = noisy_model.name  # the save_pretrained directory the fixture loaded
    out = tmp_path / "run"
    assert main(["discover", "--model", folder, "--allow-weak-model", "--method", "eap-ig-inputs", "--edges", "25", "--n-examples", "4",
                 "--n-test", "4", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--allow-weak-model", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_edges"] <= 25
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").stat().st_size > 1000 and (out / "circuit.svg").is_file()


def test_circuit_and_mib_files_keep_the_graph_shape(noisy_model, tmp_path):
    from hap.circuit import Circuit
    from hap.report.export import from_mib, to_mib

    graph = hap.Graph.from_model(noisy_model)
    scores = torch.randn(graph.real.shape) * graph.real
    circuit = hap.Circuit(model=noisy_model.name, task="t", method="m", layout=noisy_model.layout, scores=scores,
                          in_graph=graph.real & (scores.abs() > 1), config={}, metrics={})
    again = Circuit.from_dict(json.loads(json.dumps(circuit.to_dict())))
    assert again.layout == circuit.layout  # the parallel / post-norm flags survive the file
    mib = to_mib(circuit)
    assert mib["cfg"]["parallel_attn_mlp"] == noisy_model.layout.parallel_attn_mlp
    back = from_mib(mib)
    assert back.layout.parallel_attn_mlp == noisy_model.layout.parallel_attn_mlp
    assert torch.equal(back.in_graph, circuit.in_graph)


def test_attention_pattern_and_final_norm_are_the_hugging_face_models(noisy_model):
    """The weights ``attention_pattern`` reports are those Hugging Face's eager attention uses (soft caps,
    sliding windows, q/k norms, rotary), and the final norm then the head is the unembedding."""
    model = noisy_model
    clean, _ = verify_prompts(model)
    hf = model.hf_model
    eager = type(hf).from_pretrained(hf.config.name_or_path, attn_implementation="eager", dtype=torch.float64)
    with torch.no_grad():
        expected = eager(clean, output_attentions=True).attentions
    graph = hap.Graph.from_model(model)
    adapter, layout = model.adapter, model.layout
    group = torch.arange(layout.n_heads) // layout.heads_per_group
    with torch.no_grad():
        recorded = trace(model, clean, logits=True)
        ctx = adapter.prepare(clean)
        for layer in range(layout.n_layers):
            x = recorded.block_inputs[graph.base_block(2 * layer + 1)][None]
            q, k = adapter.queries(layer, x, ctx), adapter.keys(layer, x, ctx).index_select(1, group)
            pattern = adapter.attention_pattern(layer, q, k, ctx)
            assert torch.allclose(pattern.double(), expected[layer].double(), atol=1e-6), layer
        final = recorded.block_inputs[-1]
        assert torch.allclose(adapter.logits_from_normed(adapter.final_norm()(final)), recorded.logits, atol=1e-9)

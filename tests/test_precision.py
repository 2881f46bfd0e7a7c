"""PAHQ's mixed precision: the investigated block in full precision, the rest on a reduced twin."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import hap
from hap import precision as precision_module
from hap.ablation import MixedPrecision, interchange_reference, run_masked
from hap.acdc import AcdcConfig, acdc
from hap.attribution import AttributionConfig, attribute
from hap.batches import TaskBatches
from hap.cli import main
from hap.errors import HapError
from hap.graph import Graph
from hap.models.loading import adapter_for
from hap.precision import ReducedTwin, reduced_twin
from hap.tasks import load_task

ATTENTION_PARTS = ("attn", "input_layernorm", "ln_1")
MLP_PARTS = ("mlp", "post_attention_layernorm", "ln_2")


def _layer_params(hf_model: torch.nn.Module, layer: int, parts: tuple[str, ...]) -> list[str]:
    marks = (f"layers.{layer}.", f"h.{layer}.")
    return [name for name, _ in hf_model.named_parameters()
            if any(mark in name for mark in marks) and any(part in name for part in parts)]


def _perturbed_copy(model: hap.Model, seed: int) -> torch.nn.Module:
    """A copy whose transformer layers (not embedding or unembedding) have other weights."""
    twin = copy.deepcopy(model.hf_model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in twin.named_parameters():
            if ".layers." in name or ".h." in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator) * parameter.std())
    return twin


def _as_model(model: hap.Model, hf_model: torch.nn.Module) -> hap.Model:
    return hap.Model(model.name, hf_model, model.tokenizer, adapter_for(hf_model, model.name), model.origin)


def test_the_investigated_block_is_computed_by_the_model_and_the_rest_by_the_twin(tiny_model):
    # The slow twin: one model whose layers are the twin's except the investigated block, run plainly.
    graph = Graph.from_model(tiny_model)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(8, tiny_model.layout.vocab_size, (3, 7), generator=generator)
    corrupted = torch.randint(8, tiny_model.layout.vocab_size, (3, 7), generator=generator)
    reference = interchange_reference(tiny_model, corrupted)
    mask = torch.rand(graph.real.shape, generator=generator)
    perturbed = _perturbed_copy(tiny_model, 1)
    twin = ReducedTwin("test", adapter_for(perturbed, tiny_model.name), torch.float32)
    original = dict(tiny_model.hf_model.named_parameters())
    for block in (1, 2, 4, graph.n_blocks - 1):
        hybrid = copy.deepcopy(perturbed)
        if block < graph.n_blocks - 1:
            layer, parts = (block - 1) // 2, (ATTENTION_PARTS if block % 2 else MLP_PARTS)
            names = _layer_params(hybrid, layer, parts)
            assert names
            with torch.no_grad():
                for name, parameter in hybrid.named_parameters():
                    if name in names:
                        parameter.copy_(original[name])
        with torch.no_grad():
            mixed = run_masked(tiny_model, graph, clean, reference, mask, precision=MixedPrecision(twin, block))
            expected = run_masked(_as_model(tiny_model, hybrid), graph, clean, reference, mask)
            plain = run_masked(tiny_model, graph, clean, reference, mask)
        assert torch.allclose(mixed, expected, atol=1e-5), block
        assert not torch.allclose(mixed, plain, atol=1e-3), block  # the twin is really used


def test_mixed_precision_refuses_gradients(tiny_llama):
    graph = Graph.from_model(tiny_llama)
    clean = torch.randint(8, tiny_llama.layout.vocab_size, (2, 5))
    reference = interchange_reference(tiny_llama, clean.flip(0))
    twin = reduced_twin(tiny_llama, "int8", check_speed=False)
    mask = torch.ones(graph.real.shape, requires_grad=True)
    with pytest.raises(hap.errors.InvalidMaskError, match="no gradient"):
        run_masked(tiny_llama, graph, clean, reference, mask, precision=MixedPrecision(twin, 1))


def test_int8_twin_is_close_to_float32(tiny_llama):
    graph = Graph.from_model(tiny_llama)
    clean = torch.randint(8, tiny_llama.layout.vocab_size, (2, 6))
    reference = interchange_reference(tiny_llama, clean.flip(0))
    twin = reduced_twin(tiny_llama, "int8", check_speed=False)
    assert twin.kind == "int8"
    mask = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = run_masked(tiny_llama, graph, clean, reference, mask, precision=MixedPrecision(twin, 2))
        plain = run_masked(tiny_llama, graph, clean, reference, mask)
    assert not torch.equal(mixed, plain)
    assert torch.allclose(mixed.softmax(-1), plain.softmax(-1), atol=2e-2)


@pytest.mark.parametrize("block", [1, 4])  # the last MLP on the twin, or the investigated block
def test_a_bfloat16_twin_answers_at_the_answer_positions_as_in_the_whole_run(tiny_llama, block):
    # The twin's adapter answers in float32 while its inputs are bfloat16: the answer-position path (only
    # the last MLP's answer rows computed) must equal the whole run read at those positions.
    graph = Graph.from_model(tiny_llama)
    generator = torch.Generator().manual_seed(5)
    clean = torch.randint(8, tiny_llama.layout.vocab_size, (3, 6), generator=generator)
    reference = interchange_reference(tiny_llama, clean.flip(0))
    mask = torch.rand(graph.real.shape, generator=generator)
    positions = torch.tensor([5, 3, 4])
    twin = reduced_twin(tiny_llama, "bfloat16", check_speed=False)
    precision = MixedPrecision(twin, block)
    with torch.no_grad():
        at_answers = run_masked(tiny_llama, graph, clean, reference, mask, positions=positions, precision=precision)
        whole = run_masked(tiny_llama, graph, clean, reference, mask, precision=precision)
    assert at_answers.dtype == whole.dtype == torch.float32
    assert torch.allclose(at_answers, whole[torch.arange(3), positions], atol=1e-5)


def test_acdc_with_an_exact_twin_equals_plain_acdc(tiny_gpt2_64):
    # The mixed sweep's bookkeeping (a baseline per reader, prefixes on the twin) changes no decision when
    # the twin computes exactly what the model does.
    model = tiny_gpt2_64
    task = load_task("ioi", model.tokenizer, 6, seed=2)
    batches = list(TaskBatches(model, Graph.from_model(model), task, 3, "interchange"))
    same = ReducedTwin("test", adapter_for(copy.deepcopy(model.hf_model), model.name), torch.float64)
    plain = acdc(model, task, AcdcConfig(threshold=1e-6, tests_per_forward=3), batches)
    mixed = acdc(model, task, AcdcConfig(threshold=1e-6, tests_per_forward=3, mixed_precision="int8"), batches,
                 twin=same)
    assert torch.equal(mixed.kept, plain.kept)
    assert 0 < int(plain.kept.sum()) < int(Graph.from_model(model).real.sum())
    assert mixed.forwards > plain.forwards  # one baseline per reader


def test_acdc_refuses_a_twin_further_from_the_model_than_tau(tiny_llama):
    task = load_task("ioi", tiny_llama.tokenizer, 4, seed=1)
    batches = list(TaskBatches(tiny_llama, Graph.from_model(tiny_llama), task, 4, "interchange"))
    far = ReducedTwin("test", adapter_for(_perturbed_copy(tiny_llama, 3), tiny_llama.name), torch.float32)
    distance = precision_module.twin_divergence(tiny_llama, far, batches[0])
    assert distance > 1e-3
    config = AcdcConfig(threshold=distance / 2, mixed_precision="int8")
    with pytest.raises(HapError, match="more than tau .*raise tau, use a closer precision"):
        acdc(tiny_llama, task, config, batches, twin=far)
    state = acdc(tiny_llama, task, AcdcConfig(threshold=distance * 2, mixed_precision="int8"), batches, twin=far)
    assert state.position > 0  # a tau above the twin's distance runs
    logit_diff = AcdcConfig(threshold=distance / 2, metric="logit-diff", mixed_precision="int8")
    assert acdc(tiny_llama, task, logit_diff, batches, twin=far).position > 0  # tau is not in nats there


def test_auto_on_cuda_takes_the_half_precision_closer_to_the_model(tiny_llama, monkeypatch):
    task = load_task("ioi", tiny_llama.tokenizer, 4, seed=1)
    batch = TaskBatches(tiny_llama, Graph.from_model(tiny_llama), task, 4, "interchange")[0]
    distances = {kind: precision_module.twin_divergence(tiny_llama, precision_module._build_twin(tiny_llama, kind),
                                                        batch) for kind in ("float16", "bfloat16")}
    assert distances["float16"] != distances["bfloat16"]
    chosen = precision_module._closest_half_twin(tiny_llama, batch)
    assert chosen.kind == min(distances, key=distances.get) and chosen.dtype == getattr(torch, chosen.kind)
    assert chosen.divergence == pytest.approx(distances[chosen.kind])
    measured = precision_module.twin_divergence  # a float16 overflow (NaN) counts as infinitely far
    monkeypatch.setattr(precision_module, "twin_divergence", lambda model, twin, sample: float("nan")
                        if twin.kind == "float16" else measured(model, twin, sample))
    assert precision_module._closest_half_twin(tiny_llama, batch).kind == "bfloat16"


def test_exact_patching_with_an_exact_twin_equals_exact(tiny_llama):
    task = load_task("ioi", tiny_llama.tokenizer, 4, seed=1)
    same = ReducedTwin("test", adapter_for(copy.deepcopy(tiny_llama.hf_model), tiny_llama.name), torch.float32)
    plain = attribute(tiny_llama, task, "exact")
    mixed = attribute(tiny_llama, task, config=AttributionConfig(method="exact", mixed_precision="int8"), twin=same)
    assert torch.allclose(mixed.values, plain.values, atol=1e-6)
    perturbed = ReducedTwin("test", adapter_for(_perturbed_copy(tiny_llama, 3), tiny_llama.name), torch.float32)
    other = attribute(tiny_llama, task, config=AttributionConfig(method="exact", mixed_precision="int8"),
                      twin=perturbed)
    assert not torch.allclose(other.values, plain.values, atol=1e-4)


def test_a_slower_precision_is_refused_with_its_timing(tiny_llama, monkeypatch):
    timings = iter([0.001, 0.004])  # float32, then the reduced twin
    monkeypatch.setattr(precision_module, "_mlp_seconds", lambda *args: next(timings))
    with pytest.raises(HapError, match=r"int8: on this cpu one MLP takes 4.00 ms in int8 against 1.00 ms"):
        reduced_twin(tiny_llama, "auto")


def test_a_precision_that_moves_the_model_is_refused(tiny_llama, monkeypatch):
    task = load_task("ioi", tiny_llama.tokenizer, 4, seed=1)
    batch = TaskBatches(tiny_llama, Graph.from_model(tiny_llama), task, 4)[0]
    twin = reduced_twin(tiny_llama, "int8", check_speed=False, sample=batch)
    measured = precision_module.twin_divergence(tiny_llama, twin, batch)
    assert 0 < measured <= precision_module.MAX_TWIN_KL
    monkeypatch.setattr(precision_module, "MAX_TWIN_KL", measured / 2)
    with pytest.raises(HapError, match=r"answers the task's first examples with KL .* nats from float32"):
        reduced_twin(tiny_llama, "int8", check_speed=False, sample=batch)


def test_int8_on_a_model_without_linear_mlps_is_refused(tiny_gpt2):
    with pytest.raises(HapError, match="Conv1D"):
        reduced_twin(tiny_gpt2, "int8", check_speed=False)


def test_bad_precision_settings_are_refused(tiny_llama):
    with pytest.raises(HapError, match="must be one of"):
        reduced_twin(tiny_llama, "fp8")
    with pytest.raises(HapError, match="applies to the patching methods"):
        AttributionConfig(method="eap", mixed_precision="int8")
    with pytest.raises(HapError, match="float32 model"):
        reduced_twin(hap.load_model("tiny-llama", dtype="float64"), "int8")


def test_cli_acdc_with_mixed_precision_records_it(tmp_path, monkeypatch, capsys):
    timings = iter([0.004, 0.001])  # the reduced twin is faster here, and close enough
    monkeypatch.setattr(precision_module, "_mlp_seconds", lambda *args: next(timings))
    monkeypatch.setattr(precision_module, "twin_divergence", lambda *args: 0.001)
    out = tmp_path / "run"
    main(["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", "acdc", "--threshold", "0.001", "--n-examples", "4",
          "--n-test", "4", "--mixed-precision", "int8", "--device", "cpu", "--out", str(out), "--no-report"])
    saved = json.loads((out / "circuit.json").read_text())
    assert saved["config"]["mixed_precision"] == "int8"
    assert main(["discover", "--model", "tiny-gpt2", "--allow-weak-model", "--method", "ep", "--edges", "10", "--mixed-precision", "int8",
                 "--out", str(tmp_path / "ep")]) != 0
    assert "--mixed-precision applies to the patching methods" in capsys.readouterr().err
    assert not (tmp_path / "ep").exists()

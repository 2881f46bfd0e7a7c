"""The real default model, SmolLM2-135M-Instruct (slow: run by `make test-slow` and CI)."""

import pytest
import torch

import hap
from hap.models import loading
from hap.verify import verify_model

pytestmark = pytest.mark.slow


def test_second_load_reads_the_cache_without_dequantising(tmp_path, monkeypatch):
    monkeypatch.setenv("HAP_CACHE", str(tmp_path))
    calls = []
    dequantise = loading.dequantise_gguf
    monkeypatch.setattr(loading, "dequantise_gguf", lambda path: calls.append(path) or dequantise(path))
    first = hap.load_model("smollm2-135m", device="cpu")
    assert (first.origin, len(calls)) == ("gguf", 1)
    second = hap.load_model("smollm2-135m", device="cpu")
    assert (second.origin, len(calls)) == ("cache", 1)
    assert not list(tmp_path.glob(".smollm2*"))  # no staging directory left behind
    ids = first.tokenizer("When Mary and John went to the store, John gave a drink to", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(first.hf_model(ids).logits, second.hf_model(ids).logits)


def test_smollm2_invariants():
    model = hap.load_model("smollm2-135m", device="cpu")
    assert hap.Graph.from_model(model).n_edges == 70651
    report = verify_model(model)
    assert report["passed"], report
    assert report["adapter_vs_hf_max_abs_diff"] <= 1e-4
    assert report["all_off_vs_corrupted_max_abs_diff"] <= 1e-4
    assert report["skipped_vs_full_max_abs_diff"] <= 1e-4
    # all-on is within 1e-4 plus float32's own noise on this model (see hap.verify)
    assert report["all_on_vs_clean_max_abs_diff"] <= 1e-4 + report.get("float32_noise_floor", 0.0)


def test_smollm2_solves_a_simple_ioi_prompt():
    model = hap.load_model("smollm2-135m", device="cpu")
    tokenizer = model.tokenizer
    ids = tokenizer("When Mary and John went to the store, John gave a drink to", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.hf_model(ids).logits[0, -1]
    mary, john = (tokenizer(f" {name}", add_special_tokens=False).input_ids[0] for name in ("Mary", "John"))
    assert logits[mary] > logits[john]

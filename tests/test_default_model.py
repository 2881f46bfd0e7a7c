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


def test_discover_then_evaluate_end_to_end(tmp_path, capsys):
    """The two commands of the attribution issue, on 16 examples."""
    import json

    from hap.cli import main

    out = tmp_path / "ioi-eapig"
    assert main(["discover", "--model", "smollm2-135m", "--task", "ioi", "--method", "eap-ig-inputs",
                 "--edges", "200", "--n-examples", "16", "--n-test", "16", "--out", str(out), "--no-report"]) == 0
    summary = capsys.readouterr().out
    assert "edges kept" in summary and "faithfulness" in summary and "test (held out)" in summary
    document = json.loads((out / "circuit.json").read_text())
    assert document["format"] == "hap-circuit/4" and document["splits"]["test"]["split"] == "test"
    assert document["model"] == "smollm2-135m" and document["graph"]["n_edges"] == 70651
    assert 0 < document["graph"]["n_edges_in_graph"] <= 200
    # discover explained the circuit on the real model: importance, evidence and roles of its heads
    assert "core          " in summary and document["node_evidence"]["positions"] == ["IO", "S1", "S1+1", "S2", "END"]
    assert document["node_importance"]["n_examples"] == 16 and document["node_evidence"]["has_roles"]
    assert main(["evaluate", str(out / "circuit.json"), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["split"] == document["splits"]["test"] and line["n_examples"] == 16
    assert line["kl"] == document["metrics"]["test"]["kl"]  # the same examples: the number discover printed
    assert line["full_model"]["logit_diff"] > 1.0  # SmolLM2 solves IOI, on held-out templates and names too
    assert line["empty_circuit"]["logit_diff"] < line["full_model"]["logit_diff"]


def test_hap_demo_pipeline_on_a_small_budget(tmp_path, capsys):
    """make demo's command with a few steps: every file of a run directory appears."""
    from hap.cli import main

    out = tmp_path / "demo"
    assert main(["discover", "--model", "smollm2-135m", "--task", "ioi", "--method", "hap", "--sparsity", "0.95",
                 "--n-examples", "8", "--n-test", "8", "--monitor-examples", "8", "--batch-size", "8",
                 "--steps", "4", "--ig-steps", "2", "--out", str(out)]) == 0
    names = {path.name for path in out.iterdir()}
    assert {"circuit.json", "train_log.jsonl", "run.json", "report.html", "circuit.svg"} <= names
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4
    assert "hap" in capsys.readouterr().out


def test_smollm2_prompts_get_no_bos_by_default_and_the_model_does_ioi():
    """SmolLM2's tokenizer prepends nothing, so its prompts (and the demo's circuit) are as before; --bos
    gives its BOS token; verify's line finds the full model doing IOI."""
    from hap.tasks import default_prefix, ioi_task
    from hap.verify import describe_task_check, full_model_task

    model = hap.load_model("smollm2-135m", device="cpu")
    tokenizer = model.tokenizer
    assert default_prefix(tokenizer) == []
    task = ioi_task(tokenizer, 16, seed=1)
    assert not task.bos
    for row, n, text in zip(task.clean_ids.tolist(), task.lengths.tolist(), task.clean_prompts):
        assert row[:n] == tokenizer(text).input_ids == tokenizer(text, add_special_tokens=False).input_ids
    forced = ioi_task(tokenizer, 16, seed=1, bos=True)
    assert forced.bos and forced.clean_ids[:, 0].eq(tokenizer.bos_token_id).all()
    assert torch.equal(forced.lengths, task.lengths + 1)
    result = full_model_task(model)
    assert result["bos"] is False and not result["weak"] and result["accuracy"] > 0.8, result
    assert "WEAK" not in describe_task_check(result)

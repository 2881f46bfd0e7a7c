"""benchmarks/scale.py: its published configs give the documented graphs and parameter counts, and a shrunken
model goes through every method, the table and the plot in this process (a few seconds)."""

import importlib
from pathlib import Path

import pytest
from transformers import AutoConfig

import hap

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# Llama-3.2-1B's shape, cut to one layer of 4 heads in 2 key/value groups: 6 sources, 10 readers, 19 edges
SHRUNKEN = ("llama-3.2-1b:num_hidden_layers=1,hidden_size=256,intermediate_size=512,num_attention_heads=4,"
            "num_key_value_heads=2,head_dim=64,vocab_size=512")


@pytest.fixture
def scale(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its siblings, as when it runs
    return importlib.import_module("scale")


def test_published_configs_give_the_documented_graphs(scale):
    from step_memory import random_model

    # edges: docs/concepts/graph.md; parameters: 0.49B, 1.24B and 8.03B as published
    expected = {"qwen2.5-0.5b": (79_813, 494_032_768), "llama-3.2-1b": (195_865, 1_235_814_400),
                "llama-3.1-8b": (805_681, 8_030_261_248)}
    for name, (edges, parameters) in expected.items():
        model = random_model(AutoConfig.for_model(**scale.CHECKPOINTS[name]), name, "meta")  # shapes, no memory
        assert hap.Graph.from_model(model).n_edges == edges
        assert sum(parameter.numel() for parameter in model.hf_model.parameters()) == parameters


def test_a_shrunken_model_goes_through_every_method(scale, tmp_path):
    job = {"model": SHRUNKEN, "device": "cpu", "dtype": "float32", "batch_size": 2, "steps": 1,
           "scores": str(tmp_path / "scores.pt")}
    scale.child({**job, "method": "scores"})
    plain, ep, hap_row = (scale.child({**job, "method": method}) for method in scale.METHODS)
    assert [row["edges"] for row in (plain, ep, hap_row)] == [19, 19, 19]
    assert ep["live"] == 19 and 1 <= hap_row["live"] < 19  # HAP trains its candidates only
    assert all(row["seconds_per_step"] > 0 for row in (plain, ep, hap_row))
    assert ep["formula_gib"] > 0 and ep["formed"] <= ep["readers"]
    assert "| hap |" in scale.table([plain, ep, hap_row])
    scale.plot([plain, ep, hap_row], "test", tmp_path / "scale-cpu")
    assert (tmp_path / "scale-cpu.png").is_file() and (tmp_path / "scale-cpu.svg").is_file()


def test_overrides_are_config_fields(scale):
    assert scale.parse_model("qwen2.5-0.5b:num_hidden_layers=2,vocab_size=512")["num_hidden_layers"] == 2
    with pytest.raises(SystemExit, match="unknown model"):
        scale.parse_model("gpt-5")

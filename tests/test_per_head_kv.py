"""Per-head key/value scores (MIB's ungrouped graph) under grouped-query attention."""

from __future__ import annotations

import json

import pytest
import torch
from naive import naive_masked_logits

import hap
from hap.attribution import AttributionConfig, attribute
from hap.batches import TaskBatches
from hap.cli import main
from hap.graph import Graph
from hap.report.export import load_mib, to_mib
from hap.tasks import load_task


@pytest.fixture(scope="module")
def gqa_model() -> hap.Model:
    model = hap.load_model("tiny-llama", device="cpu", dtype="float64")
    assert model.layout.heads_per_group > 1
    return model


def _kv_readers(graph: Graph, layer: int, port: int) -> list[int]:
    layout_names = [f"a{layer}.g{g}<{'kv'[port]}>" for g in range(100)]
    return [graph.reader_names.index(name) for name in layout_names if name in graph.reader_names]


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs"])
def test_per_head_scores_sum_to_the_group_score_and_leave_the_rest_unchanged(gqa_model, method):
    task = load_task("ioi", gqa_model.tokenizer, 6, seed=3)
    grouped = attribute(gqa_model, task, config=AttributionConfig(method=method, batch_size=3))
    split = attribute(gqa_model, task, config=AttributionConfig(method=method, batch_size=3, per_head_kv=True))
    assert grouped.kv_per_head is None and split.kv_per_head is not None
    assert torch.allclose(split.values, grouped.values, atol=1e-6)
    graph = Graph.from_model(gqa_model)
    layout = gqa_model.layout
    for layer in range(layout.n_layers):
        for port in (0, 1):
            for group, reader in enumerate(_kv_readers(graph, layer, port)):
                heads = slice(group * layout.heads_per_group, (group + 1) * layout.heads_per_group)
                summed = split.kv_per_head[:, layer, heads, port].sum(-1)
                assert torch.allclose(summed, grouped.values[:, reader], atol=1e-6)
    spread = split.kv_per_head[:, :, 0::2] - split.kv_per_head[:, :, 1::2]
    assert float(spread.abs().max()) > 1e-4  # the heads of a group really get different scores


def test_per_head_eap_scores_equal_one_head_at_a_time_gradients(gqa_model):
    model = gqa_model
    graph = Graph.from_model(model)
    task = load_task("ioi", model.tokenizer, 4, seed=4)
    batch = next(iter(TaskBatches(model, graph, task, 4, "interchange")))
    scores = attribute(model, task, config=AttributionConfig(method="eap", batch_size=4, per_head_kv=True))
    layout = model.layout
    kv_mask = torch.ones(graph.n_sources, layout.n_layers, layout.n_heads, 2, dtype=torch.float64,
                         requires_grad=True)
    ones = torch.ones(graph.real.shape, dtype=torch.float64)
    logits = naive_masked_logits(model, graph, batch.clean, batch.reference.outputs, ones, kv_mask)
    rows = torch.arange(len(task))
    task.logit_diff(logits[rows, batch.positions]).mean().backward()
    expected = -kv_mask.grad  # score = (z~ - z) . dL/d(input) = -dL/dm at m = 1
    real = torch.stack([torch.stack([graph.real[:, graph.readers_of_block(2 * layer + 1).start + layout.n_heads]
                                     for _ in range(layout.n_heads)], -1) for layer in range(layout.n_layers)], 1)
    assert torch.allclose(scores.kv_per_head.double(), expected * real[..., None], atol=1e-6)


def test_export_writes_each_heads_own_score_and_the_cli_flag(gqa_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", "eap", "--per-head-kv", "--edges", "30",
                 "--n-examples", "4", "--n-test", "4", "--out", str(out), "--no-report"]) == 0
    circuit = hap.Circuit.load(out / "circuit.json")
    assert circuit.kv_per_head is not None
    document = to_mib(circuit)
    k_edges = {name: edge["score"] for name, edge in document["edges"].items() if name.endswith("<k>")}
    source, layer = "input", 1
    heads = [k_edges[f"{source}->a{layer}.h{h}<k>"] for h in range(gqa_model.layout.n_heads)]
    assert heads == pytest.approx(circuit.kv_per_head[0, layer, :, 0].tolist())
    assert heads[0] != pytest.approx(heads[1])  # not an even split
    assert main(["export", str(out), "--format", "mib", "--out", str(tmp_path / "mib.json")]) == 0
    back = load_mib(tmp_path / "mib.json")
    assert torch.allclose(back.scores, circuit.scores, atol=1e-5)  # heads sum back to the group
    assert main(["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", "exact", "--per-head-kv", "--edges", "5",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--per-head-kv" in capsys.readouterr().err
    assert json.loads((out / "circuit.json").read_text())["config"]["per_head_kv"] is True


# -- discovery on the per-head graph (--kv-graph per-head) ---------------------------------------------------


@pytest.fixture(scope="module")
def per_head_model(gqa_model) -> hap.Model:
    return hap.load_model("tiny-llama", device="cpu", dtype="float64", per_head_kv_graph=True)


def test_the_per_head_graph_has_mibs_readers_and_edge_count(gqa_model, per_head_model):
    grouped, per_head = Graph.from_model(gqa_model), Graph.from_model(per_head_model)
    layout = gqa_model.layout
    assert per_head_model.layout.kv_ungrouped and per_head_model.layout.n_kv_heads == layout.n_heads
    assert "a1.h3<k>" in per_head.reader_names and "a1.g0<k>" not in per_head.reader_names
    extra_readers = 2 * layout.n_layers * (layout.n_heads - layout.n_kv_heads)
    assert per_head.n_readers == grouped.n_readers + extra_readers
    with pytest.raises(Exception, match="per-head"):
        hap.Circuit(model="tiny-llama", task="t", method="m", layout=per_head_model.layout,
                    scores=torch.zeros(per_head.real.shape), in_graph=per_head.real).check_fits(gqa_model.layout)


@pytest.mark.parametrize("kind", ["interchange", "mean"])
def test_a_per_head_graph_run_equals_each_head_reading_its_own_kv_copy(gqa_model, per_head_model, kind):
    """The fast masked run on the per-head graph against the slow twin on the *grouped* model, where each
    query head reads its own copy of its group's k/v input weighted by its own mask (MIB's semantics)."""
    from hap.ablation import interchange_reference, mean_reference, run_masked
    from hap.verify import verify_prompts

    grouped, per_head = Graph.from_model(gqa_model), Graph.from_model(per_head_model)
    clean, corrupted = verify_prompts(gqa_model)
    reference = (interchange_reference(per_head_model, corrupted) if kind == "interchange"
                 else mean_reference(per_head_model, per_head, corrupted))
    generator = torch.Generator().manual_seed(5)
    mask = torch.rand(per_head.real.shape, generator=generator, dtype=torch.float64) * per_head.real
    layout = gqa_model.layout
    grouped_mask = torch.zeros(grouped.real.shape, dtype=torch.float64)
    kv_mask = torch.zeros(grouped.n_sources, layout.n_layers, layout.n_heads, 2, dtype=torch.float64)
    for r, name in enumerate(per_head.reader_names):
        if name.endswith(("<k>", "<v>")):
            layer, head = (int(part[1:]) for part in name[:-3].split("."))
            kv_mask[:, layer, head, int(name.endswith("<v>"))] = mask[:, r]
        else:
            grouped_mask[:, grouped.reader_index(name)] = mask[:, r]
    with torch.no_grad():
        fast = run_masked(per_head_model, per_head, clean, reference, mask)
        slow = naive_masked_logits(gqa_model, grouped, clean, reference.outputs, grouped_mask, kv_mask)
    assert torch.allclose(fast, slow, atol=1e-9)


def test_per_head_graph_scores_equal_the_per_head_kv_scores(gqa_model, per_head_model):
    task = load_task("ioi", gqa_model.tokenizer, 6, seed=3)
    split = attribute(gqa_model, task, config=AttributionConfig(method="eap", batch_size=3, per_head_kv=True))
    per_head = attribute(per_head_model, task, config=AttributionConfig(method="eap", batch_size=3))
    grouped, graph = Graph.from_model(gqa_model), Graph.from_model(per_head_model)
    for r, name in enumerate(graph.reader_names):
        if name.endswith(("<k>", "<v>")):
            layer, head = (int(part[1:]) for part in name[:-3].split("."))
            expected = split.kv_per_head[:, layer, head, int(name.endswith("<v>"))]
        else:
            expected = split.values[:, grouped.reader_index(name)]
        assert torch.allclose(per_head.values[:, r], expected, atol=1e-6), name


def test_discover_on_the_per_head_graph_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", "hap", "--kv-graph", "per-head", "--edges", "40",
                 "--steps", "20", "--n-examples", "8", "--n-test", "8", "--out", str(out), "--no-report"]) == 0
    document = json.loads((out / "circuit.json").read_text())
    assert document["graph"]["kv_ungrouped"] is True
    kept = [name for name, edge in document["edges"].items() if edge["in_graph"]]
    assert 0 < len(kept) <= 40 and all(".g" not in name for name in document["edges"])
    printed = document["metrics"]["test"]["kl"]
    capsys.readouterr()
    assert main(["evaluate", str(out), "--allow-weak-model", "--json"]) == 0  # reloads the model on the per-head graph by itself
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kl"] == pytest.approx(printed, rel=1e-4)
    assert main(["export", str(out), "--format", "mib", "--out", str(tmp_path / "mib.json")]) == 0
    mib = json.loads((tmp_path / "mib.json").read_text())
    assert set(mib["edges"]) == set(document["edges"])  # one MIB edge per edge: nothing split
    assert main(["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", "eap", "--kv-graph", "per-head", "--per-head-kv",
                 "--edges", "5", "--out", str(tmp_path / "bad")]) == 2
    assert "drop --per-head-kv" in capsys.readouterr().err and not (tmp_path / "bad").exists()

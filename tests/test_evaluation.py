"""Evaluation metrics, the MIB curve areas, circuit selection and circuit files."""

import json

import pytest
import torch

import hap
from hap.attribution import attribute
from hap.circuit import FORMAT, Circuit, CircuitFileError, Scores, prune_dangling, top_edges
from hap.evaluation import MIB_FRACTIONS, cpr_cmd, evaluate, faithfulness_curve, trapezoid
from hap.tasks import load_task


@pytest.fixture(scope="module")
def ioi_tiny(tiny_llama):
    return load_task("ioi", tiny_llama.tokenizer, 12, seed=0)


def test_all_edges_are_the_full_model_and_none_the_empty_circuit(tiny_llama, ioi_tiny):
    graph = hap.Graph.from_model(tiny_llama)
    everything = evaluate(tiny_llama, graph.real, ioi_tiny, batch_size=5)
    assert everything.faithfulness == pytest.approx(1.0, abs=1e-4)
    assert everything.kl == pytest.approx(0.0, abs=1e-6)
    assert everything.logit_diff == pytest.approx(everything.full_model["logit_diff"], abs=1e-5)
    nothing = evaluate(tiny_llama, torch.zeros_like(graph.real), ioi_tiny, batch_size=5)
    assert nothing.faithfulness == pytest.approx(0.0, abs=1e-6)
    assert nothing.kl == pytest.approx(nothing.empty_circuit["kl"])
    assert nothing.kl > 1e-4  # the empty circuit really differs from the full model


def test_circuit_and_mask_evaluate_alike(tiny_llama, ioi_tiny):
    scores = attribute(tiny_llama, ioi_tiny, "eap")
    circuit = scores.top(25)
    from_circuit = evaluate(tiny_llama, circuit, ioi_tiny)
    from_mask = evaluate(tiny_llama, circuit.in_graph, ioi_tiny)
    assert from_circuit == from_mask
    assert from_circuit.n_edges == circuit.n_edges <= 25


def test_trapezoid_and_mib_areas_on_hand_made_curves():
    assert trapezoid([0.0, 0.5, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    fractions = list(MIB_FRACTIONS)
    perfect = [1.0] * len(fractions)
    cpr, cmd = cpr_cmd(fractions, perfect, perfect)
    assert cpr == pytest.approx(1.0 - 0.001) and cmd == pytest.approx(0.0)
    ramp = fractions  # f(k) = k
    cpr, cmd = cpr_cmd(fractions, ramp, ramp)
    exact_area = (1.0 - 0.001**2) / 2
    assert cpr == pytest.approx(exact_area) and cmd == pytest.approx((1.0 - 0.001) - exact_area)
    overshoot = [2.0] * len(fractions)  # |1 - f| counts overshooting as a miss too
    assert cpr_cmd(fractions, overshoot, overshoot)[1] == pytest.approx(1.0 - 0.001)


def test_curve_ends_at_the_full_model(tiny_gpt2):
    task = load_task("ioi", tiny_gpt2.tokenizer, 8)
    curve = faithfulness_curve(tiny_gpt2, attribute(tiny_gpt2, task, "eap"), task)
    assert curve.fractions == list(MIB_FRACTIONS)
    assert curve.faithfulness_signed[-1] == pytest.approx(1.0, abs=1e-4)
    assert curve.faithfulness_abs[-1] == pytest.approx(1.0, abs=1e-4)
    assert curve.cpr == pytest.approx(trapezoid(curve.fractions, curve.faithfulness_signed))


def test_top_edges_and_dangling_pruning(tiny_llama):
    graph = hap.Graph.from_model(tiny_llama)
    scores = torch.zeros(graph.real.shape)
    path = ["input->a0.h1<q>", "a0.h1->a2.g1<v>", "a2.h2->logits"]  # a2.h2 reads group 1's v
    # m1 is never fed (no path from input); m0 feeds nothing kept (no path to logits).
    dangling = ["m1->a2.h0<q>", "input->m0"]
    for rank, name in enumerate(path + dangling):
        scores[graph.edge_index(name)] = 10.0 - rank
    scores[graph.edge_index("a1.h0->m1")] = -0.5  # a tiny edge, not in the top 5
    chosen = top_edges(graph, scores, 5)
    assert int(chosen.sum()) == 5
    kept = prune_dangling(graph, chosen)
    names = {name for name in path + dangling if kept[graph.edge_index(name)]}
    assert names == set(path)


def test_circuit_file_round_trip_and_refusals(tiny_llama, ioi_tiny, tmp_path):
    scores = attribute(tiny_llama, ioi_tiny, "eap")
    circuit = scores.top(30)
    path = circuit.save(tmp_path / "run" / "circuit.json")
    document = json.loads(path.read_text())
    assert document["format"] == FORMAT
    assert set(document) >= {"model", "task", "method", "config", "graph", "edges", "nodes", "metrics", "runtime_s"}
    assert document["graph"]["n_edges"] == len(document["edges"]) == hap.Graph.from_model(tiny_llama).n_edges
    assert sum(edge["in_graph"] for edge in document["edges"].values()) == circuit.n_edges
    assert "logits" in document["nodes"] and "a0.h0" in document["nodes"]
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    again = Circuit.load(tmp_path / "run", model="tiny-llama")
    assert torch.equal(again.in_graph, circuit.in_graph) and torch.allclose(again.scores, circuit.scores)
    with pytest.raises(CircuitFileError, match="not 'tiny-gpt2'"):
        Circuit.load(path, model="tiny-gpt2")
    document["format"] = "hap-circuit/0"
    (tmp_path / "old.json").write_text(json.dumps(document))
    with pytest.raises(CircuitFileError, match="hap-circuit/0"):
        Circuit.load(tmp_path / "old.json")


def test_a_saved_circuit_gives_back_every_float32_score_exactly(tiny_gpt2, tmp_path):
    graph = hap.Graph.from_model(tiny_gpt2)
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(graph.real.shape, generator=generator) * 10.0 ** torch.randint(-30, 30, graph.real.shape,
                                                                                          generator=generator)
    values = values.float() * graph.real
    circuit = Scores("tiny-gpt2", "ioi", "eap", tiny_gpt2.layout, values).top(10)
    again = Circuit.load(circuit.save(tmp_path / "circuit.json"))
    assert torch.equal(again.scores, circuit.scores.float())


def test_scores_select_by_sparsity(tiny_gpt2):
    graph = hap.Graph.from_model(tiny_gpt2)
    values = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(0)) * graph.real
    scores = Scores("tiny-gpt2", "ioi", "eap", tiny_gpt2.layout, values)
    circuit = scores.at_sparsity(0.9)
    assert circuit.config["n_edges_requested"] == round(0.1 * graph.n_edges)
    assert circuit.n_edges + circuit.config["n_pruned_dangling"] == circuit.config["n_edges_requested"]

"""Node importance: the batched table equals removing each node's edges by hand, one evaluation at a time."""

from __future__ import annotations

import json

import pytest
import torch

from hap.attribution import attribute
from hap.circuit import FORMAT, Circuit
from hap.cli import main
from hap.evaluation import evaluate
from hap.graph import Graph
from hap.importance import ImportanceTable, node_importance
from hap.models.loading import load_model
from hap.tasks import ioi_task


def _circuit(model, n_edges: int = 40) -> Circuit:
    task = ioi_task(model.tokenizer, 8, seed=0)
    scores = attribute(model, task, method="eap")
    return scores.circuit(n_edges)


def _by_hand(graph: Graph, kept: torch.Tensor, name: str) -> torch.Tensor:
    """The node's kept edges, found by name: out of it, and into its own readers (under grouped-query
    attention a head's key and value inputs are its group's, shared, so only its query input is its own)."""
    if name.startswith("m"):
        own = {name}
    elif graph.layout.n_kv_heads < graph.layout.n_heads:
        own = {f"{name}<q>"}
    else:
        own = {f"{name}<q>", f"{name}<k>", f"{name}<v>"}
    edges = torch.zeros_like(kept)
    edges[graph.source_index(name)] = True
    for reader in own:
        edges[:, graph.reader_index(reader)] = True
    return kept & edges


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_the_table_equals_one_node_at_a_time(name):
    model = load_model(name, device="cpu", dtype="float64")
    circuit = _circuit(model)
    test = ioi_task(model.tokenizer, 12, seed=5)
    table = node_importance(model, circuit, test, batch_size=5, copies_per_forward=10)  # 2 nodes a forward
    graph = Graph.from_model(model)
    kept = circuit.in_graph & graph.real
    whole = evaluate(model, circuit, test, batch_size=4)
    assert table.faithfulness == pytest.approx(whole.faithfulness, abs=1e-9)
    assert table.kl == pytest.approx(whole.kl, abs=1e-9)
    expected = {graph.source_names[s] for s in range(1, graph.n_sources) if kept[s].any()}
    assert {node.name for node in table.nodes} == expected and len(expected) > 3
    for node in table.nodes:
        edges = _by_hand(graph, kept, node.name)
        assert node.n_edges == int(edges.sum())
        without = evaluate(model, kept & ~edges, test, batch_size=4)
        assert node.faithfulness_drop == pytest.approx(whole.faithfulness - without.faithfulness, abs=1e-9)
        assert node.kl_increase == pytest.approx(without.kl - whole.kl, abs=1e-9)
        assert node.attribution == pytest.approx(float(circuit.scores[graph.source_index(node.name)].sum()))
    assert [node.rank for node in table.nodes] == list(range(1, len(table.nodes) + 1))
    drops = [node.faithfulness_drop for node in table.nodes]
    assert drops == sorted(drops, reverse=True)
    assert any(abs(d) > 1e-6 for d in drops)  # the numbers say something


def test_the_table_is_stored_per_node_and_read_back(tiny_gpt2, tmp_path):
    circuit = _circuit(tiny_gpt2)
    table = node_importance(tiny_gpt2, circuit, ioi_task(tiny_gpt2.tokenizer, 8, seed=5), batch_size=4)
    circuit.importance = table.to_dict()
    document = circuit.to_dict()
    assert document["format"] == FORMAT == "hap-circuit/4"
    first = table.nodes[0]
    assert document["nodes"][first.name]["importance"]["faithfulness_drop"] == first.faithfulness_drop
    assert document["node_importance"]["n_examples"] == 8
    circuit.save(tmp_path / "circuit.json")
    loaded = Circuit.load(tmp_path / "circuit.json")
    assert ImportanceTable.from_dict(loaded.importance) == table
    older = {**document, "format": "hap-circuit/2"}  # a file from before node importance
    older.pop("node_importance")
    assert Circuit.from_dict(older).importance is None
    assert Circuit.from_dict(older).splits == circuit.splits


def test_hap_explain_prints_and_stores_the_table(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["discover", "--model", "tiny-gpt2", "--allow-weak-model", "--method", "eap", "--edges", "30",
                 "--n-examples", "8", "--n-test", "12", "--no-report", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["explain", str(run), "--allow-weak-model"]) == 0
    out = capsys.readouterr().out
    assert "faithfulness lost" in out and "held-out test examples" in out and "attribution" in out
    stored = json.loads((run / "circuit.json").read_text())
    assert stored["node_importance"]["split"] == "test" and stored["node_importance"]["n_examples"] == 12
    ranked = sorted((node["importance"]["rank"], name) for name, node in stored["nodes"].items()
                    if "importance" in node)
    assert ranked and ranked[0][0] == 1
    assert main(["explain", str(run), "--json", "--no-write", "--n-examples", "6", "--allow-weak-model"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["n_examples"] == 6 and len(line["nodes"]) == len(ranked)  # the same nodes, on 6 examples
    first = line["nodes"][0]
    assert {"faithfulness_drop", "kl_increase", "n_edges", "attribution", "rank"} <= set(first["importance"])
    assert {"direct_effect", "attention", "readers"} <= set(first["evidence"])
    assert first["role"] in {"unlabelled", None} or first["role"] in {rule["role"] for rule in line["rules"]}
    evidence = stored["nodes"][ranked[0][1]]["evidence"]
    assert stored["node_evidence"]["positions"] == ["IO", "S1", "S1+1", "S2", "END"]
    assert "direct_effect" in evidence and stored["node_evidence"]["has_roles"]
    assert json.loads((run / "circuit.json").read_text())["node_importance"]["n_examples"] == 12  # not written
    assert main(["explain", str(run), "--split", "train", "--allow-weak-model", "--no-write"]) == 0
    assert "in-sample" in capsys.readouterr().out


def test_discover_explains_its_circuit_by_default_and_names_its_core(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["discover", "--model", "tiny-gpt2", "--allow-weak-model", "--method", "eap", "--edges", "30",
                 "--n-examples", "8", "--n-test", "12", "--no-report", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    stored = json.loads((run / "circuit.json").read_text())
    assert stored["node_importance"]["n_examples"] == 12 and stored["node_evidence"]["n_examples"] == 12
    assert "explain" in stored["runtime_s"]
    top = min(stored["nodes"].items(), key=lambda item: item[1].get("importance", {}).get("rank", 10**9))[0]
    assert f"core          {top}" in out and "roles" in out
    bare = tmp_path / "bare"
    assert main(["discover", "--model", "tiny-gpt2", "--allow-weak-model", "--method", "eap", "--edges", "30",
                 "--n-examples", "8", "--n-test", "12", "--no-report", "--explain-examples", "0",
                 "--out", str(bare)]) == 0
    assert "core " not in capsys.readouterr().out
    assert "node_importance" not in json.loads((bare / "circuit.json").read_text())
    assert main(["discover", "--model", "tiny-gpt2", "--method", "eap", "--edges", "30", "--explain-examples", "-1",
                 "--out", str(tmp_path / "no")]) == 2
    assert "--explain-examples must be 0" in capsys.readouterr().err

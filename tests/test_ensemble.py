"""Parallel ensembles: rank normalisation, the combination rules, refusals, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from hap.circuit import Circuit
from hap.cli import main
from hap.ensemble import ensemble_scores, normalised_ranks
from hap.errors import HapError
from hap.graph import Graph
from hap.models.loading import load_model


def _circuit(model, values: torch.Tensor, task: str = "ioi", name: str = "tiny-gpt2") -> Circuit:
    graph = Graph.from_model(model)
    return Circuit(name, task, "eap", model.layout, values * graph.real, torch.zeros_like(graph.real))


def test_ranks_are_scale_free_and_ties_share_their_mean_rank(tiny_gpt2):
    graph = Graph.from_model(tiny_gpt2)
    scores = torch.randn(graph.real.shape, generator=torch.Generator().manual_seed(0)) * graph.real
    ranks = normalised_ranks(graph, scores)
    assert torch.equal(ranks, normalised_ranks(graph, scores * 1000))  # scale does not matter
    assert torch.equal(ranks, normalised_ranks(graph, -scores))  # nor sign: |score| is ranked
    real = ranks[graph.real]
    assert float(real.min()) == 0.0 and float(real.max()) == 1.0
    assert bool((ranks[~graph.real] == 0).all())
    tied = scores.clone()
    first, second = graph.real.nonzero()[:2].tolist()
    tied[tuple(first)] = tied[tuple(second)] = 5.0  # the two largest, tied
    tied_ranks = normalised_ranks(graph, tied)
    assert float(tied_ranks[tuple(first)]) == float(tied_ranks[tuple(second)]) < 1.0


def _slow_ranks(primary: list[float], secondary: list[float]) -> list[float]:
    """The twin of ``lexicographic_ranks``: sort the (primary, secondary) pairs, average the positions of
    equal pairs, scale to [0, 1]."""
    order = sorted(range(len(primary)), key=lambda i: (primary[i], secondary[i]))
    positions: dict[tuple[float, float], list[int]] = {}
    for position, i in enumerate(order):
        positions.setdefault((primary[i], secondary[i]), []).append(position)
    return [sum(positions[(p, q)]) / len(positions[(p, q)]) / (len(primary) - 1) for p, q in zip(primary, secondary)]


@pytest.mark.parametrize("levels", [0, 3])  # 0: continuous scores; 3: few score levels, so many ties
def test_mean_min_max_of_two_runs_order_edges_as_the_slow_twin(tiny_gpt2, levels):
    graph = Graph.from_model(tiny_gpt2)
    a = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(1))
    b = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(2))
    if levels:
        a, b = (a * levels).floor() + 1, (b * levels).floor() + 1
    ra, rb = normalised_ranks(graph, a)[graph.real].double(), normalised_ranks(graph, b)[graph.real].double()
    runs = [_circuit(tiny_gpt2, a), _circuit(tiny_gpt2, b * 1e-6)]  # another scale: same ranks
    mean = ((ra + rb) / 2).tolist()
    for how, primary in (("mean", mean), ("min", torch.minimum(ra, rb).tolist()),
                         ("max", torch.maximum(ra, rb).tolist())):
        values = ensemble_scores(runs, how).values
        assert bool((values[~graph.real] == 0).all())
        slow = torch.tensor(_slow_ranks(primary, mean), dtype=torch.float64)
        assert torch.allclose(values[graph.real].double(), slow, atol=1e-6)
    chosen = ensemble_scores(runs, "min").circuit(10, prune=False)
    assert chosen.n_edges == 10 and chosen.method == "ensemble"


def test_max_breaks_a_runs_tie_by_the_other_runs_ranks(tiny_gpt2):
    """A pruning run keeps 20 edges alike (one tied top score). The max ensemble takes the attribution
    run's edges ranked above that tie first, then, of the 20, the 10 the attribution run ranks highest,
    not the first 10 by index."""
    graph = Graph.from_model(tiny_gpt2)
    real = graph.real.nonzero()
    tied = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(3))[:20]]
    pruning = torch.full(graph.real.shape, 0.5)
    pruning[tied[:, 0], tied[:, 1]] = 1.0
    attribution = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(4))
    # Mid-ranked for the attribution run, in the reverse of their index order.
    attribution[tied[:, 0], tied[:, 1]] = torch.linspace(0.6, 0.4, 20)
    tie_rank = float(normalised_ranks(graph, pruning)[tuple(tied[0])])
    above = normalised_ranks(graph, attribution) > tie_rank
    assert 0 < int(above.sum()) < 20 and not bool(above[tied[:, 0], tied[:, 1]].any())
    chosen = ensemble_scores([_circuit(tiny_gpt2, pruning), _circuit(tiny_gpt2, attribution)], "max").circuit(
        int(above.sum()) + 10, prune=False).in_graph
    assert torch.equal(chosen & above, above)
    by_attribution = sorted(map(tuple, tied.tolist()), key=lambda edge: -float(attribution[edge]))
    assert {tuple(edge) for edge in (chosen & ~above).nonzero().tolist()} == set(by_attribution[:10])


def test_runs_of_different_models_or_tasks_are_refused(tiny_gpt2, tiny_llama):
    graph = Graph.from_model(tiny_gpt2)
    values = torch.rand(graph.real.shape)
    with pytest.raises(HapError, match="different tasks"):
        ensemble_scores([_circuit(tiny_gpt2, values), _circuit(tiny_gpt2, values, task="greater-than")])
    other = Circuit("tiny-llama", "ioi", "eap", tiny_llama.layout, torch.zeros(Graph.from_model(tiny_llama).real.shape),
                    torch.zeros_like(Graph.from_model(tiny_llama).real))
    with pytest.raises(HapError, match="different models"):
        ensemble_scores([_circuit(tiny_gpt2, values), other])
    with pytest.raises(HapError, match="at least two"):
        ensemble_scores([_circuit(tiny_gpt2, values)])


def test_cli_ensembles_runs_of_different_methods_and_measures_held_out(tmp_path, capsys):
    common = ["--model", "tiny-gpt2", "--allow-weak-model", "--n-test", "8", "--edges", "30", "--no-report"]
    assert main(["discover", "--method", "eap", "--n-examples", "8", "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["discover", "--method", "eap-ig-inputs", "--n-examples", "12", "--out", str(tmp_path / "b"),
                 *common]) == 0
    capsys.readouterr()
    out = tmp_path / "ens"
    assert main(["ensemble", str(tmp_path / "a"), str(tmp_path / "b"), "--how", "max", "--edges", "20",
                 "--out", str(out), "--no-report"]) == 0
    document = json.loads((out / "circuit.json").read_text())
    assert document["method"] == "ensemble" and document["config"]["how"] == "max"
    assert document["metrics"]["test"]["n_examples"] == 8 and document["metrics"]["train"]["n_examples"] == 8
    assert document["splits"]["train"]["n_examples"] == 8  # the training examples both runs were fitted on
    assert "held out" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--allow-weak-model", "--json"]) == 0  # its circuit re-scores like any other
    assert json.loads(capsys.readouterr().out)["n_edges"] == document["metrics"]["test"]["n_edges"]
    # a run judged on another test split is refused, and nothing is written
    assert main(["discover", "--method", "eap", "--n-examples", "8", "--seed", "3", "--out", str(tmp_path / "c"),
                 *common]) == 0
    capsys.readouterr()
    assert main(["ensemble", str(tmp_path / "a"), str(tmp_path / "c"), "--edges", "20",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "different splits" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_python_api_combines_loaded_runs(tmp_path):
    model = load_model("tiny-gpt2")
    graph = Graph.from_model(model)
    a = _circuit(model, torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(4)))
    b = _circuit(model, torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(5)))
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    from hap.ensemble import load_runs

    scores = ensemble_scores(load_runs([tmp_path / "a.json", tmp_path / "b.json"]), "mean")
    assert torch.equal(scores.values, ensemble_scores([a, b], "mean").values)  # loaded as they were saved
    mean = (normalised_ranks(graph, a.scores) + normalised_ranks(graph, b.scores)) / 2
    first, second = (mean[graph.real] * graph.real.sum()).argsort()[-2:]  # the two edges of largest mean
    assert scores.values[graph.real][second] == 1.0 > scores.values[graph.real][first]


def test_a_split_recorded_before_bos_was_matches_one_without_bos_and_not_one_with_it():
    """Runs from before splits recorded ``bos`` had none first (load_split reads an absent bos as False):
    such a run ensembles with a run recorded ``bos: false`` of the same draw, not with one of ``bos: true``."""
    from hap.ensemble import shared_splits

    def run(bos: object) -> Circuit:
        spec = {"task": "ioi", "n_examples": 8, "seed": 0, "split": "train"}
        test = {"task": "ioi", "n_examples": 8, "seed": 1, "split": "test"}
        if bos != "absent":
            spec, test = {**spec, "bos": bos}, {**test, "bos": bos}
        circuit = Circuit("tiny-gpt2", "ioi", "eap", load_model("tiny-gpt2").layout, torch.zeros(1), torch.zeros(1))
        circuit.splits = {"train": spec, "test": test}
        return circuit

    assert shared_splits([run("absent"), run(False)])["test"]["seed"] == 1
    with pytest.raises(HapError, match="different splits"):
        shared_splits([run("absent"), run(True)])

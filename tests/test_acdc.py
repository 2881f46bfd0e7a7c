"""ACDC: the batched, speculative sweep equals a plain one-edge-at-a-time loop; resume; the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from hap.ablation import run_masked
from hap.acdc import AcdcConfig, AcdcState, acdc, acdc_circuit, sweep_order
from hap.batches import TaskBatches, divergence
from hap.cli import main
from hap.errors import HapError
from hap.graph import Graph
from hap.tasks import load_task


def plain_acdc(model, graph, batches, threshold, metric):
    """The slow twin: one masked forward per test over every batch, in ACDC's order."""
    def value(kept):
        total, n = 0.0, 0
        for batch in batches:
            with torch.no_grad():
                logits = run_masked(model, graph, batch.clean, batch.reference, kept.to(model.dtype),
                                    positions=batch.positions)
            if metric == "kl":
                per = divergence(batch.clean_logits, logits)
            else:
                per = batch.task.logit_diff(batch.clean_logits) - batch.task.logit_diff(logits)
            total += float(per.double().sum())
            n += len(batch.clean)
        return total / n

    kept = graph.real.clone()
    current = value(kept)
    for source, reader in sweep_order(graph):
        kept[source, reader] = False
        trial = value(kept)
        if trial - current < threshold:
            current = trial
        else:
            kept[source, reader] = True
    return kept


# Thresholds that keep some edges and remove others on the random tiny model (its effects are small).
THRESHOLDS = {"interchange": 1e-6, "mean": 1e-4, "zero": 1e-3}


@pytest.fixture(scope="module", params=["interchange", "mean", "zero"])
def plain_sweep(request, tiny_gpt2_64):
    """(ablation, task, batches, the plain loop's circuit): the slow twin runs once per ablation."""
    model = tiny_gpt2_64
    graph = Graph.from_model(model)
    task = load_task("ioi", model.tokenizer, 6, seed=2)
    batches = list(TaskBatches(model, graph, task, 3, request.param))
    return request.param, task, batches, plain_acdc(model, graph, batches, THRESHOLDS[request.param], "kl")


@pytest.mark.parametrize("k", [1, 3, 16])
def test_batched_sweep_equals_the_one_at_a_time_loop(tiny_gpt2_64, plain_sweep, k):
    model = tiny_gpt2_64
    graph = Graph.from_model(model)
    ablation, task, batches, expected = plain_sweep
    threshold = THRESHOLDS[ablation]
    state = acdc(model, task, AcdcConfig(threshold=threshold, ablation=ablation, tests_per_forward=k), batches)
    assert torch.equal(state.kept, expected)
    assert 0 < int(expected.sum()) < graph.n_edges  # the threshold removes some edges and keeps others
    kept_scores = state.scores[state.kept & graph.real]
    assert bool((kept_scores >= threshold).all())  # a kept edge's removal cost at least tau
    if ablation != "interchange":  # here most readers end up feeding nothing: decided without a forward
        assert state.untested > graph.n_edges // 2
        assert state.forwards <= (graph.n_edges - state.untested) + 1  # at most one per tested edge, + baseline
        assert bool((state.scores[~state.kept & graph.real] < threshold).all())


def test_a_reader_feeds_nothing_only_when_every_source_it_moves_is_cut_off():
    from hap.acdc import reaches_nothing
    from hap.models.adapter import Layout

    for normed_together in (False, True):
        layout = Layout("x", n_layers=2, n_heads=2, n_kv_heads=1, d_model=8, head_dim=4, vocab_size=10,
                        heads_normed_together=normed_together)
        graph = Graph.from_layout(layout)
        feeds = graph.feeds()
        kept = graph.real.clone()
        kept[graph.source_index("a0.h0")] = False  # head 0 of layer 0 lost every out-edge, head 1 has its own
        q0, k0 = graph.reader_index("a0.h0<q>"), graph.reader_index("a0.g0<k>")
        # Layer-mates normed together: head 0's input still moves head 1's output.
        assert reaches_nothing(graph, feeds, kept, q0) is (not normed_together)
        assert not reaches_nothing(graph, feeds, kept, k0)  # the group's key input also feeds head 1
        kept[graph.source_index("a0.h1")] = False
        assert reaches_nothing(graph, feeds, kept, q0) and reaches_nothing(graph, feeds, kept, k0)
        assert not reaches_nothing(graph, feeds, kept, graph.n_readers - 1)  # the logits are the output


def test_logit_difference_metric_equals_its_loop(tiny_gpt2_64):
    model = tiny_gpt2_64
    graph = Graph.from_model(model)
    task = load_task("ioi", model.tokenizer, 4, seed=5)
    batches = list(TaskBatches(model, graph, task, 4, "interchange"))
    expected = plain_acdc(model, graph, batches, 1e-3, "logit-diff")
    assert 0 < int(expected.sum()) < graph.n_edges
    state = acdc(model, task, AcdcConfig(threshold=1e-3, metric="logit-diff", tests_per_forward=5), batches)
    assert torch.equal(state.kept, expected)


class Interrupting(list):
    """Batches that raise KeyboardInterrupt (as Ctrl-C would) on the ``after``-th pass over them."""

    def __init__(self, items, after: int) -> None:
        super().__init__(items)
        self.left = after

    def __iter__(self):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().__iter__()


def test_an_interrupted_sweep_resumes_to_the_same_circuit(tiny_gpt2_64, tmp_path):
    model = tiny_gpt2_64
    graph = Graph.from_model(model)
    task = load_task("ioi", model.tokenizer, 4, seed=1)
    batches = list(TaskBatches(model, graph, task, 4, "interchange"))
    config = AcdcConfig(threshold=1e-6, tests_per_forward=2)
    whole = acdc(model, task, config, batches)
    with pytest.raises(KeyboardInterrupt):
        acdc(model, task, config, Interrupting(batches, after=25), run_dir=tmp_path)
    saved = AcdcState.load(tmp_path / "acdc_state.pt", config, graph)
    assert 0 < saved.position < len(sweep_order(graph))
    resumed = acdc(model, task, config, batches, run_dir=tmp_path, resume=True)
    assert torch.equal(resumed.kept, whole.kept) and torch.allclose(resumed.scores, whole.scores)
    with pytest.raises(HapError, match="other settings"):
        acdc(model, task, AcdcConfig(threshold=0.5, tests_per_forward=2), batches, run_dir=tmp_path, resume=True)


def test_circuit_of_a_given_size_keeps_the_costliest_edges(tiny_gpt2_64):
    model = tiny_gpt2_64
    graph = Graph.from_model(model)
    task = load_task("ioi", model.tokenizer, 4, seed=1)
    config = AcdcConfig(threshold=1e-4, ablation="zero", tests_per_forward=8)
    state = acdc(model, task, config, list(TaskBatches(model, graph, task, 4, "zero")))
    n = int(state.kept.sum())
    assert n > 6
    circuit = acdc_circuit(model, task, config, state, n_edges=5)
    kept_scores = state.scores[state.kept]
    assert circuit.n_edges <= 5 and bool((circuit.in_graph <= state.kept).all())
    assert float(circuit.scores[circuit.in_graph].min()) >= float(kept_scores.sort(descending=True).values[4]) - 1e-12


def test_cli_acdc_runs_resumes_and_refuses_a_bad_threshold(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["discover", "--model", "tiny-gpt2", "--method", "acdc", "--threshold", "1e-6", "--n-examples", "4",
            "--n-test", "4", "--out", str(out), "--no-report"]
    assert main(argv) == 0
    document = json.loads((out / "circuit.json").read_text())
    assert document["method"] == "acdc" and document["config"]["threshold"] == 1e-6
    assert (out / "acdc_state.pt").is_file()
    printed = capsys.readouterr()
    assert "edges to test" in printed.out + printed.err
    assert main(["discover", "--resume", str(out)]) == 0  # a finished sweep resumes to the same circuit
    again = json.loads((out / "circuit.json").read_text())
    assert again["edges"] == document["edges"]
    at = argv.index("--threshold") + 1
    assert main([*argv[:at], "-1", *argv[at + 1:], "--force"]) == 2
    assert "--threshold" in capsys.readouterr().err

"""ACDC: the batched, speculative sweep equals a plain one-edge-at-a-time loop; resume; the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hap
from hap.ablation import run_masked
from hap.acdc import (AcdcConfig, AcdcState, Sweep, acdc, acdc_circuit, next_threshold, replayed_prefix,
                      search_threshold, sweep_order)
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
    # one log entry per reader, in sweep order, none twice although the run was cut in the middle of one
    readers = [reader for _, reader in sweep_order(graph)]
    assert [entry["reader"] for entry in resumed.readers] == [graph.reader_names[r] for r in dict.fromkeys(readers)]
    assert [entry["position"] for entry in resumed.readers] == [i + 1 for i in range(len(readers))
                                                                 if i + 1 == len(readers) or readers[i + 1] != readers[i]]
    assert [entry["kept"] for entry in resumed.readers] == [int(whole.kept[:, r].sum()) for r in dict.fromkeys(readers)]
    assert resumed.readers[-1]["seconds"] <= resumed.seconds + 0.01  # kept to 0.01 s
    # the sweep's clock goes on from the saved time: the resumed run's seconds include the first run's
    assert 0 < saved.seconds < resumed.seconds
    assert AcdcState.load(tmp_path / "acdc_state.pt", config, graph).seconds == resumed.seconds
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
    argv = ["discover", "--model", "tiny-gpt2", "--allow-weak-model", "--method", "acdc", "--threshold", "1e-6", "--n-examples", "4",
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


def test_threshold_search_sweeps_equal_fresh_sweeps_at_their_tau(tmp_path):
    """Replayed prefixes and stopped sweeps change what is computed, never a decision: every sweep of the
    search equals a fresh sweep at its tau (a stopped one on the edges it decided), and the stopped sweep
    the search finishes at the end (none ended within the tolerance here) ends as the fresh one."""
    model = hap.load_model("tiny-llama", device="cpu", dtype="float64")
    graph = Graph.from_model(model)
    task = load_task("ioi", model.tokenizer, 8, seed=2)
    batches = list(TaskBatches(model, graph, task, 4, "interchange"))
    order = sweep_order(graph)
    edges = torch.tensor(order).T
    n_edges = 10
    config, state, sweeps = search_threshold(model, task, AcdcConfig(threshold=0.0, tests_per_forward=8), batches,
                                             n_edges, tmp_path, low=1e-9, high=1e-3, tolerance=0.1)
    assert state.position == len(order) and int(state.kept.sum()) >= n_edges
    assert any(sweep.state.replayed > 0 for sweep in sweeps)  # prefixes were replayed ...
    stopped = [sweep for sweep in sweeps if not sweep.finished]
    assert stopped  # ... sweeps with too many edges were stopped, and the last one finishes one of them
    assert sweeps[-1].finished and sweeps[-1].config.threshold in [sweep.config.threshold for sweep in stopped]
    assert sweeps[-1].state.replayed > 0 and config == sweeps[-1].config
    for sweep in sweeps:
        fresh = acdc(model, task, sweep.config, batches)
        if sweep.finished:
            assert torch.equal(sweep.state.kept, fresh.kept), sweep.summary()
        else:
            decided = edges[:, :sweep.state.position]
            assert torch.equal(sweep.state.kept[decided[0], decided[1]], fresh.kept[decided[0], decided[1]])
            assert sweep.state.n_decided_kept(len(order)) > 11
        below, above = sweep.same_decisions(order)
        assert below < sweep.config.threshold <= above

    def trail(found):
        return [{key: value for key, value in sweep.summary().items() if key not in ("forwards", "seconds")}
                for sweep in found]

    cut = tmp_path / "cut"  # a search interrupted (Ctrl-C) in its fourth sweep resumes along the same sweeps
    with pytest.raises(KeyboardInterrupt):
        search_threshold(model, task, AcdcConfig(threshold=0.0, tests_per_forward=8), Interrupting(batches, 220),
                         n_edges, cut, low=1e-9, high=1e-3, tolerance=0.1)
    assert 2 <= len(list(cut.iterdir())) < len(sweeps)
    _, _, resumed = search_threshold(model, task, AcdcConfig(threshold=0.0, tests_per_forward=8), batches, n_edges,
                                     cut, resume=True, low=1e-9, high=1e-3, tolerance=0.1)
    assert trail(resumed) == trail(sweeps)


def test_replayed_prefix_stops_after_the_first_edge_decided_otherwise(tiny_gpt2_64):
    model = tiny_gpt2_64
    graph = Graph.from_model(model)
    task = load_task("ioi", model.tokenizer, 4, seed=1)
    batches = list(TaskBatches(model, graph, task, 4, "interchange"))
    earlier = acdc(model, task, AcdcConfig(threshold=1e-6, tests_per_forward=8), batches)
    order = sweep_order(graph)
    rises = torch.stack([earlier.scores[source, reader] for source, reader in order])
    kept_then = torch.stack([earlier.kept[source, reader] for source, reader in order])
    first_kept = int(torch.nonzero(kept_then).flatten()[0])
    above = float(rises[first_kept]) * 1.01  # that edge would be removed at this tau: the sweeps part there
    assert all(float(rise) < above for rise, kept in zip(rises[:first_kept], kept_then[:first_kept]) if not kept)
    p, kept, scores = replayed_prefix(graph, order, earlier, above)
    assert p == first_kept + 1
    source, reader = order[p - 1]
    assert not bool(kept[source, reader]) and bool(earlier.kept[source, reader])
    assert bool(kept[[s for s, _ in order[p:]], [r for _, r in order[p:]]].all())  # the rest undecided: kept
    assert replayed_prefix(graph, order, earlier, 1e-6)[0] == len(order)  # the same tau replays everything
    assert replayed_prefix(graph, order, earlier, 0.0)[0] == 0  # tau 0 tests even edges ACDC skipped


def test_next_threshold_predicts_from_the_nearest_finished_sweep_inside_the_bracket():
    scores = torch.zeros(4, 5)
    scores[0, :5] = torch.tensor([0.5, 0.2, 0.1, 0.05, 0.01])
    state = AcdcState(torch.ones(4, 5, dtype=torch.bool), scores, 20, 0.0)
    finished = Sweep(AcdcConfig(threshold=0.05), state, finished=True, folder="tau-0.05")
    assert next_threshold([], 3, 1e-4, 1.0) == pytest.approx(1e-2)  # nothing finished: the log midpoint
    assert next_threshold([Sweep(AcdcConfig(threshold=0.05), state, finished=False, folder="tau-0.05")], 3, 1e-4, 1.0) \
        == pytest.approx(1e-2)
    assert next_threshold([finished], 3, 1e-4, 1.0) == pytest.approx(0.1)  # the 3rd largest rise
    assert next_threshold([finished], 3, 0.05, 1.0) == pytest.approx(0.1)
    # a prediction at or beyond the bracket is pulled a tenth of it (log scale) inside
    assert next_threshold([finished], 1, 1e-4, 0.5) == pytest.approx(math.exp(math.log(0.5) - math.log(5e3) / 10))
    assert next_threshold([finished], 5, 0.05, 1.0) == pytest.approx(0.05 * math.exp(math.log(20) / 10))


def test_cli_acdc_of_a_given_size_records_its_threshold_search(tmp_path):
    out = tmp_path / "run"
    assert main(["discover", "--model", "tiny-gpt2", "--allow-weak-model", "--method", "acdc", "--edges", "5", "--threshold-runs", "3",
                 "--ablation", "zero",
                 "--n-examples", "4", "--n-test", "4", "--out", str(out), "--no-report"]) == 0
    document = json.loads((out / "circuit.json").read_text())
    search = document["config"]["threshold_search"]
    assert 1 <= len(search) <= 3 and search[0]["finished"] and search[0]["replayed"] == 0
    assert [(out / sweep["folder"] / "acdc_state.pt").is_file() for sweep in search] == [True] * len(search)
    assert document["config"]["threshold"] in [sweep["threshold"] for sweep in search]
    assert sum(edge["in_graph"] for edge in document["edges"].values()) <= 5
    started = tmp_path / "started"  # --threshold-start: the first sweep is there, the rest follow the search
    assert main(["discover", "--model", "tiny-gpt2", "--allow-weak-model", "--method", "acdc", "--edges", "5", "--threshold-runs", "2",
                 "--ablation", "zero", "--threshold-start", "0.0123",
                 "--n-examples", "4", "--n-test", "4", "--out", str(started), "--no-report"]) == 0
    search = json.loads((started / "circuit.json").read_text())["config"]["threshold_search"]
    assert search[0]["threshold"] == 0.0123 and search[0]["folder"] == "tau-0.0123"

"""Edge Pruning and HAP: gates, binarisation, a planted circuit, resume, bad input."""

import json

import pytest
import torch

import hap
from hap.attribution import AttributionConfig
from hap.cli import main
from hap.hybrid import HybridConfig, hybrid, select_candidates, warm_start_log_alpha
from hap.pruning import (
    PruningConfig,
    binarize,
    gate_deterministic,
    gate_keep_probability,
    gate_sample,
    gate_stretched,
    log_alpha_for_probability,
    project_to_sparsity,
    prune,
    step_plan_of,
)
from hap.evaluation import HeldOutMonitor
from hap.tasks import load_task

LIVE_HEADS = ("a0.h1", "a1.h2")
PLANTED_GAIN = 30.0


def test_large_log_alpha_is_the_full_model_and_small_the_ablated_run(tiny_llama):
    graph = hap.Graph.from_model(tiny_llama)
    task = load_task("ioi", tiny_llama.tokenizer, 4)
    reference = hap.interchange_reference(tiny_llama, task.corrupted_ids)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value, expected in ((50.0, tiny_llama.hf_model(task.clean_ids).logits),
                                (-50.0, tiny_llama.hf_model(task.corrupted_ids).logits)):
            gates = gate_sample(torch.full((graph.n_edges,), value), 2 / 3, generator)
            mask = torch.zeros(graph.real.shape)
            mask[graph.real] = gates
            logits = hap.run_masked(tiny_llama, graph, task.clean_ids, reference, mask)
            assert torch.allclose(logits, expected, atol=1e-5)


def test_gates_follow_the_hard_concrete_definition():
    log_alpha = torch.tensor([-3.0, 0.0, 2.0])
    assert torch.allclose(gate_deterministic(log_alpha), (torch.sigmoid(log_alpha) * 1.2 - 0.1).clamp(0, 1))
    samples = torch.stack([gate_sample(log_alpha, 2 / 3, torch.Generator().manual_seed(i)) for i in range(4000)])
    assert float(samples.min()) == 0.0 and float(samples.max()) == 1.0  # stretched, then clamped
    assert torch.allclose((samples > 0).float().mean(0), gate_keep_probability(log_alpha, 2 / 3), atol=0.03)
    p = torch.tensor([0.05, 0.5, 0.9])
    assert torch.allclose(gate_keep_probability(log_alpha_for_probability(p, 2 / 3), 2 / 3), p, atol=1e-6)


@pytest.mark.parametrize("n_keep", [0, 1, 37, 500, 999, 1000])
def test_binarisation_hits_the_requested_count(n_keep):
    values = torch.randn(1000, generator=torch.Generator().manual_seed(n_keep))
    kept = binarize(values, n_keep)
    assert int(kept.sum()) == n_keep
    if 0 < n_keep < 1000:
        assert float(values[kept].min()) > float(values[~kept].max())


def test_binarisation_with_ties_is_within_one_edge():
    values = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.5])
    assert abs(int(binarize(values, 2).sum()) - 2) <= 1


def planted_model() -> hap.Model:
    """tiny-llama in which every MLP and every head but LIVE_HEADS writes nothing.

    The live heads' outputs are amplified so the task depends on them: the answer
    position holds the same token in clean and corrupted prompts, so only
    attention can carry the names there.
    """
    planted = hap.load_model("tiny-llama", device="cpu")
    head_dim = planted.layout.head_dim
    for layer, block in enumerate(planted.hf_model.model.layers):
        block.mlp.down_proj.weight.zero_()
        for head in range(planted.layout.n_heads):
            columns = slice(head * head_dim, (head + 1) * head_dim)
            scale = PLANTED_GAIN if f"a{layer}.h{head}" in LIVE_HEADS else 0.0
            block.self_attn.o_proj.weight[:, columns] *= scale
    return planted


def _check_planted(graph: hap.Graph, kept: torch.Tensor, keep_probability: torch.Tensor) -> None:
    live_sources = {"input", *LIVE_HEADS}
    kept_names = [name for name in graph.edge_names() if kept[graph.edge_index(name)]]
    assert kept_names, "the circuit is empty"
    assert all(name.split("->")[0] in live_sources for name in kept_names), kept_names
    assert any(name.startswith("a1.h2->") for name in kept_names)  # the live heads are used
    dead = torch.tensor([name not in live_sources for name in graph.source_names])
    dead_edges = graph.real & dead[:, None]
    live_edges = graph.real & ~dead[:, None] & (keep_probability > 0)
    # Edges of dead heads are pruned first: they end lower than the live heads' edges.
    assert float(keep_probability[dead_edges].mean()) < float(keep_probability[live_edges].mean())


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    task = load_task("ioi", model.tokenizer, 16, seed=0)
    return model, task


def test_edge_pruning_finds_the_planted_circuit(planted):
    model, task = planted
    graph = hap.Graph.from_model(model)
    result = prune(model, task, PruningConfig(target_sparsity=0.95, steps=400, batch_size=8, seed=1))
    assert int(result.in_graph.sum()) <= round(0.05 * graph.n_edges)
    _check_planted(graph, result.in_graph, result.mask_values)


@pytest.mark.parametrize("warm_start", [False, True])
def test_hap_finds_the_planted_circuit(planted, warm_start):
    model, task = planted
    graph = hap.Graph.from_model(model)
    config = HybridConfig(pruning=PruningConfig(target_sparsity=0.95, steps=300, batch_size=8, seed=1),
                          attribution=AttributionConfig(method="eap"), candidates=0.3, warm_start=warm_start)
    circuit = hybrid(model, task, config)
    assert circuit.config["n_candidates"] <= round(0.3 * graph.n_edges)
    _check_planted(graph, circuit.in_graph, circuit.scores)


def test_candidates_go_down_the_ranking_until_the_circuit_fits(tiny_llama):
    """Dropping dangling edges can leave fewer candidates than the circuit keeps; the cut then extends to
    the shortest top list that leaves enough, as a one-edge-at-a-time walk down the ranking finds."""
    from hap.circuit import prune_dangling, top_edges

    graph = hap.Graph.from_model(tiny_llama)
    scores = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(0)) * graph.real
    n_top = round(0.05 * graph.n_edges)
    plain = prune_dangling(graph, top_edges(graph, scores, n_top))
    assert torch.equal(select_candidates(graph, scores, 0.05), plain)  # no floor: the plain cut
    at_least = int(plain.sum()) + 10
    walk = n_top
    while int(prune_dangling(graph, top_edges(graph, scores, walk)).sum()) < at_least:
        walk += 1
    chosen = select_candidates(graph, scores, 0.05, at_least=at_least)
    assert torch.equal(chosen, prune_dangling(graph, top_edges(graph, scores, walk))) and walk > n_top
    assert int(chosen.sum()) >= at_least
    everything = prune_dangling(graph, graph.real)
    assert torch.equal(select_candidates(graph, scores, 0.05, at_least=graph.n_edges + 1), everything)


def test_warm_start_follows_the_scores(tiny_llama):
    graph = hap.Graph.from_model(tiny_llama)
    scores = torch.randn(graph.real.shape, generator=torch.Generator().manual_seed(0)) * graph.real
    candidates = graph.real & (scores.abs() > 0.5)
    log_alpha = warm_start_log_alpha(graph, scores, candidates, keep=0.4, beta=2 / 3)
    p = gate_keep_probability(log_alpha[candidates], 2 / 3)
    assert float(p.mean()) == pytest.approx(0.4, abs=0.02)
    assert float(log_alpha.abs().max()) <= 10.0
    block = graph.readers_of_block(3)  # within a reader block, a larger |score| starts more open
    inside = candidates[:, block]
    magnitude, opened = scores[:, block][inside].abs(), log_alpha[:, block][inside]
    order = magnitude.argsort()
    assert bool((opened[order].diff() >= -1e-6).all())


def test_an_interrupted_run_resumes_to_the_same_circuit(tiny_gpt2, tmp_path):
    task = load_task("ioi", tiny_gpt2.tokenizer, 12, seed=0)
    config = PruningConfig(target_sparsity=0.8, steps=30, batch_size=4, seed=3)
    straight = prune(tiny_gpt2, task, config, run_dir=tmp_path / "straight", checkpoint_every=7)

    def interrupt(step: int) -> None:
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(tiny_gpt2, task, config, run_dir=tmp_path / "cut", checkpoint_every=7, on_step=interrupt)
    assert len((tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()) == 12
    resumed = prune(tiny_gpt2, task, config, run_dir=tmp_path / "cut", resume=True, checkpoint_every=7)
    assert torch.equal(resumed.in_graph, straight.in_graph)
    assert torch.equal(resumed.mask_values, straight.mask_values)
    log, straight_log = (_log_without_time(tmp_path / run / "train_log.jsonl") for run in ("cut", "straight"))
    assert [line["step"] for line in log] == list(range(1, straight.steps + 1))
    assert log == straight_log

    def interrupt_early(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed before the first checkpoint: resuming starts over
        prune(tiny_gpt2, task, config, run_dir=tmp_path / "early", checkpoint_every=7, on_step=interrupt_early)
    (tmp_path / "early" / "checkpoint.pt").unlink()  # a kill leaves none (Ctrl-C writes one)
    assert len((tmp_path / "early" / "train_log.jsonl").read_text().splitlines()) == 5
    again = prune(tiny_gpt2, task, config, run_dir=tmp_path / "early", resume=True, checkpoint_every=7)
    assert torch.equal(again.in_graph, straight.in_graph)
    assert _log_without_time(tmp_path / "early" / "train_log.jsonl") == straight_log


def test_read_offs_resume_with_the_run_and_the_best_one_is_chosen_on_training_loss(tiny_gpt2, tmp_path):
    """Read-offs recorded along a run survive an interruption (the checkpoint holds them), each is a circuit
    not recorded before, the final circuit is last, and best_read_off returns the one of lowest training loss
    recomputed here one circuit at a time (ties: the latest)."""
    from hap.ablation import AblationKind
    from hap.batches import TaskBatches
    from hap.pruning import best_read_off

    task = load_task("ioi", tiny_gpt2.tokenizer, 12, seed=0)
    config = PruningConfig(target_sparsity=0.8, steps=30, batch_size=4, seed=3, lr=0.3, init_mean=3.0,
                           readoff_every=3)
    straight = prune(tiny_gpt2, task, config, run_dir=tmp_path / "straight", checkpoint_every=7)

    def crash(step: int) -> None:  # a crash, not Ctrl-C: nothing is saved beyond the step-7 checkpoint
        if step == 8:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        prune(tiny_gpt2, task, config, run_dir=tmp_path / "cut", checkpoint_every=7, on_step=crash)
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 7 and [entry[0] for entry in saved["read_offs"]] == [3, 6]
    resumed = prune(tiny_gpt2, task, config, run_dir=tmp_path / "cut", resume=True, checkpoint_every=7)
    assert len(straight.read_offs) >= 3  # the masks moved: several distinct circuits
    assert [entry[0] for entry in resumed.read_offs] == [entry[0] for entry in straight.read_offs]
    for (_, a, _, _), (_, b, _, _) in zip(resumed.read_offs, straight.read_offs):
        assert torch.equal(a, b)
    steps = [entry[0] for entry in straight.read_offs]
    assert steps == sorted(steps) and steps[-1] == straight.steps and all(s % 3 == 0 for s in steps[:-1])
    assert torch.equal(straight.read_offs[-1][1], straight.in_graph)
    circuits = [entry[1] for entry in straight.read_offs]
    assert all(not torch.equal(a, b) for i, a in enumerate(circuits) for b in circuits[i + 1:])

    graph = hap.Graph.from_model(tiny_gpt2)
    data = TaskBatches(tiny_gpt2, graph, task, 4, "interchange")
    chosen = best_read_off(tiny_gpt2, graph, data, straight, AblationKind.INTERCHANGE)
    losses = []
    for kept in circuits:  # the slow twin: each circuit evaluated alone on the training examples
        circuit = hap.Circuit(tiny_gpt2.name, task.name, "ep", tiny_gpt2.layout, kept.float(), kept)
        losses.append(hap.evaluate(tiny_gpt2, circuit, task, ablation="interchange").kl)
    assert chosen.read_off_check["loss"] == pytest.approx(losses, abs=1e-5)
    best = min(range(len(losses)), key=lambda i: (round(losses[i], 5), -i))
    assert torch.equal(chosen.in_graph, circuits[best])
    assert chosen.read_off_check["returned_step"] == steps[best]
    assert (chosen.read_off_step is None) == (best == len(circuits) - 1)
    # Without records (the default) nothing changes.
    plain = prune(tiny_gpt2, task, PruningConfig(target_sparsity=0.8, steps=30, batch_size=4, seed=3, lr=0.3,
                                                 init_mean=3.0))
    assert plain.read_offs == [] and best_read_off(tiny_gpt2, graph, data, plain, AblationKind.INTERCHANGE) is plain


def _log_without_time(path):
    """The log's records without their wall-clock seconds (the only field a resumption may change)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def test_resume_refuses_other_settings(tiny_gpt2, tmp_path):
    task = load_task("ioi", tiny_gpt2.tokenizer, 8, seed=0)
    prune(tiny_gpt2, task, PruningConfig(target_sparsity=0.8, steps=3, batch_size=4), run_dir=tmp_path)
    with pytest.raises(hap.HapError, match="target_sparsity"):
        prune(tiny_gpt2, task, PruningConfig(target_sparsity=0.9, steps=3, batch_size=4), run_dir=tmp_path,
              resume=True)



def _checkpoint_without(model, run_dir, setting):
    """A 6-step run interrupted after step 3, its checkpoint rewritten as if from before ``setting``
    existed; (task, config) to resume it with."""
    task = load_task("ioi", model.tokenizer, 8, seed=0)
    config = PruningConfig(target_sparsity=0.8, steps=6, batch_size=4, max_extra_steps=0)
    with pytest.raises(KeyboardInterrupt):
        prune(model, task, config, run_dir=run_dir, checkpoint_every=1,
              on_step=lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3 else None)
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    fingerprint = json.loads(payload["fingerprint"])
    del fingerprint[setting]
    payload["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    torch.save(payload, run_dir / "checkpoint.pt")
    return task, config


def test_resume_accepts_a_checkpoint_older_than_a_setting_left_at_its_default(tiny_gpt2, tmp_path):
    """A checkpoint written before a setting existed lacks it: the run used what is now its default, so a
    resumption at the default goes on; at another value it is refused, naming the setting."""
    from dataclasses import replace

    task, config = _checkpoint_without(tiny_gpt2, tmp_path, "converge_tolerance")
    with pytest.raises(hap.HapError, match="converge_tolerance"):
        prune(tiny_gpt2, task, replace(config, converge_tolerance=0.01), run_dir=tmp_path, resume=True)
    resumed = prune(tiny_gpt2, task, config, run_dir=tmp_path, resume=True)
    assert resumed.steps == 6


def test_a_run_from_before_read_offs_resumed_with_them_is_told_how_to_go_on(tiny_gpt2, tmp_path):
    """Recording read-offs became the tracr default on 2026-12-07: a checkpoint from before has no such
    setting (it ran without), so resuming it with read-offs on is refused with the flag that goes on."""
    from dataclasses import replace

    task, config = _checkpoint_without(tiny_gpt2, tmp_path, "readoff_every")
    with pytest.raises(hap.HapError, match="--readoff-every 0"):
        prune(tiny_gpt2, task, replace(config, readoff_every=10), run_dir=tmp_path, resume=True)
    assert prune(tiny_gpt2, task, config, run_dir=tmp_path, resume=True).steps == 6


def _snapshot(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--sparsity", "1.2"], "must be in (0, 1)"),
        (["--sparsity", "0"], "must be in (0, 1)"),
        (["--sparsity", "0.9", "--candidates", "0.05"], "raise --candidates"),
        (["--sparsity", "0.9", "--steps", "0"], "--steps must be positive"),
        (["--sparsity", "0.9", "--steps", "-5"], "--steps must be positive"),
    ],
)
def test_bad_pruning_input_is_one_line_and_touches_nothing(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    argv = ["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", "hap", "--n-examples", "8", "--steps", "3",
            "--candidates", "0.5", "--out", str(out), "--no-report"]
    assert main([*argv, "--sparsity", "0.8"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*argv, *extra, "--force"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before


def test_resume_from_a_run_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", "ep", "--n-examples", "8", "--steps", "3",
            "--sparsity", "0.8", "--no-report"]
    assert main([*argv, "--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["discover", "--model", "tiny-gpt2", "--allow-weak-model", *argv[3:], "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model 'tiny-llama' -> 'tiny-gpt2'" in err
    assert _snapshot(out) == before
    assert main([*argv, "--resume", str(out)]) == 0  # the same settings resume (and finish at once)


@pytest.mark.parametrize("target", [0.5, 0.9, 0.97])
def test_projection_hits_the_target_and_keeps_the_ranking(target):
    log_alpha = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 6
    n_edges = 6000  # edges off the live set count as removed
    projected = project_to_sparsity(log_alpha, target, n_edges, 2 / 3)
    expected = 1 - float(gate_keep_probability(projected, 2 / 3).sum()) / n_edges
    assert expected == pytest.approx(target, abs=1e-5)
    inside = (projected > -10) & (projected < 10)
    order = log_alpha[inside].argsort()
    assert bool((projected[inside][order].diff() >= 0).all())  # a uniform shift: same order


@pytest.mark.parametrize("warmup", [None, 40])
def test_a_run_ends_at_the_target_before_binarisation(tiny_gpt2, warmup):
    task = load_task("ioi", tiny_gpt2.tokenizer, 16, seed=0)
    config = PruningConfig(target_sparsity=0.9, steps=30, batch_size=8, seed=0, sparsity_warmup=warmup)
    result = prune(tiny_gpt2, task, config)
    assert result.converged and abs(result.sparsity_gap) <= config.converge_tolerance
    if warmup == 40:  # the target still warms up when the planned steps end: extra steps get there
        assert 30 < result.steps <= 30 + config.extra_steps
    else:
        assert result.steps == 30 and abs(result.sparsity_gap) < 1e-4  # held exactly after the warm-up


@pytest.mark.parametrize("project", [False, True])
def test_projection_during_the_warm_up_holds_the_moving_target(tiny_gpt2, tmp_path, project):
    task = load_task("ioi", tiny_gpt2.tokenizer, 16, seed=0)
    config = PruningConfig(target_sparsity=0.9, steps=20, batch_size=8, seed=0, sparsity_warmup=15,
                           project_during_warmup=project)
    prune(tiny_gpt2, task, config, run_dir=tmp_path)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    gaps = [abs(line["expected_sparsity"] - line["target_sparsity"]) for line in log[1:]]  # step 1: the start
    if project:  # every step starts where the last one's projection put it: on that step's target
        assert max(gaps) < 1e-4
        # and the multipliers stay at 0: the gap left is rounding, which Adam would make full-size steps of
        assert all(line["lambda1"] == 0.0 and line["lambda2"] == 0.0 for line in log)
    else:  # the Lagrangian alone lags the moving target (the masks start near 0 sparsity)
        assert max(gaps[:14]) > 0.05


def test_the_held_out_monitor_logs_the_final_circuit(tiny_llama, tmp_path):
    train = load_task("ioi", tiny_llama.tokenizer, 16, seed=0)
    test = load_task("ioi", tiny_llama.tokenizer, 12, seed=9)
    monitor = HeldOutMonitor.build(tiny_llama, test, n_examples=8)
    config = PruningConfig(target_sparsity=0.8, steps=20, batch_size=8, seed=0, eval_every=5)
    result = prune(tiny_llama, train, config, run_dir=tmp_path, monitor=monitor)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    measured = [line["step"] for line in log if "test_kl" in line]
    assert measured == [5, 10, 15, 20]
    final = hap.evaluate(tiny_llama, result.in_graph, test.slice(0, 8), batch_size=8)
    assert log[-1]["test_kl"] == pytest.approx(final.kl, rel=1e-6)
    assert log[-1]["test_faithfulness"] == pytest.approx(final.faithfulness, rel=1e-6)


@pytest.mark.parametrize("node_masks", [False, True])
def test_a_step_plan_without_clamped_gates_changes_nothing(tiny_llama, node_masks):
    # The step plan drops edges whose gate is clamped at 0 and asks no gradient of gates clamped at
    # 0 or 1: the logits and the log-alpha gradients equal those of the full run.
    graph = hap.Graph.from_model(tiny_llama)
    task = load_task("ioi", tiny_llama.tokenizer, 4, seed=0)
    reference = hap.interchange_reference(tiny_llama, task.corrupted_ids)
    sources, readers = graph.real.nonzero(as_tuple=True)
    log_alpha = torch.randn(len(sources), generator=torch.Generator().manual_seed(3)).mul(4).requires_grad_(True)
    node_log_alpha = torch.randn(graph.n_sources, generator=torch.Generator().manual_seed(5)).mul(4)
    node_log_alpha.requires_grad_(True)
    stretched = gate_stretched(log_alpha, 2 / 3, torch.Generator().manual_seed(4))
    gates = stretched.clamp(0, 1)
    assert 0.1 < float((gates == 0).float().mean()) < 0.6 and float((gates == 1).float().mean()) > 0.1
    mask = torch.zeros(graph.real.shape).index_put((sources, readers), gates)
    node_stretched = None
    if node_masks:
        node_stretched = gate_stretched(node_log_alpha, 2 / 3, torch.Generator().manual_seed(6))
        mask = mask * node_stretched.clamp(0, 1)[:, None]
    plan, entries = step_plan_of(graph, graph.real, stretched, node_stretched, hap.AblationKind.INTERCHANGE)
    assert int(plan.live.sum()) < int(graph.real.sum()) and int(entries.sum()) < int(plan.live.sum())
    positions = task.lengths - 1
    parameters = [log_alpha, node_log_alpha] if node_masks else [log_alpha]
    results = []
    for plan_used, entries_used in ((None, None), (plan, entries)):
        logits = hap.run_masked(tiny_llama, graph, task.clean_ids, reference, mask, plan_used, positions,
                                grad_entries=entries_used)
        grads = torch.autograd.grad(logits.logsumexp(-1).sum(), parameters, retain_graph=True)
        results.append((logits.detach(), grads))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    for full, planned in zip(results[0][1], results[1][1]):
        assert torch.allclose(full, planned, atol=1e-6) and float(full.abs().sum()) > 0


@pytest.mark.parametrize("steps, warm_start", [(400, True), (2, False)])
def test_hap_never_ends_below_its_stage_one_circuit(steps, warm_start):
    """Judged on both circuits, recomputed here: HAP's training loss is never above that of its stage-1
    circuit of the same size. tracr-sort under interchange ablation: stage 1 (EAP-IG) finds the exact
    circuit (loss 0); a full warm-started run matches it and keeps its own edges, while a cold run cut to
    2 steps (masks still at their open, nearly tied start) does not, and HAP returns stage 1's circuit."""
    from hap.circuit import edges_for_sparsity
    from hap.tasks.program import program_task

    model = hap.load_model("tracr-sort", device="cpu")
    graph = hap.Graph.from_model(model)
    task = program_task("tracr-sort", 128, seed=0)
    n_keep = 7
    sparsity = 1 - n_keep / graph.n_edges
    config = HybridConfig(pruning=PruningConfig(target_sparsity=sparsity, steps=steps, lr=0.1, lambda_lr=0.1,
                                                batch_size=32, max_extra_steps=0),
                          attribution=AttributionConfig(method="eap-ig-inputs"), warm_start=warm_start)
    assert edges_for_sparsity(graph, sparsity) == n_keep
    circuit = hybrid(model, task, config)
    stage_one = hap.attribute(model, task, config=config.attribution).circuit(n_keep)
    loss = hap.evaluate(model, circuit, task, ablation="interchange").kl
    stage_one_loss = hap.evaluate(model, stage_one, task, ablation="interchange").kl
    check = circuit.config["stage_one_check"]
    assert check["training_loss_stage_one"] == pytest.approx(stage_one_loss, abs=1e-6)
    assert loss <= stage_one_loss + 1e-6
    if warm_start:  # the pruned circuit is as good: kept
        assert "returned" not in circuit.config and check["training_loss_pruned"] == pytest.approx(loss, abs=1e-6)
    else:  # the pruned circuit was worse: stage 1's edges and scores come back, and the record says why
        assert check["training_loss_pruned"] > stage_one_loss + 1e-3
        assert circuit.config["returned"] == "stage one"
        assert torch.equal(circuit.in_graph, stage_one.in_graph)
        assert torch.allclose(circuit.scores, stage_one.scores, rtol=1e-4, atol=1e-12)


def test_hap_candidates_grow_with_the_steps():
    """1.5x the circuit up to 120 steps (a short budget cannot prune a wide set), 3x from 1,000 steps, rising
    in between; an explicit --candidates is kept whatever the steps."""
    from hap.hybrid import candidate_margin

    def default(steps: int) -> float:
        return HybridConfig(pruning=PruningConfig(target_sparsity=0.95, steps=steps)).candidates

    assert default(50) == pytest.approx(0.075) and default(120) == pytest.approx(0.075)
    assert default(1000) == pytest.approx(0.15) and default(3000) == pytest.approx(0.15)
    between = [default(steps) for steps in (121, 200, 500, 999)]
    assert all(0.075 < a < b < 0.15 for a, b in zip(between, between[1:]))
    assert candidate_margin(1000) == 3.0
    assert HybridConfig(pruning=PruningConfig(target_sparsity=0.95, steps=1000), candidates=0.06).candidates == 0.06
    assert HybridConfig(pruning=PruningConfig(target_sparsity=0.5, steps=1000)).candidates == 1.0  # at most every edge


def test_hap_holds_its_warming_target_by_default_and_ep_keeps_the_published_schedule(tmp_path):
    """The default follows the method: hap with its warm start projects every warm-up step onto the moving
    target; ep, hap started cold (like ep) and hap on a tracr program (ep's long schedule) leave the warm-up
    to the Lagrangian; the flag overrides."""
    from hap.discovery import DiscoverConfig, discover

    tiny = dict(model="tiny-llama", allow_weak_model=True, n_examples=8, steps=12, sparsity=0.8, batch_size=4,
                force=True, report=False, explain_examples=0)
    cases = [("hap", {}, True), ("ep", {}, False), ("hap", {"warm_start": False}, False),
             ("hap", {"project_warmup": False}, False), ("ep", {"project_warmup": True}, True),
             ("hap", {"model": "tracr-hist", "sparsity": None, "edges": 4, "steps": 20, "allow_weak_model": False,
                      "n_examples": None, "batch_size": 16}, False)]
    for index, (method, extra, expected) in enumerate(cases):
        out = tmp_path / str(index)
        circuit = discover(DiscoverConfig(out=str(out), method=method, **{**tiny, **extra}))
        assert circuit.config["pruning"]["project_during_warmup"] is expected, (method, extra)
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        gaps = [abs(line["expected_sparsity"] - line["target_sparsity"]) for line in log[1:]]
        if expected:
            assert max(gaps) < 1e-4


def test_a_hap_checkpoint_from_before_the_held_warm_up_names_the_flag_that_resumes_it(tiny_gpt2, tmp_path):
    from dataclasses import replace

    task, config = _checkpoint_without(tiny_gpt2, tmp_path, "project_during_warmup")
    with pytest.raises(hap.HapError, match="--no-project-warmup"):
        prune(tiny_gpt2, task, replace(config, project_during_warmup=True), run_dir=tmp_path, resume=True)
    assert prune(tiny_gpt2, task, config, run_dir=tmp_path, resume=True).steps == 6


def test_read_offs_compared_on_validation_examples(tmp_path):
    """--readoff-on validation compares the circuits read off along a run on fresh draws of the training
    distribution (as many as the test split), not on the training examples: the record says so, the circuit
    returned is the one of lowest loss there, and that loss is the returned circuit's, evaluated afresh on the
    same validation draw. Refused without --readoff-every, for attribution methods and for a tracr program
    (which has no fresh draws)."""
    from hap.discovery import DiscoverConfig, discover, format_summary
    from hap.errors import DataError
    from hap.tasks import TaskSpec, validation_split

    config = DiscoverConfig(out=str(tmp_path / "ep"), model="tiny-gpt2", method="ep", sparsity=0.8, steps=30, lr=0.8,
                            init_mean=3.0, n_examples=12, n_test=12, batch_size=4, readoff_every=3, seed=3,
                            readoff_on="validation", allow_weak_model=True, report=False, explain_examples=0)
    circuit = discover(config)
    check = circuit.config["read_off_check"]
    assert check["on"] == "validation" and check["n_examples"] == 12 and len(check["steps"]) >= 2
    chosen = check["loss"][check["steps"].index(check["returned_step"])]
    assert chosen == min(check["loss"])
    model = hap.load_model("tiny-gpt2")
    validation = validation_split(TaskSpec(**circuit.splits["train"]), model.tokenizer, 12)
    assert hap.evaluate(model, circuit, validation, ablation="interchange").kl == pytest.approx(chosen, abs=1e-5)
    assert "compared on 12 validation examples" in format_summary(circuit)
    for bad in (dict(readoff_every=0), dict(method="eap")):
        with pytest.raises(hap.HapError, match="--readoff-every N"):
            DiscoverConfig(**{**config.to_dict(), **bad, "command": ""}).check()
    with pytest.raises(DataError, match="built-in"):
        discover(DiscoverConfig(out=str(tmp_path / "tracr"), model="tracr-count", method="ep", edges=6,
                                readoff_on="validation", report=False, explain_examples=0))
    assert not (tmp_path / "tracr").exists()  # refused before the run directory was touched

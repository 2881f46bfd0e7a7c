"""Data parallel with torchrun (gloo, 2 CPU processes): the same scores and circuit as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hap.attribution import AttributionConfig, attribute
from hap.circuit import Circuit
from hap.cli import main
from hap.distributed import Ranks, ranks_from_env
from hap.errors import HapError
from hap.tasks import load_task

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_each_batch_goes_to_exactly_one_rank():
    for world in (1, 2, 3):
        taken = sorted(index for rank in range(world) for index in Ranks(rank, world).mine(7))
        assert taken == list(range(7))


class _Alone(Ranks):
    """One rank's share without a process group: its sum is its own part."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_the_ranks_shares_add_up_to_the_whole(tiny_llama):
    task = load_task("ioi", tiny_llama.tokenizer, 6, seed=3)
    config = AttributionConfig(method="eap", batch_size=2)
    whole = attribute(tiny_llama, task, config=config).values
    parts = [attribute(tiny_llama, task, config=config, ranks=_Alone(rank, 2)).values for rank in range(2)]
    assert torch.allclose(parts[0] + parts[1], whole, atol=1e-6)
    assert not torch.allclose(parts[0], whole, atol=1e-4) and not torch.allclose(parts[1], whole, atol=1e-4)


def _discover(out: Path, method: str, extra: list[str]) -> list[str]:
    return ["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", method, "--edges", "40", "--n-examples", "6",
            "--n-test", "4", "--batch-size", "2", "--device", "cpu", "--out", str(out), "--no-report", *extra]


@pytest.mark.parametrize("method,extra", [("eap-ig-inputs", []), ("exact", ["--ablation", "mean"])])
def test_two_processes_give_the_scores_and_circuit_of_one(tmp_path, method, extra):
    # 6 examples in batches of 2: 3 batches, 2 on rank 0 and 1 on rank 1.
    assert main(_discover(tmp_path / "one", method, extra)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "hap",
                             *_discover(tmp_path / "two", method, extra)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # only the main process reports
    one, two = Circuit.load(tmp_path / "one"), Circuit.load(tmp_path / "two")
    assert float(one.scores.abs().max()) > 0
    assert torch.allclose(one.scores, two.scores, atol=1e-6, rtol=1e-5)
    # The same circuit, except where float rounding (sums in another order) swaps edges tied at the cut.
    cut = one.scores.abs().flatten().sort(descending=True).values[39]
    swapped = one.in_graph ^ two.in_graph
    assert bool(((one.scores[swapped].abs() - cut).abs() <= 1e-5 * cut + 1e-7).all())
    if not bool(swapped.any()):
        assert two.held_out["kl"] == pytest.approx(one.held_out["kl"], rel=1e-5)


def test_a_distributed_acdc_run_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "hap",
                             *_discover(tmp_path / "acdc", "acdc", [])], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode != 0
    assert "supports the attribution methods, ep and hap" in result.stderr
    assert not (tmp_path / "acdc" / "run.json").exists()


# -- data-parallel pruning ---------------------------------------------------------------------------------


def test_more_processes_than_gpus_is_refused_with_the_fix(monkeypatch):
    """NCCL cannot run two ranks on one GPU: say so before joining, not with NCCL's own error."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(HapError, match=r"--nproc_per_node 1, or --device cpu"):
        ranks_from_env(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # joined already: no NCCL needed here
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert ranks_from_env(torch.device("cuda", 1)).rank == 1  # one GPU per process: allowed


def test_shards_split_every_batch_between_the_processes(tiny_llama):
    from hap.batches import TaskBatches
    from hap.errors import HapError
    from hap.graph import Graph

    graph = Graph.from_model(tiny_llama)
    task = load_task("ioi", tiny_llama.tokenizer, 7, seed=1)
    data = TaskBatches(tiny_llama, graph, task, 3, "interchange")  # batches of 3, 3 and 1
    with pytest.raises(HapError, match="at least 2"):
        data.shard(0, 2)
    data = TaskBatches(tiny_llama, graph, task.slice(0, 6), 3, "interchange")
    shards = [data.shard(rank, 2) for rank in range(2)]
    assert shards[0].whole_sizes == shards[1].whole_sizes == [3, 3]
    for index in range(len(data)):
        pieces = [shard[index].task.clean_prompts for shard in shards]
        assert all(pieces) and pieces[0] + pieces[1] == data[index].task.clean_prompts


class _Pair(Ranks):
    """Two ranks in two threads of one process: ``sum`` adds what both hand in (a stand-in for all-reduce)."""

    def __init__(self, rank: int, shared: dict) -> None:
        super().__init__(rank, 2)
        object.__setattr__(self, "shared", shared)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        shared = self.shared
        shared["slots"][self.rank] = tensor.clone()
        shared["barrier"].wait()
        total = shared["slots"][0] + shared["slots"][1]
        shared["barrier"].wait()
        return total


def test_two_ranks_prune_to_the_masks_of_one_process_with_the_whole_batch():
    import threading

    import hap
    from hap.batches import TaskBatches
    from hap.graph import Graph
    from hap.pruning import PruningConfig, prune

    model = hap.load_model("tiny-llama", device="cpu", dtype="float64")
    graph = Graph.from_model(model)
    task = load_task("ioi", model.tokenizer, 8, seed=2)
    config = PruningConfig(target_sparsity=0.9, steps=6, batch_size=4, lr_warmup=1, sparsity_warmup=3, seed=1)
    one = prune(model, task, config, data=TaskBatches(model, graph, task, 4, "interchange"))
    shared = {"slots": [None, None], "barrier": threading.Barrier(2)}
    results: list = [None, None]

    def rank(index: int) -> None:
        results[index] = prune(model, task, config, data=TaskBatches(model, graph, task, 4, "interchange"),
                               ranks=_Pair(index, shared))

    threads = [threading.Thread(target=rank, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(results[0].mask_values, results[1].mask_values)  # every rank holds the same masks
    assert torch.allclose(results[0].mask_values, one.mask_values, atol=1e-9)
    assert not torch.allclose(one.mask_values[graph.real], torch.full_like(one.mask_values[graph.real], 
                                                                           float(one.mask_values[graph.real][0])))
    assert torch.equal(results[0].in_graph, one.in_graph)


@pytest.mark.parametrize("method", ["ep", "hap"])
def test_two_processes_prune_like_one_and_resume_after_a_kill(tmp_path, method):
    """torchrun, 2 gloo processes, killed mid-run and resumed: the masks of one uninterrupted process."""
    import json
    import signal
    import time

    def argv(out: Path) -> list[str]:
        return ["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", method, "--edges", "60", "--steps", "150",
                "--batch-size", "4", "--n-examples", "8", "--n-test", "4", "--dtype", "float64",
                "--checkpoint-every", "2", "--device", "cpu", "--out", str(out), "--no-report",
                *(["--candidates", "0.5"] if method == "hap" else [])]

    assert main(argv(tmp_path / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "hap"]
    two = tmp_path / "two"
    run = subprocess.Popen([*torchrun, *argv(two)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                           start_new_session=True)
    deadline = time.monotonic() + 300
    while not (two / "checkpoint.pt").exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    assert run.poll() is None, "the run ended before it could be killed; give it more steps"
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (two / "circuit.json").exists()
    resumed = subprocess.run([*torchrun, "discover", "--resume", str(two)], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("wrote ") == 1  # only the main process reports
    steps = [json.loads(line)["step"] for line in (two / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 151))  # one writer; every step once, none lost or doubled
    alone, together = Circuit.load(tmp_path / "one"), Circuit.load(two)
    # The masks are float32: the processes' gradient halves summed in another order differ by float32
    # rounding, which 150 Adam steps carry to about 4e-5 in the keep probabilities (measured).
    from hap.pruning import gate_keep_probability

    masks = [gate_keep_probability(torch.load(folder / "checkpoint.pt", weights_only=True)["log_alpha"], 2 / 3)
             for folder in (tmp_path / "one", two)]
    assert masks[0].shape == masks[1].shape and torch.allclose(*masks, atol=2e-4)
    if method == "hap" and alone.config.get("returned") != together.config.get("returned"):
        # HAP's last choice, its pruned circuit or stage 1's, compares two training losses; where they are
        # this close (7% apart on this tiny model) that rounding may flip it, and only then
        for check in (alone.config["stage_one_check"], together.config["stage_one_check"]):
            pruned, stage_one = check["training_loss_pruned"], check["training_loss_stage_one"]
            assert abs(pruned - stage_one) <= 0.1 * stage_one
        return
    assert torch.allclose(alone.scores, together.scores, atol=2e-4)
    # The same circuit, except edges whose keep probability sits within that rounding of the cut.
    kept = alone.scores[alone.in_graph]
    cut = float(kept.min()) if len(kept) else 0.0
    swapped = alone.in_graph ^ together.in_graph
    assert bool(((alone.scores[swapped] - cut).abs() <= 2e-4).all())


def test_only_rank_zero_is_the_main_process_and_asking_joins_no_group(monkeypatch):
    import torch.distributed as dist

    from hap.distributed import is_main_process

    for rank, main_one in (("0", True), ("1", False), (None, True)):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        assert is_main_process() is main_one
    assert not dist.is_initialized()
    Ranks().leave()  # alone: nothing to leave, and no error

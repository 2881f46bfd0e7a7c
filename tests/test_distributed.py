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
from hap.distributed import Ranks
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
    return ["discover", "--model", "tiny-llama", "--method", method, "--edges", "40", "--n-examples", "6",
            "--n-test", "4", "--batch-size", "2", "--out", str(out), "--no-report", *extra]


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


def test_a_distributed_pruning_run_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "hap",
                             *_discover(tmp_path / "ep", "ep", [])], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode != 0
    assert "supports the attribution methods" in result.stderr
    assert not (tmp_path / "ep" / "run.json").exists()

"""Threads that fit the process: the usable CPUs, --threads / HAP_THREADS, OpenMP's wait policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hap.cli import main
from hap.errors import HapError
from hap.threads import cgroup_cpu_quota, thread_count, usable_cpus


def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2) == pytest.approx(1.5)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == pytest.approx(0.5)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None
    assert cgroup_cpu_quota(tmp_path / "nothing") is None


def test_usable_cpus_follow_the_affinity_and_the_quota():
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(quota=1000.0) == affinity
    assert usable_cpus(quota=0.5) == 1  # half a CPU still runs one thread
    assert usable_cpus(quota=1.5) == min(affinity, 2)


def test_thread_count_takes_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("HAP_THREADS", raising=False)
    assert thread_count() == usable_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_count() == 3
    monkeypatch.setenv("HAP_THREADS", "5")
    assert thread_count() == 5
    assert thread_count(2) == 2
    with pytest.raises(HapError, match="at least 1"):
        thread_count(0)
    monkeypatch.setenv("HAP_THREADS", "two")
    with pytest.raises(HapError, match="HAP_THREADS='two' is not a whole number"):
        thread_count()


def _threads_in_child(env: dict[str, str], requested: str = "None") -> dict:
    code = ("import json, os; from hap.threads import prepare_threads; n = prepare_threads(" + requested + "); "
            "import torch; print(json.dumps({'n': n, 'torch': torch.get_num_threads(), "
            "'policy': os.environ.get('OMP_WAIT_POLICY'), 'omp': os.environ.get('OMP_NUM_THREADS')}))")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HAP_THREADS", "GOMP_SPINCOUNT",
                                                              "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def test_torch_starts_with_the_chosen_threads_that_sleep_while_they_wait():
    chosen = _threads_in_child({"HAP_THREADS": "1"})
    assert chosen == {"n": 1, "torch": 1, "policy": "PASSIVE", "omp": "1"}
    assert _threads_in_child({}, requested="2")["torch"] == 2
    assert _threads_in_child({})["torch"] == usable_cpus()
    assert _threads_in_child({"OMP_WAIT_POLICY": "ACTIVE"})["policy"] == "ACTIVE"  # the user's own policy is kept
    assert _threads_in_child({"GOMP_SPINCOUNT": "1000"})["policy"] is None  # or their spin count


def test_bad_thread_counts_are_one_line(capsys):
    assert main(["verify", "--model", "tiny-llama", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "--threads must be at least 1" in err and len(err.strip().splitlines()) == 1

"""How many CPU threads a run uses, and how they wait.

torch starts one intra-op thread per host core, whatever the process may use: on a machine whose
cores are shared with another busy process, or in a container with a CPU quota below the host's
cores, its OpenMP threads spin-wait at every barrier for a thread that is not scheduled, and a step
runs many times slower. So hap takes the CPUs the process may actually use (its CPU affinity, and
the cgroup CPU quota where one is set), lets ``--threads N`` or ``HAP_THREADS`` say otherwise, and
makes OpenMP's threads sleep rather than spin while they wait (``OMP_WAIT_POLICY=PASSIVE``) before
torch starts its thread pool, unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``. ``benchmarks/shared_cores.py`` measures the choice alone and beside
a competing process.

Environment variables only take effect before torch is imported; the command line calls
``prepare_threads`` first thing, the Python API can call ``use_threads`` at any time (it sets
torch's thread count, not the wait policy).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import HapError

# How OpenMP threads wait at a barrier. libgomp's default spins 300,000 iterations (about a millisecond)
# before it sleeps: beside a competing process, a thread waiting for a descheduled one burns its time
# slice. Measured on 2 cores, an Edge Pruning step on SmolLM2 IOI (batch 16) beside one busy process:
# 3.5x slower than alone with the default, 1.9x with PASSIVE (threads sleep at once), which costs 4%
# alone (benchmarks/shared_cores.py, benchmarks/README.md).
WAIT_POLICY = "PASSIVE"


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup allows (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None
    when no quota is set or none can be read."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(quota: float | None = None) -> int:
    """The CPUs this process may run on: its affinity set, capped by the cgroup quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota() if quota is None else quota
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota - 1e-9)))
    return max(1, cpus)


def thread_count(requested: int | None = None) -> int:
    """Threads to use: ``requested`` (``--threads``), else ``HAP_THREADS``, else ``OMP_NUM_THREADS``,
    else the usable CPUs."""
    if requested is not None:
        if requested < 1:
            raise HapError(f"--threads must be at least 1, got {requested}")
        return requested
    for name in ("HAP_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                count = int(value)
            except ValueError:
                raise HapError(f"{name}={value!r} is not a whole number of threads; set it to e.g. 2, "
                               f"or unset it") from None
            if count < 1:
                raise HapError(f"{name}={value!r}: the thread count must be at least 1")
            return count
    return usable_cpus()


def prepare_threads(requested: int | None = None) -> int:
    """Before torch is imported: choose the thread count and set OpenMP's environment for it: the count,
    and threads that sleep while they wait (the user's own ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY`` and
    ``GOMP_SPINCOUNT`` are kept, unless ``requested`` overrides the count). Returns the thread count."""
    count = thread_count(requested)
    if requested is not None or "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(count)
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    use_threads(count)
    return count


def use_threads(count: int) -> None:
    """Set torch's intra-op thread count, if torch is already imported (otherwise OMP_NUM_THREADS,
    set by ``prepare_threads``, decides when it is)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)

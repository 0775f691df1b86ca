"""Intra-op threads for capdiag's own processes: as many as there are idle cores.

PyTorch starts one intra-op thread per core whatever else runs there; on a machine whose cores
are busy, its spinning workers and the other job's preempt each other and small ops get several
times slower (5x measured on a loaded 2-core machine). The CLI therefore uses the cores this
process may run on (``sched_getaffinity``, the container's CPU quota) minus the ones busy right
now, at least one. "Right now" is measured (psutil's CPU times over 50 ms), not read from the load
average: the 1-minute average still counts a capdiag run that ended seconds ago, so back-to-back
runs (a CI script, a user rerunning) would each get one thread on an idle machine (1.5-2x slower,
measured). A user's own choice wins: ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` in the environment. Library entry points (``subject_for``, the training monitor, the pytest plugin) never change the
thread count of the user's process.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator, Optional


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota when there is one."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def busy_cores(window: float = 0.05) -> float:
    """Cores busy with other work right now: the machine's CPU time used in a ``window``-second sample
    (psutil; this process sleeps through it), in cores."""
    import psutil

    return psutil.cpu_percent(interval=window) / 100.0 * (psutil.cpu_count() or 1)


def idle_cores(cores: Optional[int] = None, load: Optional[float] = None) -> int:
    """Usable cores minus those busy with other work (``load``: busy cores, measured when None;
    at least 1)."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        load = busy_cores()
    return max(1, min(cores, cores - int(load + 0.5)))


def choose_threads(environ=os.environ, cores: Optional[int] = None, load: Optional[float] = None) -> Optional[int]:
    """The thread count a capdiag process should use, or None when the environment chose one."""
    if environ.get("OMP_NUM_THREADS") or environ.get("MKL_NUM_THREADS"):
        return None
    return idle_cores(cores, load)


def apply() -> Optional[int]:
    """Set torch's intra-op threads for a capdiag CLI run (a fresh process: nobody else chose yet);
    returns the count set, None when ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` decide."""
    import torch

    n = choose_threads()
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def applied(active: bool = True) -> Iterator[Optional[int]]:
    """``apply()`` for a block, restoring the previous thread count after it (``main()`` called
    in-process, as tests and scripts do, leaves the caller's setting as it was)."""
    if not active:
        yield None
        return
    import torch

    before = torch.get_num_threads()
    try:
        yield apply()
    finally:
        torch.set_num_threads(before)

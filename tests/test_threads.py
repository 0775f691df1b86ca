"""Thread choice for capdiag's CLI processes: idle cores, the user's OMP_NUM_THREADS first."""
from __future__ import annotations

import os
import sys

import procs
from capdiag.threads import choose_threads, idle_cores


def test_idle_cores_subtract_the_load_and_keep_one():
    assert idle_cores(cores=2, load=0.1) == 2
    assert idle_cores(cores=2, load=1.2) == 1  # another job holds a core: do not fight it
    assert idle_cores(cores=2, load=5.0) == 1
    assert idle_cores(cores=16, load=3.6) == 12


def test_the_users_thread_setting_wins():
    assert choose_threads({"OMP_NUM_THREADS": "3"}, cores=2, load=0.0) is None
    assert choose_threads({"MKL_NUM_THREADS": "1"}, cores=2, load=0.0) is None
    assert choose_threads({}, cores=2, load=1.4) == 1


def test_cli_sets_threads_but_respects_omp_num_threads():
    code = ("import torch, capdiag.threads as t; n = t.apply(); print(n, torch.get_num_threads())")
    out = procs.run([sys.executable, "-c", code], timeout=120, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    assert out == ["None", "1"]


def test_busy_cores_sees_work_running_now_not_the_last_minutes_average():
    import subprocess
    import time

    from capdiag.threads import busy_cores

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
    try:
        time.sleep(0.5)
        assert busy_cores(0.2) >= 0.5  # one core spinning
    finally:
        spin.kill()
        spin.wait()

"""The training hook in a real 2-process DDP job (gloo, CPU), launched with torchrun."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import procs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bug", [None, "starved_image"])
def test_two_rank_gloo_job(tmp_path, bug):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples/ddp/train_ddp.py"), "--out", str(tmp_path), "--steps", "160"]
    if bug:
        cmd += ["--bug", bug]
    r = procs.run(cmd, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    # Probe metrics are reduced over ranks, gradient statistics come from synchronized grads.
    assert ranks[0]["reliance"] == ranks[1]["reliance"] and len(ranks[0]["reliance"]) >= 3
    assert ranks[0]["grad_norm_decoder"] == pytest.approx(ranks[1]["grad_norm_decoder"], rel=1e-5)
    # Only rank 0 writes files.
    assert [r["wrote"] for r in ranks] == [True, False]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    # The stop decision reaches every rank at the same step.
    assert ranks[0]["stopped_at"] == ranks[1]["stopped_at"]
    assert ranks[0]["should_stop"] == ranks[1]["should_stop"] == (bug is not None)

"""The full check's wall time under two checkouts of capdiag, side by side in one run.

Each (model, checkout) pair runs in a fresh process (``PYTHONPATH`` selects the checkout), alternating
A and B ``--reps`` times, so both see the same machine load; the median per pair is reported with the
ratio B/A. The checks' verdicts are printed too, so a cost change is never read without them.

    python benchmarks/cost_ab.py --a /path/to/old/checkout --b . --reps 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RUN = r'''
import json, sys, time, warnings
import torch
torch.set_num_threads(2)
warnings.simplefilter("ignore")
import capdiag
from capdiag.registry import list_checks
name = sys.argv[1]
if name.startswith("zoo_"):
    from capdiag.testing import zoo
    s = capdiag.subject_for(zoo.make(name[4:]), **zoo.HINTS)
else:
    from capdiag.models import registry
    s = registry.subject(name)
t = time.perf_counter()
r = capdiag.run_checks(s, [c.name for c in list_checks()])
print(json.dumps({"seconds": time.perf_counter() - t, "statuses": {f.check: f.status.value for f in r.findings},
                  "per_check": {f.check: f.metrics.get("seconds", 0.0) for f in r.findings}}))
'''

MODELS = ["zoo_transformer", "zoo_lstm", "zoo_gru", "cnn_transformer", "show_attend_tell", "dual_transfer",
          "clip_decoder", "clipcap"]


def once(root: str, model: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
    out = subprocess.run([sys.executable, "-c", RUN, model], capture_output=True, text=True, env=env, timeout=1800,
                         cwd="/")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not line:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(line[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="checkout A (before)")
    ap.add_argument("--b", default=".", help="checkout B (after)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    print("| model | A: full check (s) | B: full check (s) | B/A | verdicts changed |")
    print("|---|---|---|---|---|")
    ratios = []
    for model in args.models.split(","):
        runs = {"a": [], "b": []}
        for _ in range(args.reps):
            for side in ("a", "b"):
                runs[side].append(once(getattr(args, side), model))
        ta = statistics.median(r["seconds"] for r in runs["a"])
        tb = statistics.median(r["seconds"] for r in runs["b"])
        sa, sb = runs["a"][0]["statuses"], runs["b"][0]["statuses"]
        changed = ", ".join(f"{c}: {sa.get(c)} -> {sb[c]}" for c in sb if sa.get(c) != sb[c]) or "none"
        ratios.append(tb / ta)
        print(f"| {model} | {ta:.1f} | {tb:.1f} | {tb / ta:.2f} | {changed} |", flush=True)
    print(f"\nmedian B/A {statistics.median(ratios):.2f}, max {max(ratios):.2f}")


if __name__ == "__main__":
    main()

"""How long ``capdiag check`` takes, where the time goes, and what it costs in training steps.

For each model, in one run: the wall time of ``capdiag check --quick`` and of the full check as a
user runs them (a fresh ``capdiag`` process, start-up included), then, in this process, the full
check once more under a profiler that attributes each check's time to model forwards, backwards
(``autograd.backward``/``autograd.grad``), training steps of capdiag's fitted copy, plotting, and
the rest (Python, copies, hooks). The last column is the full check's cost in units of one
training step of the same model (forward + backward + Adam on a batch of 16, median of 10): a
machine-independent figure.

    python benchmarks/check_speed.py                       # tiny zoo, references, a 47M and a 60M model
    python benchmarks/check_speed.py --models zoo_gru,cnn_transformer --no-cli
    python benchmarks/check_speed.py --vlm                 # a tiny folder of each vision-language family

The vision-language targets (issue 28, this CPU): a tiny VLM's full check in at most 15 s and its quick
check in at most 5 s, each a fresh ``capdiag check FOLDER`` process, start-up and transformers' import
included; beside them, a fresh process that only imports transformers and loads the same folder (the floor).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

ZOO_FILE = '''from capdiag.testing import zoo
CAPDIAG = dict(zoo.HINTS)
def build_model():
    return zoo.make({arch!r})
'''

# name -> (how the CLI names it: file text or module + args, how to build it here, is it big)
def _models():
    from capdiag.models import registry
    from capdiag.testing import zoo

    out = {}
    for arch in zoo.ARCHS:
        out[f"zoo_{arch}"] = (("file", ZOO_FILE.format(arch=arch)), lambda a=arch: _zoo_subject(a))
    for name in registry.list_models():
        if not registry.get(name).missing("tiny"):
            out[name] = (("module", f"capdiag.models.{name}", []), lambda n=name: registry.subject(n))
    # Real-sized captioners: a 6-layer 512-wide Transformer decoder, vocab 10000, 224 px, on ResNet-18
    # (47M parameters, inside the 25-50M range the targets name) and on ResNet-50 (60M).
    mid = ["size=full", "encoder=resnet18"]
    out["cnn_transformer_resnet18_full"] = (("module", "capdiag.models.cnn_transformer", mid),
                                            lambda: registry.subject("cnn_transformer", variant="full", encoder="resnet18"))
    big = ["size=full", "encoder=resnet50"]
    out["cnn_transformer_resnet50_full"] = (("module", "capdiag.models.cnn_transformer", big),
                                            lambda: registry.subject("cnn_transformer", variant="full", encoder="resnet50"))
    return out


def _zoo_subject(arch):
    import capdiag
    from capdiag.testing import zoo

    return capdiag.subject_for(zoo.make(arch), **zoo.HINTS)


def cli_seconds(spec, quick: bool, tmp: Path) -> tuple:
    """Wall time of a fresh ``capdiag check`` process and its JSON findings."""
    if spec[0] == "file":
        target = tmp / "model.py"
        target.write_text(spec[1])
        args = [str(target)]
    else:
        args = [spec[1]] + [x for a in spec[2] for x in ("--arg", a)]
    out = tmp / "findings.json"
    cmd = [sys.executable, "-m", "capdiag", "check", *args, "--json", str(out)] + (["--quick"] if quick else [])
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    return time.perf_counter() - t, json.loads(out.read_text()) if out.exists() else {}


class Profiler:
    """Time spent in model calls, backwards, fit steps and plotting, attributed to the running check."""

    def __init__(self):
        self.check = None
        self.t = defaultdict(lambda: defaultdict(float))
        self.n = defaultdict(lambda: defaultdict(int))
        self._depth = 0

    @contextlib.contextmanager
    def patched(self):
        from capdiag import captioner
        from capdiag.measure import training

        saved = [(captioner.Captioner, "call"), (torch.autograd, "backward"), (torch.autograd, "grad"),
                 (torch.Tensor, "backward"), (training, "fit_copy")]
        originals = [getattr(o, a) for o, a in saved]
        captioner.Captioner.call = self._timed("forward", originals[0])
        torch.autograd.backward = self._timed("backward", originals[1])
        torch.autograd.grad = self._timed("backward", originals[2])
        torch.Tensor.backward = self._timed("backward", originals[3])
        training.fit_copy = self._timed("fit", originals[4], count=lambda r: r.steps)
        try:
            yield self
        finally:
            for (o, a), f in zip(saved, originals):
                setattr(o, a, f)

    def _timed(self, kind, fn, count=None):
        prof = self

        def wrapper(*args, **kwargs):
            if prof.check is None or prof._depth:  # nested: counted in the outer call (a fit's own forwards)
                if kind != "fit":
                    prof.n[prof.check][kind + "_nested"] += 1
                return fn(*args, **kwargs)
            prof._depth += 1
            t = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                prof._depth -= 1
                prof.t[prof.check][kind] += time.perf_counter() - t
            prof.n[prof.check][kind] += count(result) if count else 1
            return result
        return wrapper


def step_seconds(subject, n: int = 10) -> float:
    """Median seconds of one training step (forward, backward, Adam) of a copy of the model."""
    import copy

    from capdiag.state import seeded

    cap = subject.captioner.with_model(copy.deepcopy(subject.model))
    opt = torch.optim.Adam([p for p in cap.model.parameters() if p.requires_grad], 1e-3)
    images, captions = subject.images, subject.captions
    if images.shape[0] < 16:
        reps = -(-16 // images.shape[0])
        images, captions = images.repeat(reps, 1, 1, 1)[:16], captions.repeat(reps, 1)[:16]
    times = []
    cap.model.train()
    with seeded(0):
        for _ in range(n + 2):
            t = time.perf_counter()
            opt.zero_grad()
            cap.loss(images, captions).backward()
            opt.step()
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def profile(make):
    """Run the full check in this process under the profiler; per-check breakdown and the total."""
    from capdiag import list_checks
    from capdiag.runner import run_check
    from capdiag.viz.findings import figures

    t0 = time.perf_counter()
    subject = make()
    setup = time.perf_counter() - t0
    prof = Profiler()
    rows = []
    with prof.patched():
        for cls in list_checks():
            prof.check = cls.name
            t = time.perf_counter()
            finding = run_check(subject, cls())
            measured = time.perf_counter() - t
            prof.check = None
            t = time.perf_counter()
            figs = figures(finding)  # what --out would add, drawn off the measuring path
            for _, _, fig in figs:
                fig.canvas.draw() if hasattr(fig, "canvas") else None
            draw = time.perf_counter() - t
            rows.append((cls.name, finding.status.value, measured, dict(prof.t[cls.name]), dict(prof.n[cls.name]), draw))
    return subject, setup, rows


VLM_FULL, VLM_QUICK = 15.0, 5.0  # seconds, fresh process


def vlm_table(tmp: Path) -> bool:
    """Wall times of ``capdiag check FOLDER`` (full and --quick, fresh processes) on a tiny folder of each
    vision-language family, against the targets; True when every family meets both."""
    from capdiag.testing import vlm

    print("\n| family | quick (s) | full (s) | transformers alone (s) | checks (pass/warn/fail/skip) | targets |")
    print("|---|---|---|---|---|---|")
    ok = True
    for name in vlm.FAMILIES:
        folder = vlm.build_folder(name, tmp / name)
        quick, _ = cli_seconds(("module", str(folder), []), True, tmp)
        full, found = cli_seconds(("module", str(folder), []), False, tmp)
        t = time.perf_counter()  # the floor: a fresh process that only imports transformers and loads the folder
        subprocess.run([sys.executable, "-c", BARE.format(folder=str(folder))], check=True, capture_output=True)
        bare = time.perf_counter() - t
        c = found.get("counts", {})
        met = quick <= VLM_QUICK and full <= VLM_FULL
        ok &= met
        print(f"| {name} | {quick:.1f} | {full:.1f} | {bare:.1f} | {c.get('pass', 0)}/{c.get('warn', 0)}/"
              f"{c.get('fail', 0)}/{c.get('skip', 0)} | {'met' if met else 'MISSED'} (<= {VLM_QUICK:.0f} / "
              f"{VLM_FULL:.0f}) |", flush=True)
    return ok


BARE = ("from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "AutoProcessor.from_pretrained({folder!r}, local_files_only=True)\n"
        "AutoModelForImageTextToText.from_pretrained({folder!r}, local_files_only=True)\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--no-cli", action="store_true", help="skip the fresh-process wall times")
    ap.add_argument("--breakdown", action="store_true", help="print the per-check profile of every model")
    ap.add_argument("--vlm", action="store_true", help="only the vision-language families (tiny folders)")
    args = ap.parse_args(argv)
    if args.vlm:
        with tempfile.TemporaryDirectory() as tmp:
            return 0 if vlm_table(Path(tmp)) else 1
    models = _models()
    names = args.models.split(",") if args.models else list(models)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            spec, make = models[name]
            quick = full = float("nan")
            if not args.no_cli:
                quick, _ = cli_seconds(spec, True, Path(tmp))
                full, _ = cli_seconds(spec, False, Path(tmp))
            subject, setup, rows = profile(make)
            step = step_seconds(subject)
            n_params = sum(p.numel() for p in subject.model.parameters())
            total = setup + sum(r[2] for r in rows)
            fit_steps = sum(r[4].get("fit", 0) for r in rows)
            table.append((name, n_params, quick, full, total, step, total / step, fit_steps))
            if args.breakdown or len(names) == 1:
                print(f"\n{name}: {n_params / 1e6:.2f}M parameters, setup {setup:.2f}s, one training step {step * 1000:.1f} ms")
                print(f"{'check':<22} {'status':<6} {'total':>7} {'forward':>12} {'backward':>12} {'fit':>13} {'other':>7} {'draw':>6}")
                for check, status, secs, t, n, draw in rows:
                    other = secs - sum(t.values())
                    print(f"{check:<22} {status:<6} {secs:7.2f} {t.get('forward', 0):6.2f}/{n.get('forward', 0):<5d}"
                          f" {t.get('backward', 0):6.2f}/{n.get('backward', 0):<5d} {t.get('fit', 0):6.2f}/{n.get('fit', 0):<6d}"
                          f" {other:7.2f} {draw:6.2f}")
            print(f"{name:<32} quick {quick:6.1f}s  full {full:7.1f}s  (in-process {total:6.1f}s = "
                  f"{total / step:6.0f} training steps of {step * 1000:.0f} ms; capdiag trained {fit_steps} steps)", flush=True)
    print("\n| model | parameters | quick (s) | full (s) | full, in training steps | fitted-copy steps |")
    print("|---|---|---|---|---|---|")
    for name, n, quick, full, total, step, ratio, fit_steps in table:
        print(f"| {name} | {n / 1e6:.2f}M | {quick:.1f} | {full:.1f} | {ratio:.0f} | {fit_steps} |")
    tiny = [r for r in table if r[0].startswith("zoo_")]
    if tiny and not args.no_cli:
        print(f"\ntiny captioners: median full {statistics.median(r[3] for r in tiny):.1f}s, "
              f"median quick {statistics.median(r[2] for r in tiny):.1f}s (fresh process, start-up included)")


if __name__ == "__main__":
    main()

"""How often a failing check names the right place: per check, the share of the repository's planted
bugs localized to the exact module (or its direct parent) and to the right source line, judged
against ``capdiag.models.planted_sites``, and what localizing costs (traced forwards per failing
check, and their share of the check's time).

    python benchmarks/localization.py            # every planted bug (~2 min on 2 CPU cores)
    python benchmarks/localization.py --quick    # only the bugs quick checks catch
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import time
import warnings

import torch

import capdiag
from capdiag import localize, trace
from capdiag.models import registry, unusual, zoo
from capdiag.models.planted_sites import SITES, judge
from capdiag.registry import get_check
from capdiag.runner import run_check


def cases(quick: bool):
    """(label, site key, subject factory, check)."""
    def zoo_subject(a, b):
        s = capdiag.subject_for(zoo.make(a, b), **zoo.HINTS)
        s.rebuild = lambda: zoo.make(a, b)  # what a model file's build_model() gives the CLI
        return s

    def unusual_subject(p, b):
        m = unusual.build(p, b)
        s = capdiag.subject_for(m, **m.capdiag_hints)
        s.rebuild = lambda: unusual.build(p, b)
        return s

    for bug, (archs, check) in zoo.BUGS.items():
        for a in archs:
            yield f"zoo/{a}/{bug}", f"zoo/{bug}", lambda a=a, b=bug: zoo_subject(a, b), check
    for bug, (archs, checks) in ({} if quick else zoo.LEARNED_BUGS).items():
        for a in archs:
            for check in checks:
                yield f"zoo/{a}/{bug}", f"zoo/{bug}", lambda a=a, b=bug: zoo_subject(a, b), check
    for bug, (pattern, check) in unusual.BUGS.items():
        yield f"unusual/{pattern}/{bug}", f"unusual/{bug}", lambda p=pattern, b=bug: unusual_subject(p, b), check
    for name, bug, check, _ in registry.planted():
        if quick and not get_check(check).cheap:
            continue
        yield f"{name}/{bug}", f"{name}/{bug}", lambda n=name, b=bug: registry.subject(n, b), check


class Cost:
    """Traced forwards (and user builds rerun) and the seconds spent in them, while counting."""

    def __init__(self):
        self.calls, self.seconds = 0, 0.0

    @contextlib.contextmanager
    def patched(self):
        traced, build = trace.traced, localize.traced_build
        cost = self

        @contextlib.contextmanager
        def timed_trace(*args, **kwargs):
            cost.calls += 1
            t = time.perf_counter()
            try:
                with traced(*args, **kwargs) as trace:
                    yield trace
            finally:
                cost.seconds += time.perf_counter() - t

        def timed_build(*args, **kwargs):
            cost.calls += 1
            t = time.perf_counter()
            try:
                return build(*args, **kwargs)
            finally:
                cost.seconds += time.perf_counter() - t

        trace.traced, localize.traced_build = timed_trace, timed_build
        try:
            yield
        finally:
            trace.traced, localize.traced_build = traced, build


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only bugs that quick checks catch")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    per = collections.defaultdict(lambda: [0, 0, 0, 0])  # check -> [failing, module right, line right, localized]
    calls, share = [], []
    start = time.perf_counter()
    for label, key, make, check in cases(args.quick):
        subject = make()
        cost = Cost()
        with warnings.catch_warnings(), cost.patched():
            warnings.simplefilter("ignore")
            f = run_check(subject, get_check(check))
        if not f.status.failed:
            print(f"{label:52s} {check:22s} not failing ({f.status.value}): not judged")
            continue
        module_ok, line_ok = judge(SITES[key], f.location, type(subject.model).__name__)
        row = per[check]
        row[0] += 1
        row[1] += module_ok
        row[2] += line_ok
        row[3] += f.location is not None
        calls.append(cost.calls)
        share.append(cost.seconds / max(f.metrics.get("seconds", 0.0), 1e-9))
        where = f.location.where() if f.location else "-"
        print(f"{label:52s} {check:22s} {'module ok' if module_ok else 'MODULE X '} {'line ok' if line_ok else 'LINE X '}"
              f"  {cost.calls} traced, {cost.seconds:5.2f}s  {where[:110]}", flush=True)
    print("\n| check | failing on planted bugs | localized | exact module (or parent) | right line |")
    print("|---|---|---|---|---|")
    tot = [0, 0, 0, 0]
    for check, (n, m, line, loc) in sorted(per.items()):
        print(f"| `{check}` | {n} | {loc} | {m} | {line} |")
        tot = [a + b for a, b in zip(tot, (n, m, line, loc))]
    print(f"| **total** | {tot[0]} | {tot[3]} ({tot[3] / max(tot[0], 1):.0%}) | **{tot[1]} ({tot[1] / max(tot[0], 1):.0%})** "
          f"| **{tot[2]} ({tot[2] / max(tot[0], 1):.0%})** |")
    calls.sort()
    print(f"\nlocalizing: {calls[len(calls) // 2]} traced forwards or rebuilds per failing check (median, max {calls[-1]}), "
          f"{sorted(share)[len(share) // 2]:.0%} of the check's time (median); {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

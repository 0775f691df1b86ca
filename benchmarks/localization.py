"""How often a failing check names the right place: per check, the share of the repository's planted
bugs localized to the exact module (or its direct parent) and to the right source line, judged
against ``capdiag.testing.planted_sites``, and what localizing costs (traced forwards per failing
check, and their share of the check's time).

    python benchmarks/localization.py            # every planted bug (~1 min on 2 CPU cores)
    python benchmarks/localization.py --quick    # only the bugs quick checks catch
    python benchmarks/localization.py --clean    # false locations: the engine asked directly on clean models
    python benchmarks/localization.py --every-fail   # every check on every twin: FAILs without a location
    python benchmarks/localization.py --json benchmarks/results/localization.json   # feeds docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import time
import warnings

import torch

import capdiag
from capdiag.measure import localize, trace
from capdiag.models import registry
from capdiag.testing import unusual, zoo
from capdiag.testing.planted_sites import SITES, judge
from capdiag.testing import decoding, held_out, strangers
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
    # families written after localization was: held-out twins, decoding twins, the strangers' twins
    for family, mod in (("held_out", held_out), ("decoding", decoding), ("strangers", strangers)):
        for bug, (pattern, check) in mod.BUGS.items():
            if quick and not get_check(check).cheap:
                continue
            yield f"{family}/{pattern}/{bug}", f"{family}/{bug}", lambda m=mod, p=pattern, b=bug: family_subject(m, p, b), check


def family_subject(mod, pattern, bug=None, seed=0):
    m = mod.build(pattern, bug, seed=seed)
    s = capdiag.subject_for(m, seed=seed, **m.capdiag_hints)
    s.rebuild = lambda: mod.build(pattern, bug, seed=seed)
    return s


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


def origins_asked(s) -> list:
    """Every traced-origin question (``capdiag.measure.origins``) asked of a clean model: each answer is false."""
    from capdiag.measure.localize import where_probabilities
    from capdiag.measure.origins import carried_state, image_substitute, input_write, random_draw, stuck_positions, unmatched_load
    from capdiag.measure.trace import trace_call

    cap, found = s.captioner, []
    calls = [(False, False), (True, False)] + ([(False, True)] if cap.has_generate else [])
    for train, gen in calls:
        what = f"{'generate' if gen else 'forward'} ({'train' if train else 'eval'})"
        t = trace_call(cap, s.images.clone(), s.captions.clone(), train, s.seed, protect=False, generate=gen)
        for name, loc in (("random draw", None if train else random_draw(t, cap.model)),
                          ("input write", input_write(t, cap.model)),
                          ("mode switch", next((sw for sw in t.switches if sw.training != t.training), None)),
                          ("stuck positions", stuck_positions(t, cap.model, trace_call(cap, s.images, s.captions))
                           if gen else None)):
            if loc is not None:
                found.append(f"{name} in {what}: {loc}")
        if gen:
            fwd = trace_call(cap, s.images, s.captions, seed=s.seed)
            loc = image_substitute(fwd, t, cap.model)
            if loc is not None:
                found.append(f"image substitute in generate: {loc.where()}")
    loc = where_probabilities(cap, s.images, s.captions, s.seed)
    if loc is not None:
        found.append(f"probabilities into the loss: {loc.where()}")
    for gen in (False, True) if cap.has_generate else (False,):
        loc = carried_state(cap, (s.images.roll(1, 0).flip(-1), s.captions.flip(0)), (s.images, s.captions), gen)
        if loc is not None:
            found.append(f"carried state ({'generate' if gen else 'forward'}): {loc.where()}")
    if s.rebuild is not None:
        loc = unmatched_load(trace.traced_build(s.rebuild)[2], "")
        if loc is not None:
            found.append(f"unmatched load: {loc.where()}")
    return found


def clean_sweep(seeds: int = 2, json_path=None) -> int:
    """Ask the engine directly, on clean models, where a caption token (3 positions, eval and train
    mode) or the image (forward and generate) stops mattering: every answer is a false location."""
    from capdiag.measure.localize import dependence_dies, where_image_dies
    from capdiag.measure.probe import replace_tokens
    from capdiag.measure.trace import trace_pair
    from capdiag.measure.violations import at_position

    subjects = [(f"unusual/{p}/seed{sd}", lambda p=p, sd=sd: (lambda m: capdiag.subject_for(m, seed=sd, **m.capdiag_hints))(
        unusual.build(p, None, seed=sd))) for p in unusual.PATTERNS for sd in range(seeds)]
    subjects += [(f"reference/{n}", lambda n=n: registry.subject(n)) for n in registry.list_models()]
    subjects += [(f"zoo/{a}", lambda a=a: capdiag.subject_for(zoo.make(a), **zoo.HINTS)) for a in zoo.ARCHS]
    for family, mod in (("strangers", strangers), ("decoding", decoding), ("held_out", held_out)):
        subjects += [(f"{family}/{p}/seed{sd}", lambda m=mod, p=p, sd=sd: family_subject(m, p, None, sd))
                     for p in mod.PATTERNS for sd in range(seeds)]
    false = 0
    for label, make in subjects:
        s = make()
        cap, T = s.captioner, s.captions.shape[1]
        found = origins_asked(s)
        shortest = int(cap.lengths(s.captions).min())
        for t in sorted({1, max(1, (shortest - 1) // 2), max(1, shortest - 2)}):
            where = torch.zeros_like(s.captions, dtype=torch.bool)
            where[:, t] = True
            caps = replace_tokens(cap, s.captions, where, torch.Generator().manual_seed(s.seed + 1))
            for train in (False, True):
                a, b = trace_pair(cap, (s.images, s.captions), (s.images, caps), train, s.seed)
                op, how = dependence_dies(a, b, at_position(t, T, 1e-6), moved=at_position(t, T, 0.0))
                if op is not None or how == "unread":
                    found.append(f"caption token {t} ({'train' if train else 'eval'}): {how}")
        for gen in (False, True) if cap.has_generate else (False,):
            loc = where_image_dies(cap, s.images, s.captions, s.seed, generate=gen)
            if loc is not None:
                found.append(f"image ({'generate' if gen else 'forward'}): {loc.where()}")
        false += bool(found)
        print(f"clean {label:45s} {'FALSE LOCATION ' + '; '.join(found) if found else 'none'}", flush=True)
    print(f"\n{false} of {len(subjects)} clean models got a false location")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"clean_models": len(subjects), "false_locations": false, "seeds": seeds}, fh, indent=1)
    return false


def every_fail(json_path=None) -> int:
    """Every failing finding carries a location: all checks on every planted twin (the quick checks where
    a structural bug is planted, the full suite where a learned one is), by the kind of location."""
    import false_alarms as fa
    from capdiag.finding import Status

    cases = list(fa.planted_cases(True)) + [
        (f"held_out/{b}", lambda p=p, b=b: family_subject(held_out, p, b), [c]) for b, (p, c) in held_out.BUGS.items()]
    kinds, missing, n = collections.Counter(), [], 0
    for label, make, checks in cases:
        learned = any(not get_check(c).cheap for c in checks)
        for f in fa.run(make(), fa.ALL if learned else fa.QUICK).findings:
            if f.status is Status.FAIL:
                n += 1
                if f.location is None:
                    missing.append(f"{label}: {f.check}")
                else:
                    kinds[f.location.kind or "(no kind)"] += 1
    print(f"{n} failing findings on {len(cases)} planted twins; without a location: {len(missing)}; by kind: {dict(kinds)}")
    for m in missing:
        print("  no location:", m)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"failing": n, "twins": len(cases), "without_location": len(missing), "kinds": dict(kinds)}, fh, indent=1)
    return len(missing)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only bugs that quick checks catch")
    ap.add_argument("--clean", action="store_true", help="count false locations on clean models instead")
    ap.add_argument("--every-fail", action="store_true", help="all checks on every planted twin: FAILs without a location")
    ap.add_argument("--json", help="write the results here (benchmarks/results/localization*.json feed docs/benchmarks.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.every_fail:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return every_fail(json_path=args.json)
    if args.clean:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return clean_sweep(json_path=args.json)
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
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": {c: dict(zip(("failing", "module", "line", "localized"), v)) for c, v in sorted(per.items())},
                       "traced_median": calls[len(calls) // 2], "traced_max": calls[-1],
                       "share_median": round(sorted(share)[len(share) // 2], 3), "quick": args.quick,
                       "seconds": round(time.perf_counter() - start)}, fh, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())

"""False alarms on clean captioners and recall on planted bugs, per check, measured in one run.

Clean: every pattern of ``capdiag.testing.unusual`` and of ``capdiag.testing.strangers`` (written the way
people write captioners, not the way capdiag's references are) x ``--seeds`` seeds, and the five
reference families, each
through the full suite. A false alarm is a ``fail`` or ``error`` on a clean model; warnings are
counted apart. Planted: every bug twin in the repository (the zoo's structural and learned bugs,
the references' twins, the unusual and stranger families' twins), each judged by the check that names it
(``caught`` = that check fails); the other checks that also fail are listed as collateral.

    python benchmarks/false_alarms.py               # everything (~30 min on 2 CPU cores)
    python benchmarks/false_alarms.py --seeds 1 --no-references --json out.json
    python benchmarks/false_alarms.py --seeds 1 --json benchmarks/results/false_alarms.json   # docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import collections
import json
import time
import warnings

import torch

import capdiag
from capdiag.finding import Status
from capdiag.models import registry
from capdiag.testing import unusual, zoo
from capdiag.testing import decoding, strangers
from capdiag.registry import get_check, list_checks

ALL = [c.name for c in list_checks()]
QUICK = [c.name for c in list_checks() if c.cheap]


def run(subject, checks):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capdiag.run_checks(subject, checks)


def unusual_subject(name, bug=None, seed=0):
    m = unusual.build(name, bug, seed=seed)
    return capdiag.subject_for(m, seed=seed, **m.capdiag_hints)


def stranger_subject(name, bug=None, seed=0):
    m = strangers.build(name, bug, seed=seed)
    return capdiag.subject_for(m, seed=seed, **m.capdiag_hints)


def decoding_subject(name, bug=None, seed=0):
    m = decoding.build(name, bug, seed=seed)
    return capdiag.subject_for(m, seed=seed, **m.capdiag_hints)


def clean_cases(seeds, references, families=("unusual", "strangers", "decoding")):
    for name in (decoding.PATTERNS if "decoding" in families else ()):
        for seed in range(seeds):
            yield f"decoding/{name}/seed{seed}", lambda n=name, s=seed: decoding_subject(n, seed=s)
    for name in (strangers.PATTERNS if "strangers" in families else ()):
        for seed in range(seeds):
            yield f"strangers/{name}/seed{seed}", lambda n=name, s=seed: stranger_subject(n, seed=s)
    for name in (unusual.PATTERNS if "unusual" in families else ()):
        for seed in range(seeds):
            yield f"unusual/{name}/seed{seed}", lambda n=name, s=seed: unusual_subject(n, seed=s)
    for name in (registry.list_models() if references else ()):
        yield f"reference/{name}", lambda name=name: registry.subject(name)


def planted_cases(references):
    """(label, subject factory, checks that must fail)."""
    for bug, (archs, check) in zoo.BUGS.items():
        for arch in archs:
            yield f"zoo/{arch}/{bug}", lambda a=arch, b=bug: capdiag.subject_for(zoo.make(a, b), **zoo.HINTS), (check,)
    for bug, (archs, checks) in zoo.LEARNED_BUGS.items():
        for arch in archs:
            yield f"zoo/{arch}/{bug}", lambda a=arch, b=bug: capdiag.subject_for(zoo.make(a, b), **zoo.HINTS), checks
    for bug, (pattern, check) in unusual.BUGS.items():
        yield f"unusual/{pattern}/{bug}", lambda p=pattern, b=bug: unusual_subject(p, b), (check,)
    for bug, (pattern, check) in strangers.BUGS.items():
        yield f"strangers/{pattern}/{bug}", lambda p=pattern, b=bug: stranger_subject(p, b), (check,)
    for bug, (pattern, check) in decoding.BUGS.items():
        yield f"decoding/{pattern}/{bug}", lambda p=pattern, b=bug: decoding_subject(p, b), (check,)
    for name, bug, check, _ in (registry.planted() if references else ()):
        yield f"reference/{name}/{bug}", lambda n=name, b=bug: registry.subject(n, b), (check,)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-references", action="store_true", help="skip the five reference families")
    ap.add_argument("--only", choices=("clean", "planted"), help="run one half")
    ap.add_argument("--families", default="unusual,strangers,decoding", help="clean families besides the references")
    ap.add_argument("--json", help="write every finding's status here")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    refs = not args.no_references
    out = {"clean": {}, "planted": {}}
    false_alarms, warns, clean_runs = collections.Counter(), collections.Counter(), collections.Counter()
    start = time.perf_counter()
    if args.only != "planted":
        for label, make in clean_cases(args.seeds, refs, tuple(args.families.split(","))):
            t = time.perf_counter()
            try:
                report = run(make(), ALL)
            except Exception as e:  # noqa: BLE001 - capdiag refusing a clean model is a false alarm too
                false_alarms["(loading)"] += 1
                out["clean"][label] = {"(loading)": f"{type(e).__name__}: {e}"}
                print(f"clean   {label:52s} REFUSED {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            statuses = {f.check: f.status.value for f in report.findings}
            out["clean"][label] = statuses
            bad = []
            for f in report.findings:
                clean_runs[f.check] += f.status is not Status.SKIP
                if f.status.failed:
                    false_alarms[f.check] += 1
                    bad.append(f"{f.check}: {f.summary[:160]}")
                elif f.status is Status.WARN:
                    warns[f.check] += 1
            print(f"clean   {label:52s} {time.perf_counter() - t:6.1f}s  {'OK' if not bad else 'FALSE ALARM ' + ' | '.join(bad)}",
                  flush=True)
    caught, total, collateral = collections.Counter(), collections.Counter(), collections.defaultdict(list)
    if args.only != "clean":
        for label, make, checks in planted_cases(refs):
            t = time.perf_counter()
            learned = any(not get_check(c).cheap for c in checks)
            report = run(make(), ALL if learned else QUICK)
            statuses = {f.check: f.status for f in report.findings}
            out["planted"][label] = {"expected": list(checks), "statuses": {k: v.value for k, v in statuses.items()}}
            hit = [c for c in checks if statuses[c] is Status.FAIL]
            for c in checks:
                total[c] += 1
                caught[c] += c in hit
            others = sorted(c for c, st in statuses.items() if st.failed and c not in checks)
            if others:
                collateral[label] = others
            ok = len(hit) == len(checks)
            print(f"planted {label:52s} {time.perf_counter() - t:6.1f}s  {'caught by ' + ', '.join(checks) if ok else 'MISSED by ' + ', '.join(c for c in checks if c not in hit)}"
                  f"{'  (also: ' + ', '.join(others) + ')' if others else ''}", flush=True)
    print("\n| check | clean runs judged | false alarms | warnings | planted bugs caught / named |")
    print("|---|---|---|---|---|")
    for c in ALL + (["(loading)"] if false_alarms["(loading)"] else []):
        planted = f"{caught[c]} / {total[c]}" if total[c] else "-"
        print(f"| `{c}` | {clean_runs[c]} | {false_alarms[c]} | {warns[c]} | {planted} |")
    n_clean = len(out["clean"])
    print(f"| **total** | {n_clean} models | **{sum(false_alarms.values())}** | {sum(warns.values())} | "
          f"**{sum(caught.values())} / {sum(total.values())}** |")
    print(f"\n{n_clean} clean models, {len(out['planted'])} planted bugs, {time.perf_counter() - start:.0f} s")
    if collateral:
        print("collateral (other checks failing on a planted bug):", dict(collateral))
    if args.json:  # docs/benchmarks.md's table is rendered from this file (benchmarks/docs.py)
        out["meta"] = {"seeds": args.seeds, "references": refs, "families": args.families, "only": args.only,
                       "seconds": round(time.perf_counter() - start), "torch_threads": torch.get_num_threads()}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0 if not sum(false_alarms.values()) and sum(caught.values()) == sum(total.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

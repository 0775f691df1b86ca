"""Render docs/benchmarks.md's tables from the results the benchmarks wrote, so its numbers are the
benchmarks' own output and cannot drift from them.

Each generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``;
``NAME`` is a renderer below, fed by ``benchmarks/results/NAME.json`` (written by the benchmark's
``--json``). ``tests/test_docs.py`` fails when a block differs from what its results render to.

    python benchmarks/docs.py           # rewrite the blocks from the results
    python benchmarks/docs.py --check   # exit 1 when a block is stale
"""
from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated: \2 -->)", re.S)


def false_alarms(data: dict) -> str:
    """The per-check table of ``false_alarms.py --json``: clean runs judged (not skipped), false alarms
    (fail or error on a clean model), warnings, and planted bugs caught by the check that names them."""
    judged, false, warned = collections.Counter(), collections.Counter(), collections.Counter()
    order = []
    for statuses in data["clean"].values():
        for check, status in statuses.items():
            if check not in order:
                order.append(check)
            judged[check] += status != "skip"
            false[check] += status in ("fail", "error")
            warned[check] += status == "warn"
    caught, named = collections.Counter(), collections.Counter()
    for case in data["planted"].values():
        for check in case["expected"]:
            named[check] += 1
            caught[check] += case["statuses"].get(check) == "fail"
    meta = data.get("meta", {})
    lines = [f"`python benchmarks/false_alarms.py --seeds {meta.get('seeds', '?')} --json "
             f"benchmarks/results/false_alarms.json`: {len(data['clean'])} clean models, {len(data['planted'])} planted "
             f"bugs, {meta.get('seconds', '?')} s.", "",
             "| check | clean runs judged | false alarms | warnings | planted bugs caught / named |", "|---|---|---|---|---|"]
    for c in order:
        lines.append(f"| `{c}` | {judged[c]} | {false[c]} | {warned[c]} | {f'{caught[c]} / {named[c]}' if named[c] else '-'} |")
    lines.append(f"| **total** | {len(data['clean'])} models | **{sum(false.values())}** | {sum(warned.values())} | "
                 f"**{sum(caught.values())} / {sum(named.values())}** |")
    return "\n".join(lines) + "\n"


def localization(data: dict) -> str:
    """The per-check table of ``localization.py --json``."""
    lines = ["| check | failing on planted bugs | localized | exact module (or parent) | right line |", "|---|---|---|---|---|"]
    tot = collections.Counter()
    for check, r in data["rows"].items():
        lines.append(f"| `{check}` | {r['failing']} | {r['localized']} | {r['module']} | {r['line']} |")
        tot.update(r)
    n = max(tot["failing"], 1)
    lines.append(f"| **total** | {tot['failing']} | {tot['localized']} ({tot['localized'] / n:.0%}) | "
                 f"**{tot['module']} ({tot['module'] / n:.0%})** | **{tot['line']} ({tot['line'] / n:.0%})** |")
    lines += ["", f"Localizing: {data['traced_median']} traced calls or rebuilds per failing check (median, max "
              f"{data['traced_max']}), {data['share_median']:.0%} of the failing check's time (median); "
              f"{data['seconds']} s for the whole run."]
    return "\n".join(lines) + "\n"


def localization_clean(data: dict) -> str:
    return (f"`python benchmarks/localization.py --clean --json benchmarks/results/localization_clean.json`: "
            f"**{data['false_locations']} of {data['clean_models']} clean models** got a false location "
            f"({data['seeds']} seeds per family).\n")


def localization_every_fail(data: dict) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(data["kinds"].items(), key=lambda kv: -kv[1]))
    return (f"`python benchmarks/localization.py --every-fail --json benchmarks/results/localization_every_fail.json`: "
            f"every check on {data['twins']} planted twins gave {data['failing']} failing findings; "
            f"**{data['without_location']} without a location** ({kinds}).\n")


def vlm_suite(data: dict) -> str:
    """Per check: clean vision-language runs judged (not skipped), false alarms, warnings, and twins caught."""
    judged, false, warned = collections.Counter(), collections.Counter(), collections.Counter()
    order = []
    for st in data["clean"].values():
        for check, status in st.items():
            order += [check] if check not in order else []
            judged[check] += status != "skip"
            false[check] += status in ("fail", "error")
            warned[check] += status == "warn"
    named, caught = collections.Counter(), collections.Counter()
    for check, status in data["twins"].values():
        named[check] += 1
        caught[check] += status == "fail"
    rows = [f"`{data['command']}`: {len(data['clean'])} clean runs (9 families, float32 and bfloat16, and LoRA "
            "adapters that train the projector), "
            f"{len(data['twins'])} twins, {data['seconds']} s.", "",
            "| check | clean runs judged | false alarms | warnings | twins caught / named |", "|---|---|---|---|---|"]
    rows += [f"| `{c}` | {judged[c]} | {false[c]} | {warned[c]} | {caught[c]} / {named[c]} |" for c in order]
    return "\n".join(rows) + "\n"


RENDER = {"vlm_suite": vlm_suite, "false_alarms": false_alarms, "localization": localization, "localization_clean": localization_clean,
          "localization_every_fail": localization_every_fail}


def rendered(text: str) -> str:
    """``text`` with every generated block rendered from its results."""
    def sub(m):
        name = m.group(2)
        data = json.loads((RESULTS / f"{name}.json").read_text())
        return m.group(1) + RENDER[name](data) + m.group(4)

    return BLOCK.sub(sub, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a generated block is stale")
    args = ap.parse_args(argv)
    text = DOC.read_text()
    new = rendered(text)
    if args.check:
        return int(new != text)
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run checks on a subject; one failing or crashing check never hides the others."""
from __future__ import annotations

import contextlib
import dataclasses
import time
import traceback
from typing import Callable, Iterable, Optional

from .usercode import user_site
from .check import Check, Subject
from .errors import ModelCallError, NonFiniteOutput
from .finding import MODEL_RAISED, Finding, Location, Report, Status
from .registry import fallback_locator, get_check
from .state import preserved_state


def run_check(subject: Subject, check: Check) -> Finding:
    """Run one check inside ``preserved_state``. An exception raised in the user's code (or a broken
    contract) becomes a ``fail`` naming the call and the user's line; one raised by capdiag itself an
    ``error``."""
    start = time.perf_counter()
    if subject.kind not in check.subjects:
        return check.skip(f"does not apply to {subject.kind} captioners")
    try:
        with contextlib.nullcontext() if check.reads_only(subject) else preserved_state(subject.model):
            finding = check.run(subject)
            if finding.status is Status.FAIL and finding.location is None:
                finding = dataclasses.replace(finding, location=_called_from(subject, check))
    except KeyboardInterrupt:
        raise
    except NonFiniteOutput as e:
        finding = Finding(
            check.name, Status.FAIL, str(e), {}, {},
            "Fix the non-finite values first (log/sqrt/division near zero, overflow in half precision, "
            "uninitialized weights); this check cannot judge a model whose outputs are NaN/inf.",
        )
        finding = dataclasses.replace(finding, location=_called_from(subject, check, "forward"))
    except Exception as e:  # noqa: BLE001 - a crashing check is itself a result
        site = user_site(e)
        if site is not None or isinstance(e, ModelCallError):  # the model raised or broke the contract: a finding
            finding = Finding(
                check.name, Status.FAIL, site.describe(e) if site else f"the model broke the contract: {e}", {},
                {"traceback": traceback.format_exc(), MODEL_RAISED: _cause(e, site)},
                "Your model raised while capdiag called it the documented way (see the README's model-file "
                "contract); fix the line above, or rerun with --debug for the traceback.",
                Location(f"({site.call})", site.file, site.line, f"origin: {type(e).__name__} raised here",
                         site.code) if site and site.file else None,
            )
            return _timed(finding, start)
        where = traceback.extract_tb(e.__traceback__)[-1]
        finding = Finding(
            check.name,
            Status.ERROR,
            f"check raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            {},
            {"traceback": traceback.format_exc()},
            f"raised at {where.filename}:{where.lineno}; rerun with --debug for the traceback",
        )
    return _timed(finding, start)


def _called_from(subject: Subject, check: Check, method: Optional[str] = None) -> Optional[Location]:
    """A failing finding no traced operation located: the user's method the check judged (its
    ``calls``, or ``method``), so that every FAIL names a place in the user's code."""
    locator = fallback_locator()
    if locator is None or subject.kind != "captioner":
        return None
    try:
        method = method or check.calls
        return locator(subject.captioner, subject.images, method, f"{check.name} failed on what {method}() returned")
    except Exception:  # noqa: BLE001 - a location is a courtesy; the verdict stands without it
        return None


def _cause(e: BaseException, site) -> tuple:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (type(e).__name__, msg, site.where if site else "")


def _blocked(finding: Finding, first: Finding) -> Finding:
    """A check that hit the exception an earlier check already reported: SKIP, naming that check."""
    return Finding(finding.check, Status.SKIP, f"blocked by {first.check}: {first.summary}",
                   {"seconds": finding.metrics.get("seconds", 0.0)}, {MODEL_RAISED: finding.artifacts[MODEL_RAISED]})


def _timed(finding: Finding, start: float) -> Finding:
    metrics = dict(finding.metrics)
    metrics["seconds"] = time.perf_counter() - start
    return dataclasses.replace(finding, metrics=metrics)


def run_checks(
    subject: Subject,
    checks: Iterable,
    on_finding: Optional[Callable[[Finding], None]] = None,
    report: Optional[Report] = None,
) -> Report:
    """Run checks (names or ``Check`` objects) in order and collect a ``Report``."""
    report = report or Report(model_name=subject.name)
    raised: dict = {}  # the model's own exceptions so far -> the finding that reported it
    for c in checks:
        check = get_check(c) if isinstance(c, str) else c
        finding = run_check(subject, check)
        cause = finding.artifacts.get(MODEL_RAISED) if finding.status is Status.FAIL else None
        if cause is not None:  # the same exception of the model is reported once, by the first check
            finding = _blocked(finding, raised[cause]) if cause in raised else raised.setdefault(cause, finding)
        report.findings.append(finding)
        if on_finding is not None:
            on_finding(finding)
    return report

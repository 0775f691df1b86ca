"""Run checks on a subject; one failing or crashing check never hides the others."""
from __future__ import annotations

import contextlib
import dataclasses
import time
import traceback
from typing import Callable, Iterable, Optional

from .blame import user_site
from .check import Check, Subject
from .errors import ModelCallError
from .finding import Finding, Report, Status
from .probe import NonFiniteOutput
from .registry import get_check
from .state import preserved_state


def run_check(subject: Subject, check: Check) -> Finding:
    """Run one check inside ``preserved_state``. An exception raised in the user's code (or a broken
    contract) becomes a ``fail`` naming the call and the user's line; one raised by capdiag itself an
    ``error``."""
    start = time.perf_counter()
    try:
        with contextlib.nullcontext() if check.reads_only(subject) else preserved_state(subject.model):
            finding = check.run(subject)
    except KeyboardInterrupt:
        raise
    except NonFiniteOutput as e:
        finding = Finding(
            check.name, Status.FAIL, str(e), {}, {},
            "Fix the non-finite values first (log/sqrt/division near zero, overflow in half precision, "
            "uninitialized weights); this check cannot judge a model whose outputs are NaN/inf.",
        )
    except Exception as e:  # noqa: BLE001 - a crashing check is itself a result
        site = user_site(e)
        if site is not None or isinstance(e, ModelCallError):  # the model raised or broke the contract: a finding
            finding = Finding(
                check.name, Status.FAIL, site.describe(e) if site else f"the model broke the contract: {e}", {},
                {"traceback": traceback.format_exc()},
                "Your model raised while capdiag called it the documented way (see the README's model-file "
                "contract); fix the line above, or rerun with --debug for the traceback.",
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
    report = report or Report(model_name=subject.captioner.name)
    for c in checks:
        check = get_check(c) if isinstance(c, str) else c
        finding = run_check(subject, check)
        report.findings.append(finding)
        if on_finding is not None:
            on_finding(finding)
    return report

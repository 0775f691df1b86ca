"""Terminal rendering of findings: one line per check, cause and fix under anything not passing."""
from __future__ import annotations

import os
import shutil
import sys
import textwrap
from typing import Optional, TextIO

from ..finding import Finding, Report, Status

_COLORS = {
    Status.PASS: "32", Status.WARN: "33", Status.FAIL: "31", Status.SKIP: "90", Status.ERROR: "35",
}


def use_color(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR")


def _badge(status: Status, color: bool) -> str:
    text = f"{status.value.upper():<5}"
    return f"\033[1;{_COLORS[status]}m{text}\033[0m" if color else text


def format_finding(f: Finding, color: bool = False, width: int = 0) -> str:
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 120)
    secs = f.metrics.get("seconds")
    timing = f"  ({secs:.2f}s)" if isinstance(secs, float) else ""
    head = f"{_badge(f.status, color)} {f.check:<24} "
    body = textwrap.wrap(f.summary + timing, width=max(width - 31, 40))
    lines = [head + (body[0] if body else "")] + [" " * 31 + b for b in body[1:]]
    if f.location is not None:
        wrap = max(width - 37, 40)
        at = textwrap.wrap(f.location.where(), width=wrap) + textwrap.wrap(f.location.said(), width=wrap)
        lines += [" " * 31 + ("at:   " if i == 0 else "      ") + b for i, b in enumerate(at)]
    if f.status in (Status.FAIL, Status.WARN, Status.ERROR) and f.hint:
        for i, b in enumerate(textwrap.wrap(f.hint, width=max(width - 37, 40))):
            lines.append(" " * 31 + ("fix:  " if i == 0 else "      ") + b)
    return "\n".join(lines)


def print_header(title: str, assumptions: list, stream: Optional[TextIO] = None, data: str = "",
                 change: str = "set CAPDIAG hints in the model file") -> None:
    stream = stream or sys.stdout
    print(title, file=stream)
    if data:
        print(f"data: {data}", file=stream)
    if assumptions:
        print(f"assumed ({change} to change):", file=stream)
        for a in assumptions:
            print(f"  - {a}", file=stream)
    print(file=stream)


def print_summary(report: Report, seconds: float, stream: Optional[TextIO] = None) -> None:
    stream = stream or sys.stdout
    c = report.counts()
    parts = [f"{c[s.value]} {word}" for s, word in (
        (Status.PASS, "passed"), (Status.FAIL, "failed"), (Status.WARN, "warned"),
        (Status.ERROR, "errored"), (Status.SKIP, "skipped"),
    ) if c[s.value]]
    print(f"\n{len(report.findings)} checks: {', '.join(parts)} in {seconds:.1f}s", file=stream)
    failed = [f.check for f in report.findings if f.status.failed]
    if failed:
        print(f"failed: {', '.join(failed)}", file=stream)
    raised = report.model_exception()
    if raised is not None:
        n = sum(1 for f in report.findings if f.status is Status.SKIP and f.summary.startswith("blocked by "))
        print(f"cause: {raised.summary} (reported by {raised.check}; {n} more checks blocked by it)", file=stream)

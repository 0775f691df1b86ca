"""Plain data: Status, Finding, Report. No torch, no logic beyond aggregation."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional


MODEL_RAISED = "model_raised"  # artifact key: the model's own exception, as (type, message, user line)


class Status(str, enum.Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"
    ERROR = "error"

    @property
    def failed(self) -> bool:
        return self in (Status.FAIL, Status.ERROR)


# How far a location's evidence reaches: the operation (or line) that causes the problem; the first
# operation where it shows (a traced comparison: the cause may sit upstream in plain Python); the
# user's method that capdiag called and that misbehaved, where nothing inside it could be traced.
ORIGIN, SYMPTOM, CALLED = "origin", "first symptom", "called from"
KINDS = (ORIGIN, SYMPTOM, CALLED)


@dataclass(frozen=True)
class Location:
    """Where a failing check's problem starts: the module (dotted name as in ``named_modules()``) and,
    when known, the line of the user's code that ran the offending operation."""

    module: str
    file: Optional[str] = None
    line: Optional[int] = None
    evidence: str = ""  # what was seen there, one short statement
    code: Optional[str] = None  # the source line itself
    kind: str = ""  # ORIGIN, SYMPTOM or CALLED: how far the evidence traced the problem

    def said(self) -> str:
        """The evidence line, led by its kind: ``origin: torch.multinomial samples in eval mode``."""
        if not self.kind or self.evidence.startswith(KINDS):
            return self.evidence
        return f"{self.kind}: {self.evidence}"

    def where(self) -> str:
        """``decoder.layers.0.self_attn (model.py:57: h = self.decoder(x, memory))``"""
        if not self.file:
            return self.module
        src = f": {self.code}" if self.code else ""
        return f"{self.module} ({Path(self.file).name}:{self.line}{src})"

    def to_dict(self) -> dict:
        return {"module": self.module, "file": self.file, "line": self.line, "evidence": self.evidence,
                "code": self.code, "kind": self.kind}


@dataclass(frozen=True)
class Finding:
    """The result of one check on one model.

    Attributes:
        check: registry key of the check that produced it.
        status: pass / warn / fail / skip / error.
        summary: one sentence, with the number that decided it.
        metrics: scalars (go to JSON and TensorBoard).
        artifacts: detached CPU tensors, paths of written plots, small lists for reports.
        hint: likely cause and what to try next (empty on pass).
        location: where the problem starts (failing findings of checks that can localize; None
            when unknown, and always on a pass).
    """

    check: str
    status: Status
    summary: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    artifacts: Mapping[str, Any] = field(default_factory=dict)
    hint: str = ""
    location: Optional[Location] = None

    def to_dict(self) -> dict:
        files = {k: str(v) for k, v in self.artifacts.items() if k.endswith("_png") or k.endswith("_path")}
        return {
            "check": self.check,
            "status": self.status.value,
            "summary": self.summary,
            "metrics": {k: _jsonable(v) for k, v in self.metrics.items()},
            "hint": self.hint,
            "location": self.location.to_dict() if self.location else None,
            "files": files,
        }


def _jsonable(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if f != f or f in (float("inf"), float("-inf")):
        return str(f)  # JSON has no NaN/inf; keep them visible as strings
    return f


@dataclass
class Report:
    """All findings of one run, plus what capdiag had to assume about the model."""

    findings: list[Finding] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    model_name: str = ""
    device: str = ""
    precision: str = ""  # the dtype the checks ran in (float32, bfloat16, ...)
    weights: str = ""  # the checkpoint loaded into the model, if any
    data: str = ""  # the user's data the checks drew their batches from (--data), in words; "" for synthetic
    how_to_change: str = "set CAPDIAG hints in the model file"  # what changes the assumptions, in words

    @property
    def failed(self) -> bool:
        return any(f.status.failed for f in self.findings)

    def model_exception(self) -> Optional[Finding]:
        """The finding that reported the model's own exception, when later checks were blocked by it
        (``runner.run_checks`` reports one exception once and SKIPs the checks it blocks)."""
        firsts = [f for f in self.findings if f.status is Status.FAIL and MODEL_RAISED in f.artifacts]
        blocked = [f for f in self.findings if f.status is Status.SKIP and MODEL_RAISED in f.artifacts]
        return firsts[0] if firsts and blocked else None

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for f in self.findings:
            out[f.status.value] += 1
        return out

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "device": self.device,
            "precision": self.precision,
            "weights": self.weights or None,
            "data": self.data or None,
            "assumptions": list(self.assumptions),
            "counts": self.counts(),
            "checks": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class Flag:
    """A flag raised at ``step``: its kind and the finding behind it (unpacks as step, kind, message)."""

    step: int
    kind: str  # image_ignored, image_starved, nonfinite, drift
    finding: Finding

    @property
    def message(self) -> str:
        return self.finding.summary

    def __iter__(self):
        return iter((self.step, self.kind, self.message))

"""Whose exception is it? A model that raises during a check is a finding about the model; only an
exception raised by capdiag's own code is a capdiag error.

The traceback decides: after the innermost frame of capdiag's engine or checks, a frame of any
code that is neither capdiag nor a library capdiag itself calls (torch, captum, numpy, the
standard library, ...) belongs to the user's model (their file, ``capdiag.models``, or a library
model such as transformers that they handed to capdiag).
"""
from __future__ import annotations

import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

_HERE = Path(__file__).resolve().parent


def _dirs(names) -> tuple:
    import importlib.util

    out = []
    for n in names:
        spec = importlib.util.find_spec(n)
        if spec is not None and spec.origin:
            out.append(str(Path(spec.origin).resolve().parent))
    return tuple(out)


_OURS: Optional[tuple] = None
_LIBS: Optional[tuple] = None


def _roots() -> tuple:
    global _OURS, _LIBS
    if _OURS is None:
        _OURS = (str(_HERE) + "/",) + tuple(d + "/" for d in _dirs(["capdiag.checks"]))
        libs = _dirs(["torch", "captum", "numpy", "matplotlib", "nltk", "tqdm", "torchvision"])
        stdlib = str(Path(sysconfig.get_paths()["stdlib"]).resolve())
        _LIBS = tuple(d + "/" for d in libs) + (stdlib + "/",)
    return _OURS, _LIBS


def _resolved(filename: str) -> str:
    try:
        return str(Path(filename).resolve())
    except (OSError, RuntimeError):  # pragma: no cover
        return filename


@dataclass(frozen=True)
class UserSite:
    call: str  # the user's function capdiag called (forward, generate, loss_fn, ...)
    where: str  # file:line in func: code, of the innermost user frame
    file: str = ""
    line: int = 0
    code: str = ""

    def describe(self, exc: BaseException) -> str:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{self.call}() raised {type(exc).__name__}: {msg} (at {self.where})"


def user_site(exc: BaseException) -> Optional[UserSite]:
    """The user's code that raised ``exc``, or None when capdiag (or a library it called) did."""
    ours, libs = _roots()
    frames = traceback.extract_tb(exc.__traceback__)
    # capdiag.testing's fixtures (strangers, the convention matrix) stand in for a user's models: theirs.
    fixtures = str(_HERE / "testing") + "/"
    paths = [_resolved(f.filename) for f in frames]
    paths = ["<fixture>" + p if p.startswith(fixtures) else p for p in paths]
    # The frame the runner calls is the check's own code, wherever the check is defined.
    checks_own = {i + 1 for i, (f, p) in enumerate(zip(frames, paths)) if f.name == "run_check" and p.startswith(ours)}
    last_ours = max((i for i, p in enumerate(paths) if p.startswith(ours) or i in checks_own), default=-1)
    user = [f for f, p in zip(frames[last_ours + 1 :], paths[last_ours + 1 :])
            if not p.startswith(ours) and not p.startswith(libs) and (p.startswith("<fixture>") or not f.filename.startswith("<"))]
    if not user:
        return None
    inner = user[-1]
    code = f": {inner.line.strip()}" if inner.line else ""
    return UserSite(user[0].name, f"{inner.filename}:{inner.lineno} in {inner.name}{code}", inner.filename,
                    inner.lineno or 0, (inner.line or "").strip())

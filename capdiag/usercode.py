"""Whose code is it? The one rule every part of capdiag uses to tell the user's code from capdiag's
and the libraries'.

A file is the user's unless it belongs to capdiag's engine or checks, torch, torchvision, captum,
numpy, matplotlib, nltk, tqdm or the standard library. capdiag's reference models
(``capdiag.models``) and test fixtures (``capdiag.testing``) stand in for a user's model files, so
they are the user's. Installed packages (site-packages: transformers, timm, ...) are a parameter:

- ``installed=True``: an exception raised inside a transformers model the user handed to capdiag
  is the model's (``user_site``: the runner reports it as a finding, not a capdiag error);
- ``installed=False``: a traced operation inside transformers is named by the user's line that
  called it (``user_frame``: localization points at the user's file).
"""
from __future__ import annotations

import sys
import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

_HERE = Path(__file__).resolve().parent


def _dirs(names) -> tuple:
    """The folders of importable packages ``names`` (those not installed are left out)."""
    import importlib.util

    out = []
    for n in names:
        try:
            spec = importlib.util.find_spec(n)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin:
            out.append(str(Path(spec.origin).resolve().parent))
    return tuple(d + "/" for d in out)


_ROOTS: Optional[dict] = None


def _roots() -> dict:
    global _ROOTS
    if _ROOTS is None:
        paths = sysconfig.get_paths()
        _ROOTS = {
            "ours": (str(_HERE) + "/",) + _dirs(["capdiag.checks"]),  # capdiag's engine and checks
            "users": _dirs(["capdiag.models", "capdiag.testing"]),  # stand-ins for a user's model files
            "libs": _dirs(["torch", "torchvision", "captum", "numpy", "matplotlib", "nltk", "tqdm"])
            + (str(Path(paths["stdlib"]).resolve()) + "/",),
            "installed": tuple({str(Path(paths[k]).resolve()) + "/" for k in ("purelib", "platlib")}),
        }
    return _ROOTS


def _resolved(filename: str) -> str:
    try:
        return str(Path(filename).resolve())
    except (OSError, RuntimeError):  # pragma: no cover
        return filename


def is_ours(filename: str) -> bool:
    """Whether ``filename`` is capdiag's own engine or checks (not its models or fixtures)."""
    path = filename if filename.startswith("/") else _resolved(filename)
    r = _roots()
    return path.startswith(r["ours"]) and not path.startswith(r["users"])


def is_user(filename: str, installed: bool = False) -> bool:
    """Whether a frame's file is the user's code (see the module docstring; ``installed``: whether
    installed packages count as the user's)."""
    if filename.startswith("<"):
        return False
    r = _roots()
    if filename.startswith(r["users"]):
        return True
    if filename.startswith(r["ours"]) or filename.startswith(r["libs"]):
        return False
    return installed or not filename.startswith(r["installed"])


def user_frame(depth: int = 2) -> Optional[tuple]:
    """``(file, line)`` of the innermost frame on the current stack that is the user's code (installed
    packages are not), or None when capdiag itself made the call (the walk stops at capdiag's own
    frames: a script that called capdiag is not the model)."""
    ours = _roots()["ours"]
    f = sys._getframe(depth)
    while f is not None:
        name = f.f_code.co_filename
        if is_user(name):
            return name, f.f_lineno
        if name.startswith(ours) and not is_user(name):
            return None
        f = f.f_back
    return None


@dataclass(frozen=True)
class UserSite:
    """The user's code an exception came from."""

    call: str  # the user's function capdiag called (forward, generate, loss_fn, ...)
    where: str  # file:line in func: code, of the innermost user frame
    file: str = ""
    line: int = 0
    code: str = ""

    def describe(self, exc: BaseException) -> str:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{self.call}() raised {type(exc).__name__}: {msg} (at {self.where})"


def user_site(exc: BaseException) -> Optional[UserSite]:
    """The user's code that raised ``exc`` (installed packages count as the user's: a transformers model
    handed to capdiag is theirs), or None when capdiag, or a library it called, did. Only frames after
    the innermost frame of capdiag's engine or checks count."""
    frames = traceback.extract_tb(exc.__traceback__)
    paths = [_resolved(f.filename) for f in frames]
    # The frame the runner calls is the check's own code, wherever the check is defined.
    checks_own = {i + 1 for i, (f, p) in enumerate(zip(frames, paths)) if f.name == "run_check" and is_ours(p)}
    last_ours = max((i for i, p in enumerate(paths) if is_ours(p) or i in checks_own), default=-1)
    user = [f for f, p in zip(frames[last_ours + 1:], paths[last_ours + 1:])
            if is_user(p, installed=True) and (p.startswith(_roots()["users"]) or not f.filename.startswith("<"))]
    if not user:
        return None
    inner = user[-1]
    code = f": {inner.line.strip()}" if inner.line else ""
    return UserSite(user[0].name, f"{inner.filename}:{inner.lineno} in {inner.name}{code}", inner.filename,
                    inner.lineno or 0, (inner.line or "").strip())


def raised_at(exc: BaseException, user_file: Optional[str] = None) -> str:
    """``file:line in func: code`` for an error message about ``exc``: the innermost frame in
    ``user_file`` when given, else the innermost frame of the user's code (installed packages
    included), else of anything but capdiag, torch and importlib; "" when none."""
    frames = traceback.extract_tb(exc.__traceback__)
    pick = None
    if user_file:
        target = _resolved(user_file)
        pick = next((f for f in reversed(frames) if _resolved(f.filename) == target), None)
    if pick is None:
        pick = next((f for f in reversed(frames) if is_user(_resolved(f.filename), installed=True)), None)
    if pick is None:
        return ""
    code = f": {pick.line.strip()}" if pick.line else ""
    return f"{pick.filename}:{pick.lineno} in {pick.name}{code}"

"""Registry of checks, keyed by snake_case name; checks register with a decorator."""
from __future__ import annotations

import difflib
import importlib
from typing import Type

from .errors import UsageError

_REGISTRY: dict = {}
_LOADED = False
_LOCATOR: list = []  # the fallback locator the built-in checks register (see register_locator)


def register_check(cls: Type) -> Type:
    """Class decorator: ``@register_check class CausalLeak(Check): name = "causal_leak"``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"check {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def register_locator(fn) -> None:
    """Register ``fn(captioner, images, method, evidence) -> Optional[Location]``: where a failing check
    that located nothing points (the user's method the check called). The built-in checks register
    capdiag's (``capdiag.measure.origins.called_location``); the engine itself imports no measurement."""
    _LOCATOR[:] = [fn]


def fallback_locator():
    """The registered fallback locator, or None."""
    _load_builtin()
    return _LOCATOR[0] if _LOCATOR else None


def _load_builtin() -> None:
    global _LOADED
    if not _LOADED:
        importlib.import_module("capdiag.checks")
        _LOADED = True


def list_checks() -> list:
    """All registered check classes, in registration order (cheap structural checks first)."""
    _load_builtin()
    return list(_REGISTRY.values())


def get_check(name: str, **options):
    """Instantiate a registered check by name, with keyword options for its knobs."""
    _load_builtin()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        alt = f"did you mean {', '.join(close)}?" if close else "run `capdiag list` for the names"
        raise UsageError(f"unknown check {name!r}; {alt}") from None
    return cls(**options)


def select_checks(only=None, skip=None, quick: bool = False, kind: str = "captioner") -> list:
    """Names picked by --only/--skip (validated), optionally only the cheap ones; without --only, only the
    checks that judge subjects of ``kind``."""
    for n in list(only or []) + list(skip or []):
        get_check(n)  # raises a UsageError naming close matches
    chosen = list(only) if only else [c.name for c in list_checks() if (c.cheap or not quick) and kind in c.subjects]
    return [n for n in chosen if n not in set(skip or [])]

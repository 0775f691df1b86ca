"""capdiag: find wiring bugs in image-captioning models before they cost GPU hours.

Imports are lazy so that ``import capdiag`` (and the pytest plugin) stays cheap: nothing
heavy (matplotlib, tensorboard, lightning, transformers) loads until it is used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Status": "capdiag.finding",
    "Finding": "capdiag.finding",
    "Report": "capdiag.finding",
    "Location": "capdiag.finding",
    "Check": "capdiag.check",
    "Subject": "capdiag.check",
    "Captioner": "capdiag.captioner",
    "CaptionSpec": "capdiag.captioner",
    "register_check": "capdiag.registry",
    "get_check": "capdiag.registry",
    "list_checks": "capdiag.registry",
    "run_checks": "capdiag.runner",
    "run_check": "capdiag.runner",
    "load_model_file": "capdiag.intake.subject",
    "make_subject": "capdiag.intake.subject",
    "subject_for": "capdiag.api",
    "SyntheticCaptions": "capdiag.intake.data",
    "CapdiagError": "capdiag.errors",
    "ModelSnapshot": "capdiag.state",
    "TrainingDiagnostics": "capdiag.monitor",
    "CapdiagWarning": "capdiag.monitor",
    "ImageIgnoredError": "capdiag.monitor",
    "guard_pretrained": "capdiag.measure.pretrained",
    "load_checkpoint": "capdiag.intake.checkpoints",
    "DriftWatcher": "capdiag.measure.pretrained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'capdiag' has no attribute {name!r}")

"""Hints -> a validated ``CaptionSpec``: the one parser every front end uses.

Hints come from a model file's ``CAPDIAG`` dict, a model's ``capdiag_hints`` attribute and
keyword arguments (``subject_for``, ``TrainingDiagnostics``, the pytest fixture); later sources
refine earlier ones. Unknown keys, wrong types, names that are not submodules and ids outside
the vocabulary get the same one-line ``UsageError`` wherever they come from. What the hints
leave out is defaulted and recorded in ``spec.assumptions``.
"""
from __future__ import annotations

import difflib
import numbers
from typing import Any, Mapping, Optional

from torch import nn

from ..captioner import CaptionSpec, resolve_module
from ..errors import UsageError

HINT_KEYS = (
    "vocab_size", "pad_id", "bos_id", "eos_id", "image_size", "max_len", "image_module",
    "pretrained", "image_mean", "image_std", "pixel_scale", "captions_keyword", "attention_modules",
)
IMAGE_MODULE_NAMES = ("encoder", "image_encoder", "cnn", "backbone", "visual", "vision", "vision_model", "image_model")


def merged(*sources: Optional[Mapping]) -> dict:
    """The hints of several sources, later ones winning key by key."""
    out: dict = {}
    for src in sources:
        out.update(src or {})
    return out


def check_keys(hints: Mapping, where: str) -> None:
    """Raise a ``UsageError`` naming the closest known hint for every unknown key."""
    if not isinstance(hints, Mapping):
        raise UsageError(f"{where} must be a dict of hints, got {type(hints).__name__}")
    for key in hints:
        if key not in HINT_KEYS:
            close = difflib.get_close_matches(str(key), HINT_KEYS, n=1, cutoff=0.6)
            alt = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"unknown hint {key!r} in {where}; {alt}known hints: {', '.join(HINT_KEYS)}")


def _int(hints: Mapping, key: str, where: str, minimum: int) -> int:
    v = hints[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise UsageError(f"hint {key!r} in {where} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _triple(hints: Mapping, key: str, where: str, positive: bool) -> tuple:
    v = hints[key]
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        t = ()
    if len(t) != 3 or (positive and min(t) <= 0):
        need = "3 positive numbers" if positive else "3 numbers"
        raise UsageError(f"hint {key!r} in {where} must be {need} (one per RGB channel), got {v!r}")
    return t


def _names(value: Any) -> list:
    if isinstance(value, dict):
        return list(value)
    if isinstance(value, str):
        return [value]
    return list(value or [])


def guess_image_module(model: nn.Module) -> Optional[str]:
    for name, _ in model.named_children():
        if name.lower() in IMAGE_MODULE_NAMES:
            return name
    return None


def caption_spec(hints: Mapping, model: nn.Module, where: str = "the hints") -> CaptionSpec:
    """Validate ``hints`` against ``model`` and build its ``CaptionSpec``.

    ``image_size`` and ``max_len`` are set only when hinted (loading probes the rest);
    ``vocab_size`` 0 means "read it from the logits". Pretrained references given as paths
    are loaded here: a missing file is bad input, not a finding.

    Raises:
        UsageError: an unknown key, a value of the wrong type, a name that is not a submodule,
            or special ids outside a declared vocabulary.
    """
    check_keys(hints, where)
    h = dict(hints)
    spec = CaptionSpec(vocab_size=_int(h, "vocab_size", where, 2) if "vocab_size" in h else 0)
    assumptions = []
    for key, default in (("pad_id", 0), ("bos_id", 1), ("eos_id", 2)):
        if key in h:
            setattr(spec, key, _int(h, key, where, 0))
        else:
            assumptions.append(f"{key} = {default} (not in CAPDIAG hints)")
        if spec.vocab_size and getattr(spec, key) >= spec.vocab_size:
            raise UsageError(f"hint {key!r} = {getattr(spec, key)} in {where} is outside the vocabulary "
                             f"[0, {spec.vocab_size}) that vocab_size declares")
    for key in ("image_size", "max_len"):
        if key in h:
            setattr(spec, key, _int(h, key, where, 1))
    for key in ("image_mean", "image_std"):
        if key in h:
            setattr(spec, key, _triple(h, key, where, positive=key == "image_std"))
    spec.normalization_declared = "image_mean" in h or "image_std" in h
    if not spec.normalization_declared:
        assumptions.append("images normalized with ImageNet mean/std (no image_mean/image_std hints)")
    if "pixel_scale" in h:
        if not isinstance(h["pixel_scale"], numbers.Real) or h["pixel_scale"] <= 0:
            raise UsageError(f"hint 'pixel_scale' in {where} must be a positive number (255 for raw pixels), "
                             f"got {h['pixel_scale']!r}")
        spec.pixel_scale = float(h["pixel_scale"])
    if "captions_keyword" in h:
        if not isinstance(h["captions_keyword"], str):
            raise UsageError(f"hint 'captions_keyword' in {where} must be a keyword name, got {h['captions_keyword']!r}")
        spec.captions_keyword = h["captions_keyword"]
    if "image_module" in h:
        if h["image_module"] is not None:
            resolve_module(model, h["image_module"])  # raises with close names
        spec.image_module = h["image_module"]
    else:
        spec.image_module = guess_image_module(model)
        if spec.image_module:
            assumptions.append(f"image module = {spec.image_module!r} (guessed by name; set CAPDIAG['image_module'])")
    if "attention_modules" in h:
        if isinstance(h["attention_modules"], str):
            raise UsageError(f"hint 'attention_modules' in {where} must be a list of module names, got a string")
        spec.attention_modules = None if h["attention_modules"] is None else list(h["attention_modules"])
        for name in spec.attention_modules or []:
            resolve_module(model, name)
    if "pretrained" in h:
        spec.pretrained = h["pretrained"]
        for name in _names(spec.pretrained):
            resolve_module(model, name)
        if isinstance(spec.pretrained, dict):
            from .checkpoints import read_state_dict

            spec.pretrained = {name: read_state_dict(ref, "reference weights") for name, ref in spec.pretrained.items()}
    spec.assumptions = assumptions
    return spec

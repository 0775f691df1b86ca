"""Loading a trained checkpoint into the built model, strictly (``capdiag check --weights PATH``).

Reads what people save: a plain ``state_dict`` (``.pt``/``.pth``/``.bin``, read with
``weights_only=True``: nothing that could run code is unpickled), ``.safetensors``, a dict holding it
under ``state_dict`` (a Lightning ``.ckpt``), ``model_state_dict`` or ``model`` (the PyTorch
tutorials' ``torch.save({"epoch": ..., "model_state_dict": ...})``). A prefix that the wrapper added
to every key (DDP's ``module.``, a LightningModule's attribute name such as ``model.``) is found
and removed. Then every key must match: a checkpoint that leaves parameters missing, brings
unexpected ones or other shapes is the ``load_state_dict(strict=False)``-loaded-nothing bug, and
capdiag says so (exit 1) instead of judging a half-random model.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointMismatch, WeightsError
from .pretrained import load_reference

_CONTAINERS = ("state_dict", "model_state_dict", "model")


def read_state_dict(path: str) -> dict:
    """The state_dict a checkpoint file holds (see the module docstring for the kinds read)."""
    if not Path(path).is_file():
        raise WeightsError(f"checkpoint {path!r} not found; pass the path of a saved state_dict or checkpoint file")
    if Path(path).suffix == ".safetensors":
        return load_reference(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - arbitrary pickles are refused, not run
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise WeightsError(f"{path!r} is not a checkpoint torch.load(weights_only=True) can read "
                           f"({type(e).__name__}: {why}); save model.state_dict()") from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), dict)), obj)
    tensors = isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())
    if not tensors:
        raise WeightsError(f"{path!r} holds no state_dict (a dict of tensors, alone or under "
                           f"{', '.join(repr(k) for k in _CONTAINERS)}); save model.state_dict()")
    return obj


def _prefixes(keys) -> list:
    """Candidate wrapper prefixes: the first one or two dotted components shared by keys."""
    found = Counter()
    for k in keys:
        parts = k.split(".")
        for n in (1, 2):
            if len(parts) > n:
                found[".".join(parts[:n]) + "."] += 1
    return [p for p, _ in found.most_common(8)]


def fit_keys(state: dict, model: nn.Module) -> tuple:
    """``(state with the best-fitting wrapper prefix removed, the prefix or "")``."""
    wanted = set(model.state_dict())
    best, prefix = sum(k in wanted for k in state), ""
    for p in _prefixes(state):
        hits = sum(k[len(p):] in wanted for k in state if k.startswith(p))
        if hits > best:
            best, prefix = hits, p
    if not prefix:
        return state, ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix


def _groups(keys, limit: int = 3) -> str:
    """``encoder.* (45), decoder.layers.* (30)``: keys grouped by their first two components."""
    c = Counter(".".join(k.split(".")[:2]) + (".*" if k.count(".") > 1 else "") for k in keys)
    shown = ", ".join(f"{g} ({n})" for g, n in c.most_common(limit))
    return shown + (f" and {len(c) - limit} more groups" if len(c) > limit else "")


def load_checkpoint(model: nn.Module, path: str) -> str:
    """Load ``path`` into ``model`` strictly; returns what was loaded, in words.

    Raises:
        WeightsError: not a file, or not a checkpoint (exit 2).
        CheckpointMismatch: keys or shapes do not fit the model (exit 1: the model would load nothing).
    """
    state, prefix = fit_keys(read_state_dict(path), model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(own)} tensors missing ({_groups(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_groups(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of other shapes ({'; '.join(shapes[:2])})")
        matched = len(own) - len(missing) - len(shapes)
        raise CheckpointMismatch(
            f"checkpoint {path!r} does not fit the model: {'; '.join(parts)}; {matched} tensors match"
            f"{f' after removing the prefix {prefix!r}' if prefix else ''}. load_state_dict(strict=False) would "
            "silently keep the rest at their initial values: build the model with the configuration it was "
            "trained with, or save the module you build here")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return f"{path} ({len(state)} tensors{f', prefix {prefix!r} removed' if prefix else ''})"

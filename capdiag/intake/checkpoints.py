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

from ..errors import CheckpointMismatch, WeightsError

_CONTAINERS = ("state_dict", "model_state_dict", "model")


def read_state_dict(spec, what: str = "checkpoint") -> dict:
    """The one state-dict reader: a dict is returned as it is; ``"torchvision:ResNet18_Weights.DEFAULT"``
    is read from the local torch hub cache (capdiag never downloads); a path is read as
    ``.safetensors`` or with ``torch.load(weights_only=True)`` (nothing that could run code is
    unpickled), and a dict holding the state dict under one of ``_CONTAINERS`` is opened. ``what``
    names the file in errors (``checkpoint``, ``reference weights``).

    Raises:
        WeightsError: not found, unreadable, or no dict of tensors inside.
    """
    if isinstance(spec, dict):
        return spec
    text = str(spec)
    if text.startswith("torchvision:"):
        return _torchvision_cached(text.split(":", 1)[1])
    path = Path(text)
    if not path.is_file():
        raise WeightsError(f"{what} {text!r} not found; give the path of a saved state_dict (.pt/.pth/.safetensors) "
                           "or checkpoint file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise WeightsError(f"{text!r} is a safetensors file: pip install safetensors to read it") from None
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - arbitrary pickles are refused, not run
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise WeightsError(f"{text!r} is not a plain state_dict or checkpoint torch.load(weights_only=True) can read "
                           f"({type(e).__name__}: {why}); save it with torch.save(module.state_dict(), path)") from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in _CONTAINERS if isinstance(obj.get(k), dict)), obj)
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise WeightsError(f"{text!r} does not hold a state_dict (a dict of tensors, alone or under "
                           f"{', '.join(repr(k) for k in _CONTAINERS)}); save module.state_dict()")
    return obj


def _torchvision_cached(name: str) -> dict:
    import torchvision

    enum_name, _, member = name.partition(".")
    weights_enum = getattr(torchvision.models, enum_name, None)
    if weights_enum is None:
        raise WeightsError(f"torchvision has no weights enum {enum_name!r} (e.g. ResNet18_Weights)")
    weights = getattr(weights_enum, member or "DEFAULT")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        raise WeightsError(
            f"torchvision weights {name} are not in the local cache ({cached}); capdiag never downloads: "
            "load them once yourself or give a state_dict path"
        )
    return torch.load(cached, map_location="cpu", weights_only=True)


def strip_prefix(state: dict, wanted) -> tuple:
    """The one prefix stripper: ``(state with the wrapper prefix removed, the prefix or "")``, where the
    prefix (DDP's ``module.``, a LightningModule's ``model.``, a backbone's own name) is the leading
    dotted components whose removal matches the most keys of ``wanted`` (a module's state-dict keys);
    the state as it is when no prefix matches more."""
    wanted = set(wanted)
    best, prefix = sum(k in wanted for k in state), ""
    counts = Counter(".".join(k.split(".")[:n]) + "." for k in state for n in range(1, k.count(".") + 1))
    for p, _ in counts.most_common(16):
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
    state, prefix = strip_prefix(read_state_dict(path), model.state_dict())
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

"""Context managers that keep capdiag from changing the model or process it inspects.

Every temporary change a check makes (train/eval mode, ``requires_grad``, RNG draws) goes
through here, and is undone in ``finally`` so that it is undone when the model raises too.
"""
from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

try:  # numpy is a torch dependency in practice, but stay importable without it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch (CPU and every CUDA device), Python ``random`` and NumPy RNG states."""
    py_state = random.getstate()
    np_state = np.random.get_state() if np is not None else None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np_state is not None:
                np.random.set_state(np_state)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with a fixed seed, without consuming the caller's RNG streams."""
    with preserved_rng():
        torch.manual_seed(seed)
        random.seed(seed)
        if np is not None:
            np.random.seed(seed % (2**32))
        yield


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag and every parameter's ``requires_grad``."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was
        for p, was in flags:
            p.requires_grad_(was)


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer's value (train-mode forwards update BatchNorm running statistics)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


@contextlib.contextmanager
def in_mode(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Put the model in train or eval mode for a block; restore each submodule's own flag after.

    In train mode BatchNorm updates its running statistics even under ``no_grad``, so buffers
    are restored too: a check must never shift the statistics the user's eval mode relies on.
    """
    with preserved_modes(model), (preserved_buffers(model) if train else contextlib.nullcontext()):
        model.train(train)
        yield model


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # parameters, buffers, submodules, hooks, training


def _attributes(m: nn.Module) -> dict:
    """A module's own plain attributes (a cache, a step counter): not parameters, buffers, submodules."""
    return {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}


def _contents(v):
    return copy.copy(v) if isinstance(v, (dict, list, set)) else None


@contextlib.contextmanager
def preserved_attributes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's plain attributes (the same objects, containers with their old
    contents): a forward that caches something on ``self`` (the encoder output, a mask) must not
    keep what capdiag's probes fed it, or one check's calls would change what the next one
    measures, and the user's model would come back changed."""
    saved = [(m, {k: (v, _contents(v)) for k, v in _attributes(m).items()}) for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k in [k for k in _attributes(m) if k not in attrs]:
                del m.__dict__[k]
            for k, (v, contents) in attrs.items():
                if isinstance(v, dict):
                    v.clear()
                    v.update(contents)
                elif isinstance(v, list):
                    v[:] = contents
                elif isinstance(v, set):
                    v.clear()
                    v.update(contents)
                m.__dict__[k] = v


_HOOK_COMPANIONS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


@contextlib.contextmanager
def preserved_hooks(model: nn.Module) -> Iterator[None]:
    """Remove the module hooks registered during the block. capdiag removes its own; this is for the
    model's: transformers 5 installs its output-capturing hooks on a model's first forward and marks the
    model with an attribute. ``preserved_attributes`` takes the mark away, so the hooks must go with it,
    or the next forward would install them a second time."""
    saved = [(m, {d: set(getattr(m, d, None) or {}) for d in _HOOK_DICTS}) for m in model.modules()]
    try:
        yield
    finally:
        for m, keys in saved:
            for d, before in keys.items():
                hooks = getattr(m, d, None)
                for k in [k for k in (hooks or {}) if k not in before]:
                    del hooks[k]
                    for extra in _HOOK_COMPANIONS:
                        getattr(m, extra, {}).pop(k, None)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Modes, requires_grad, buffers, plain attributes, the model's own hooks and RNG restored after the
    block (what the runner wraps every check in)."""
    with preserved_modes(model), preserved_buffers(model), preserved_attributes(model), preserved_hooks(model), \
            preserved_rng():
        yield


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


@dataclass
class ModelSnapshot:
    """Everything capdiag promises not to change, captured for an exact before/after comparison."""

    tensors: dict
    modes: list
    flags: list
    hooks: list
    grads: list
    rng: tuple
    attributes: list

    @classmethod
    def take(cls, model: nn.Module) -> "ModelSnapshot":
        tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        modes = [(n, m.training) for n, m in model.named_modules()]
        flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
        hooks = [(n, d, len(getattr(m, d, {}) or {})) for n, m in model.named_modules() for d in _HOOK_DICTS]
        hooks += [(n, "tensor_hooks", len(p._backward_hooks or {})) for n, p in model.named_parameters()]
        grads = [(n, None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()]
        rng = (
            torch.get_rng_state(),
            [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_initialized() else [],
            random.getstate(),
            np.random.get_state()[1].copy() if np is not None else None,
        )
        attributes = [(n, sorted((k, id(v)) for k, v in _attributes(m).items())) for n, m in model.named_modules()]
        return cls(tensors, modes, flags, hooks, grads, rng, attributes)

    def differences(self, other: "ModelSnapshot") -> list[str]:
        """Human-readable list of everything that differs (empty when identical)."""
        diffs = []
        for k, v in self.tensors.items():
            w = other.tensors.get(k)
            if w is None or w.shape != v.shape or w.dtype != v.dtype or w.device != v.device or not torch.equal(v, w):
                diffs.append(f"tensor {k} changed")
        diffs += [f"mode of {a[0]!r} changed" for a, b in zip(self.modes, other.modes) if a != b]
        diffs += [f"requires_grad of {a[0]} changed" for a, b in zip(self.flags, other.flags) if a != b]
        diffs += [f"hooks {a[1]} on {a[0]!r} changed" for a, b in zip(self.hooks, other.hooks) if a != b]
        for (n, g1), (_, g2) in zip(self.grads, other.grads):
            if (g1 is None) != (g2 is None) or (g1 is not None and not torch.equal(g1, g2)):
                diffs.append(f".grad of {n} changed")
        if not torch.equal(self.rng[0], other.rng[0]):
            diffs.append("torch CPU RNG state changed")
        if len(self.rng[1]) == len(other.rng[1]) and any(not torch.equal(a, b) for a, b in zip(self.rng[1], other.rng[1])):
            diffs.append("torch CUDA RNG state changed")
        if self.rng[2] != other.rng[2]:
            diffs.append("python random state changed")
        if self.rng[3] is not None and not (self.rng[3] == other.rng[3]).all():
            diffs.append("numpy RNG state changed")
        for (n, a), (_, b) in zip(self.attributes, other.attributes):
            if a != b:
                changed = sorted({k for k, _ in set(a) ^ set(b)})
                diffs.append(f"attributes {changed} of {n!r} added, removed or reassigned")
        return diffs

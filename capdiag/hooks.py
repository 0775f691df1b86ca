"""Context managers that observe or alter module outputs; every hook is removed in ``finally``."""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Optional

import torch
from torch import nn


def _map_output(output, fn, batch=None):
    """``output`` with ``fn`` applied to what carries the image: every per-sample floating tensor (first
    dimension = the batch) in a tensor, tuple, list, dict or Hugging Face ModelOutput (type kept), or an
    object holding tensors in attributes (DETR's NestedTensor). Tensors without the batch dimension (a
    shared positional table), integer masks and ids are left alone. A DETR-style backbone's
    ``(features, positions)`` has both shuffled or zeroed: positions are per-sample too."""
    if batch is None:
        first = next((t for t in _floating(output)), None)
        if first is None:
            raise TypeError(f"cannot ablate an output of type {type(output).__name__}: it holds no floating tensor")
        batch = first.shape[0]
    if isinstance(output, torch.Tensor):
        return fn(output) if output.is_floating_point() and output.dim() > 0 and output.shape[0] == batch else output
    if isinstance(output, dict):
        new = {k: _map_output(v, fn, batch) for k, v in output.items()}
        # Keep the type: a ModelOutput is read by attribute (out.image_embeds), not only by key.
        return type(output)(**new) if hasattr(output, "to_tuple") else type(output)(new) if type(output) is not dict else new
    if isinstance(output, (tuple, list)):
        items = [_map_output(v, fn, batch) for v in output]
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    if hasattr(output, "__dict__") and not isinstance(output, nn.Module):
        clone = copy.copy(output)
        for k, v in vars(output).items():
            if any(True for _ in _floating(v)):
                setattr(clone, k, _map_output(v, fn, batch))
        return clone
    return output


def tensors_in(x, depth: int = 0):
    """Every tensor in a module output or input: tensors, tuples/lists, dicts, ModelOutputs and
    objects holding tensors in attributes (a NestedTensor's ``tensors``), a few levels deep."""
    if isinstance(x, torch.Tensor):
        yield x
    elif depth > 4:
        return
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors_in(v, depth + 1)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from tensors_in(v, depth + 1)
    elif hasattr(x, "__dict__") and not isinstance(x, nn.Module):
        for v in vars(x).values():
            yield from tensors_in(v, depth + 1)


def _floating(x):
    """The floating tensors with a batch-like first dimension inside ``x`` (``tensors_in``)."""
    return (t for t in tensors_in(x) if t.is_floating_point() and t.dim() > 0)


@contextlib.contextmanager
def hooked(modules, hook: Optional[Callable] = None, pre: bool = False, **options) -> Iterator[None]:
    """``hook`` as a forward hook (or, with ``pre``, a forward pre-hook) on every module of ``modules``
    for the block; ``modules`` may instead hold ``(module, hook)`` pairs (``hook`` left None), one hook
    each. ``options`` go to the registration (``always_call``, ``with_kwargs``). Every handle is
    removed in ``finally``, also when the block raises. The one way capdiag hooks a model."""
    pairs = list(modules) if hook is None else [(m, hook) for m in modules]
    handles = []
    try:
        for m, fn in pairs:
            handles.append(m.register_forward_pre_hook(fn, **options) if pre else m.register_forward_hook(fn, **options))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replaced_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``module``'s (first tensor) output by ``fn(output)`` for the block."""
    handle = module.register_forward_hook(lambda m, i, o: _map_output(o, fn))
    try:
        yield
    finally:
        handle.remove()


def zeroed_output(module: nn.Module):
    return replaced_output(module, torch.zeros_like)


def shuffled_output(module: nn.Module, shift: int = 1):
    """Batch-shuffle the module's output (a roll along dim 0: every sample gets another's)."""
    return replaced_output(module, lambda t: t.roll(shift, 0))


@contextlib.contextmanager
def captured_outputs(modules: dict) -> Iterator[dict]:
    """Record outputs of named modules: ``{name: [output per call]}`` (detached)."""
    store: dict = {n: [] for n in modules}
    handles = []

    def make(name):
        def hook(m, i, o):
            store[name].append(_detach(o))
        return hook

    try:
        for n, m in modules.items():
            handles.append(m.register_forward_hook(make(n)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _detach(o):
    if isinstance(o, torch.Tensor):
        return o.detach()
    if isinstance(o, (tuple, list)):
        return type(o)(_detach(x) for x in o)
    return o

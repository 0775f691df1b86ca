"""Context managers that observe or alter module outputs; every hook is removed in ``finally``."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


def _map_first_tensor(output, fn):
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]),) + tuple(output[1:])
    if isinstance(output, list) and output and isinstance(output[0], torch.Tensor):
        return [fn(output[0])] + list(output[1:])
    if isinstance(output, dict):
        key = next((k for k, v in output.items() if isinstance(v, torch.Tensor)), None)
        if key is not None:
            return {**output, key: fn(output[key])}
    if hasattr(output, "last_hidden_state"):  # Hugging Face ModelOutput
        output.last_hidden_state = fn(output.last_hidden_state)
        return output
    raise TypeError(f"cannot ablate an output of type {type(output).__name__}")


@contextlib.contextmanager
def replaced_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``module``'s (first tensor) output by ``fn(output)`` for the block."""
    handle = module.register_forward_hook(lambda m, i, o: _map_first_tensor(o, fn))
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

"""Context managers that observe or alter module outputs; every hook is removed in ``finally``."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


def _map_output(output, fn):
    """``output`` with ``fn`` applied to what carries the image: a tensor, the first item of a
    tuple/list, every per-sample tensor of a dict or Hugging Face ModelOutput (type kept)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]),) + tuple(output[1:])
    if isinstance(output, list) and output and isinstance(output[0], torch.Tensor):
        return [fn(output[0])] + list(output[1:])
    if isinstance(output, dict):
        # Every per-sample tensor, not just the first: a Hugging Face vision model returns
        # last_hidden_state and pooler_output (or image_embeds), and a captioner may read either.
        # Tensors without the batch dimension (a shared positional table) are left alone.
        first = next((v for v in output.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if first is not None:
            B = first.shape[0]
            new = {k: fn(v) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v
                   for k, v in output.items()}
            # Keep the type: a ModelOutput is read by attribute (out.image_embeds), not only by key.
            return type(output)(**new) if hasattr(output, "to_tuple") else new
    if hasattr(output, "last_hidden_state"):  # an object that is not a dict
        output.last_hidden_state = fn(output.last_hidden_state)
        return output
    raise TypeError(f"cannot ablate an output of type {type(output).__name__}")


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

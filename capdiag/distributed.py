"""What the training monitor needs to know about distributed and sharded training.

DDP replicates parameters and synchronizes gradients: every rank sees whole tensors. FSDP2
(``fully_shard``) keeps parameters and gradients as sharded ``DTensor``s, FSDP1
(``FullyShardedDataParallel``, ``use_orig_params=True``) as views into this rank's flat shard:
statistics are then computed from the local pieces and summed over ranks, never gathered.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
from torch import nn

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def dist_or_none():
    """``torch.distributed`` when a process group is initialized, else None."""
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


def comm_device() -> torch.device:
    """Where collectives of small metric tensors run: the current CUDA device for nccl, else CPU."""
    d = dist_or_none()
    return torch.device("cuda", torch.cuda.current_device()) if d and d.get_backend() == "nccl" else torch.device("cpu")


def is_dtensor(t) -> bool:
    if "torch.distributed.tensor" not in sys.modules:
        return False  # nothing made a DTensor yet, so t is none (and importing it would cost 0.7 s)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a sharded tensor (an FSDP2 DTensor), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def is_fsdp1(model: nn.Module) -> bool:
    """Whether FSDP1 (FullyShardedDataParallel) wraps the model or a part of it."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDP) for m in model.modules())


def is_sharded(model: nn.Module) -> bool:
    """Whether gradients of ``model`` are sharded across ranks (FSDP1 or FSDP2)."""
    return dist_or_none() is not None and (is_fsdp1(model) or any(is_dtensor(p) for p in model.parameters()))


def clean_name(name: str) -> str:
    """A parameter or module name without the wrappers' prefixes (FSDP1, checkpoint, compile)."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def _fsdp2_groups(model: nn.Module) -> list:
    """``(module, param group)`` of every FSDP2-sharded module (``fully_shard``) in ``model``."""
    out = []
    for m in model.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        group = getattr(state, "_fsdp_param_group", None)
        if group is not None:
            out.append((m, group))
    return out


def sharding_state(model: nn.Module) -> list:
    """Whether each FSDP2 module's parameters are sharded right now (empty without FSDP2)."""
    return [g.is_sharded for _, g in _fsdp2_groups(model)]


@contextlib.contextmanager
def preserved_sharding(model: nn.Module) -> Iterator[None]:
    """Reshard, after the block, every FSDP2 module that was sharded before it. An eval-mode probe
    forward unshards the modules it runs, and FSDP2 keeps the root unsharded after its forward
    (it expects the backward next): without this the probe would leave the root's full
    parameters in memory until the next training step."""
    was = [(m, g.is_sharded) for m, g in _fsdp2_groups(model)]
    try:
        yield
    finally:
        for m, sharded in was:
            if sharded and not m._get_fsdp_state()._fsdp_param_group.is_sharded:
                m.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def reduce_metrics(metrics: dict, op: str = "mean") -> dict:
    """Average (or take the max of) metrics over ranks in one collective: each rank probed its own
    batch or replica (mean), or watched its own shards (max)."""
    d = dist_or_none()
    if d is None or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=comm_device())
    d.all_reduce(t, op=d.ReduceOp.MAX if op == "max" else d.ReduceOp.SUM)
    if op == "mean":
        t /= d.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (one MAX collective; the flag itself without a group)."""
    d = dist_or_none()
    if d is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return bool(t.item() > 0)

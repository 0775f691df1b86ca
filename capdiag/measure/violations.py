"""How a pair of tensors (baseline run, perturbed run) breaks a property, for ``capdiag.measure.localize``.

Each factory returns ``violates(x_a, x_b) -> bool`` for one property; the batch and time axes of an
intermediate tensor are found by their sizes (batch first, then sequence-first layouts), and a
tensor with no such axis is compared whole.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

def at_position(t: int, T: int, tol: float) -> Callable:
    """Position ``t`` differs (a tensor without a time axis: any difference)."""
    def changed(x, y):
        d = axis(x, (T, T - 1), (1, 0, 2))
        if d is None or x.shape != y.shape:
            return differs(x, y, tol)
        return t < x.shape[d] and differs(x.select(d, t), y.select(d, t), tol)
    return changed


def axis(t: torch.Tensor, sizes: tuple, prefer: tuple = (0, 1, 2)) -> Optional[int]:
    """The first dim in ``prefer`` whose size is one of ``sizes`` (the batch or time axis)."""
    for d in prefer:
        if d < t.dim() and t.shape[d] in sizes:
            return d
    return None


def differs(x: torch.Tensor, y: torch.Tensor, tol: float) -> bool:
    if x.shape != y.shape:
        return True
    if not x.is_floating_point():
        return not torch.equal(x, y)
    x, y = x.float(), y.float()
    finite = torch.isfinite(x) & torch.isfinite(y)
    if not bool(torch.equal(torch.isfinite(x), torch.isfinite(y))) or bool((x[~finite] != y[~finite]).any()):
        return True
    d = (x - y).abs().where(finite, torch.zeros_like(x)).max() if x.numel() else x.new_zeros(())
    return bool(d > tol * x.abs().where(finite, torch.zeros_like(x)).max().clamp_min(1e-6)) if x.numel() else False


def _time_slice(x: torch.Tensor, T: int, keep: int, prefer=(1, 0, 2)) -> Optional[tuple]:
    d = axis(x, (T, T - 1), prefer)
    return None if d is None else (d, min(keep, x.shape[d]))


def causal_prefix(k: int, T: int, tol: float) -> Callable:
    """Positions 0..k differ (tokens after k changed); a tensor without a time axis: any difference."""
    def violates(x, y):
        cut = _time_slice(x, T, k + 1)
        if cut is None:
            return differs(x, y, tol)
        d, n = cut
        return differs(x.narrow(d, 0, n), y.narrow(d, 0, n), tol)
    return violates


def other_samples(changed: int, B: int, tol: float) -> Callable:
    """Samples other than ``changed`` differ (only sample ``changed`` was changed)."""
    def violates(x, y):
        d = axis(x, (B,), (0, 1))
        if d is None or x.shape != y.shape:
            return differs(x, y, tol)
        keep = torch.tensor([i for i in range(B) if i != changed], device=x.device)
        return differs(x.index_select(d, keep), y.index_select(d, keep), tol)
    return violates


def not_permuted(perm: torch.Tensor, tol: float) -> Callable:
    """The perturbed run (inputs permuted by ``perm``) does not get the baseline permuted the same way."""
    B = len(perm)

    def violates(x, y):
        d = axis(x, (B,), (0, 1))
        if d is None or x.shape != y.shape:
            return differs(x, y, tol)
        return differs(x.index_select(d, perm.to(x.device)), y, tol)
    return violates


def not_alone(B: int, tol: float, index: int = 0) -> Callable:
    """Sample ``index`` run alone (the perturbed run, batch of 1) gets another result than inside the batch."""
    def violates(x, y):
        d = axis(x, (B,), (0, 1))
        if d is None or y.dim() != x.dim() or y.shape[d] != 1:
            return x.shape == y.shape and differs(x, y, tol)
        return differs(x.narrow(d, index, 1), y, tol)
    return violates


def real_positions_differ(real: torch.Tensor, tol: float) -> Callable:
    """Real caption positions (``real``: (B, T) True at BOS..EOS) differ between the baseline and a run
    with other padding (other pad tokens, or extra pad columns at the end)."""
    B, T = real.shape

    def violates(x, y):
        d = axis(x, (T, T - 1), (1, 0, 2))
        if d is None:
            return x.shape == y.shape and differs(x, y, tol)
        n = x.shape[d]
        if y.dim() != x.dim() or y.shape[d] < n:
            return False
        y = y.narrow(d, 0, n)
        if x.shape != y.shape:
            return False
        b = axis(x, (B,), tuple(i for i in (0, 1) if i != d))
        if b is None:
            return differs(x, y, tol)
        mask = (real if n == T else real[:, 1:]).to(x.device)  # (B, n): position t real, or target t+1 real
        m = mask if b < d else mask.t()  # in the order the tensor holds the two axes
        shape = [1] * x.dim()
        shape[min(b, d)], shape[max(b, d)] = m.shape
        m = m.reshape(shape).to(x.dtype) if x.is_floating_point() else m.reshape(shape).long()
        return differs(x * m, y * m, tol)
    return violates


def any_difference(tol: float) -> Callable:
    """Two runs of the same input differ at all."""
    return lambda x, y: differs(x, y, tol)

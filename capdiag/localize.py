"""Where does a violation start? The first torch operation whose output breaks a property while its
inputs still satisfy it, named by module and by the line of the user's code that ran it.

A perturbation check compares two forwards (baseline, perturbed). ``trace`` records each at the
granularity of torch's functional API (``TorchFunctionMode``: ``F.linear``, ``Tensor.mean``,
``F.multi_head_attention_forward``, ``torch.gru`` are one operation each; a function's internals
are not re-entered), with the tensors each operation read and wrote, the module running it and the
innermost frame of the user's code. ``first_violation`` aligns the two traces and returns the origin:
an operation whose output violates the property (``violates(a, b)``), whose inputs do not, and from
which the violation reaches the model's output through violating operations only. The last
condition discards transient differences that later operations undo (the future tokens a causal
loop slices out at step t > k, an attention score that the mask removes): without it a correct
component would be blamed for a violation that starts elsewhere.

Cost: one extra pair of forwards, run only for a check that failed; outputs are kept on their device
until ``max_bytes`` (beyond it the trace stops and the origin is searched in what was recorded).
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

from .finding import Location

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_CAPDIAG_DIR = str(Path(__file__).resolve().parent)
_LIBRARY_DIRS: Optional[tuple] = None


def _library_dirs() -> tuple:
    """Code that is not the user's (torch, capdiag's engine and checks, the standard library), and
    capdiag's reference models, which are (they stand in for a user's model file)."""
    global _LIBRARY_DIRS
    if _LIBRARY_DIRS is None:
        import sysconfig

        from .blame import _dirs

        libs = (_TORCH_DIR, _CAPDIAG_DIR, *_dirs(["capdiag.checks", "torchvision"]),
                str(Path(sysconfig.get_paths()["stdlib"]).resolve()))
        _LIBRARY_DIRS = tuple(d + "/" for d in libs), tuple(d + "/" for d in _dirs(["capdiag.models"]))
    return _LIBRARY_DIRS


def user_frame(depth: int = 2) -> Optional[tuple]:
    """``(file, line)`` of the innermost frame on the stack that is the user's code (a model file,
    ``capdiag.models``, transformers' modeling code), or None."""
    libs, models = _library_dirs()
    f = sys._getframe(depth)
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith("<") and (name.startswith(models) or not name.startswith(libs)):
            return name, f.f_lineno
        f = f.f_back
    return None


@dataclass
class Op:
    """One torch operation of a traced forward."""

    func: str
    module: str  # dotted name of the innermost module running ("" = the model's own forward)
    site: Optional[tuple]  # (file, line) of the user's code that ran it
    inputs: list  # keys of the tensors it read: ("op", i, slot) or ("input", name)
    outputs: list  # its tensor outputs (detached)


@dataclass
class Trace:
    ops: list = field(default_factory=list)
    sinks: set = field(default_factory=set)  # keys of tensors the model returned
    inputs: dict = field(default_factory=dict)  # name -> the tensor the model received (a copy)
    complete: bool = True  # False when max_bytes stopped the recording


def _tensors(x, out):
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (tuple, list)):
        for y in x:
            _tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, out)
    elif hasattr(x, "to_tuple"):  # a Hugging Face ModelOutput
        _tensors(x.to_tuple(), out)
    return out


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace, keys: dict, stack: list, keep: list, max_bytes: int):
        super().__init__()
        self.trace, self.keys, self.stack, self.keep, self.budget = trace, keys, stack, keep, max_bytes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.trace.complete:
            return out
        outs = [t for t in _tensors(out, []) if t.layout == torch.strided]
        if not outs or getattr(func, "__name__", "") in ("__get__", "__set__", "detach"):
            return out
        reads = [self.keys[id(t)] for t in _tensors((args, kwargs or {}), []) if id(t) in self.keys]
        i = len(self.trace.ops)
        self.keep.extend(outs)  # alive until the trace ends: ids stay unique
        for slot, t in enumerate(outs):  # an in-place op's result is its input: later reads see this op
            self.keys[id(t)] = ("op", i, slot)
        self.trace.ops.append(Op(getattr(func, "__name__", str(func)), self.stack[-1] if self.stack else "",
                                 user_frame(), reads, [t.detach().clone() for t in outs]))
        self.budget -= sum(t.numel() * t.element_size() for t in outs)
        if self.budget < 0:
            self.trace.complete = False
        return out


@contextlib.contextmanager
def traced(model: torch.nn.Module, inputs: dict, max_bytes: int = 1 << 30):
    """Record the torch operations run inside the block; ``inputs`` maps names to the tensors the
    model receives (their keys are ``("input", name)``). Every hook is removed in ``finally``."""
    trace, stack, keep = Trace(inputs={n: t.detach().clone() for n, t in inputs.items()}), [], []
    keys = {id(t): ("input", name) for name, t in inputs.items()}
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def pre(m, args):
        stack.append(names[m])

    def post(m, args, out):
        if stack:
            stack.pop()
        if m is model:
            trace.sinks.update(keys[id(t)] for t in _tensors(out, []) if id(t) in keys)

    try:
        for m in names:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
        with _Recorder(trace, keys, stack, keep, max_bytes):
            yield trace
    finally:
        for h in handles:
            h.remove()
        keep.clear()


def first_violation(a: Trace, b: Trace, violates: Callable[[torch.Tensor, torch.Tensor], bool]) -> Optional[Op]:
    """The origin of a violation in the aligned traces ``a`` (baseline) and ``b`` (perturbed), or None.

    ``violates(x_a, x_b)``: whether a pair of tensors breaks the property. A model input that already
    does (a perturbed image) is no origin, and neither is an operation reading it."""
    dirty_inputs = {n for n in a.inputs if n in b.inputs and _safe(violates, a.inputs[n], b.inputs[n])}
    n = 0
    for oa, ob in zip(a.ops, b.ops):  # aligned while the same operations run in the same order
        if oa.func != ob.func or len(oa.outputs) != len(ob.outputs):
            break
        n += 1
    bad = [any(_safe(violates, x, y) for x, y in zip(a.ops[i].outputs, b.ops[i].outputs)) for i in range(n)]

    def dirty(key) -> bool:
        if key[0] == "input":
            return key[1] in dirty_inputs
        return key[1] < n and bad[key[1]]

    # Which violations reach the output: backwards over consumers (a sink is a returned tensor).
    consumers: dict = {}
    for i in range(n):
        for key in a.ops[i].inputs:
            if key[0] == "op":
                consumers.setdefault(key[1], []).append(i)
    reaches = [False] * n
    sinks = {k[1] for k in a.sinks if k[0] == "op"}
    for i in range(n - 1, -1, -1):
        reaches[i] = bad[i] and (i in sinks or any(reaches[j] for j in consumers.get(i, ())))
    for i in range(n):
        if reaches[i] and not any(dirty(k) for k in a.ops[i].inputs):
            return a.ops[i]
    return None


def _safe(violates, x, y) -> bool:
    try:
        return bool(violates(x, y))
    except (RuntimeError, IndexError):  # shapes the predicate cannot line up: not judged
        return False


def localize_pair(cap, a: tuple, b: tuple, violates: Callable, evidence: str, train: bool = False,
                  seed: Optional[int] = 0) -> Optional[Location]:
    """Trace the forwards of batches ``a`` and ``b`` (``(images, captions)`` each) in ``train``/eval
    mode, seeded alike (``seed=None``: not reseeded, so randomness shows), and locate where
    ``violates`` first holds. The model is left as it was (modes, RNG, hooks)."""
    from .state import in_mode, seeded

    traces = []
    for images, captions in (a, b):
        with torch.no_grad(), in_mode(cap.model, train), (seeded(seed) if seed is not None else contextlib.nullcontext()), \
                traced(cap.model, {"images": images, "captions": captions}) as trace:
            cap.call(images, captions)
        traces.append(trace)
    return locate(first_violation(*traces, violates), cap.model, evidence)


def locate(op: Optional[Op], model: torch.nn.Module, evidence: str) -> Optional[Location]:
    """A ``Location`` for the origin ``op``: its module and the user's line that ran it."""
    if op is None:
        return None
    file, line = op.site if op.site else (None, None)
    if file is None:  # nothing of the user's on the stack: the module's class definition
        try:
            mod = model.get_submodule(op.module) if op.module else model
            file, line = inspect.getsourcefile(type(mod)), inspect.getsourcelines(type(mod))[1]
        except (TypeError, OSError, AttributeError):
            pass
    code = None
    if file and line:
        import linecache

        code = linecache.getline(file, line).strip() or None
    return Location(op.module or f"({type(model).__name__}.forward)", file, line, f"{evidence} (in {op.func})", code)


# ---- predicates: how a pair of tensors breaks a property ------------------------------------------

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


def not_alone(B: int, tol: float) -> Callable:
    """Sample 0 run alone (the perturbed run, batch of 1) gets another result than inside the batch."""
    def violates(x, y):
        d = axis(x, (B,), (0, 1))
        if d is None or y.dim() != x.dim() or y.shape[d] != 1:
            return x.shape == y.shape and differs(x, y, tol)
        return differs(x.narrow(d, 0, 1), y, tol)
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

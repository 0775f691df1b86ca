"""Recording what a model computes: every torch operation of a forward (or ``generate``) at the
granularity of torch's functional API, with the tensors it read and wrote, the module running it and
the line of the user's code that ran it; and every in-place write while a model is built.

``TorchFunctionMode`` sees ``F.linear``, ``Tensor.mean``, ``F.multi_head_attention_forward``,
``torch.gru`` as one operation each and does not re-enter a function's internals, so a library
module is one step whose site is the user's line that called it. ``capdiag.localize`` reads these
traces to say where a failing check's problem starts. Every hook is removed and the mode left in
``finally``; outputs are recorded as copies until ``max_bytes`` (then the trace stops, marked
incomplete).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_CAPDIAG_DIR = str(Path(__file__).resolve().parent)
_LIBRARY_DIRS: Optional[tuple] = None
_OURS = (_CAPDIAG_DIR + "/",)  # capdiag's engine; extended with capdiag.checks on first use


def _library_dirs() -> tuple:
    """Code that is not the user's (torch, capdiag's engine and checks, the standard library, installed
    packages: a model from transformers is named by the user's line that called it), and capdiag's
    reference models, which are (they stand in for a user's model file)."""
    global _LIBRARY_DIRS
    if _LIBRARY_DIRS is None:
        import sysconfig

        from .blame import _dirs

        paths = sysconfig.get_paths()  # the standard library and installed packages (site-packages)
        libs = (_TORCH_DIR, _CAPDIAG_DIR, *_dirs(["capdiag.checks", "torchvision"]),
                *{str(Path(paths[k]).resolve()) for k in ("stdlib", "purelib", "platlib")})
        _LIBRARY_DIRS = tuple(d + "/" for d in libs), tuple(d + "/" for d in _dirs(["capdiag.models"]))
        global _OURS
        _OURS = (_CAPDIAG_DIR + "/", *(d + "/" for d in _dirs(["capdiag.checks"])))
    return _LIBRARY_DIRS


def _is_user(filename: str) -> bool:
    """Whether a frame's file is the user's code: a model file or ``capdiag.models``, not torch,
    capdiag's engine, the standard library or an installed package."""
    libs, models = _library_dirs()
    return not filename.startswith("<") and (filename.startswith(models) or not filename.startswith(libs))


def user_frame(depth: int = 2) -> Optional[tuple]:
    """``(file, line)`` of the innermost frame on the stack that is the user's code (``_is_user``), or
    None when capdiag itself made the call (the walk stops at capdiag's own frames: a script that
    called capdiag is not the model)."""
    _library_dirs()  # also sets _OURS
    f = sys._getframe(depth)
    while f is not None:
        name = f.f_code.co_filename
        if _is_user(name):
            return name, f.f_lineno
        if name.startswith(_OURS):
            return None
        f = f.f_back
    return None


@dataclass
class Op:
    """One torch operation of a traced forward."""

    func: str
    module: str  # dotted name of the innermost module running ("" = the model's own forward)
    site: Optional[tuple]  # (file, line) of the user's code that ran it
    inputs: list  # keys of the tensors it read: ("op", i, slot), ("input", name) or ("param", name)
    outputs: list  # its tensor outputs (detached)
    writes: Optional[str] = None  # the model input it modified in place
    cuts_grad: bool = False  # read a tensor that requires grad, returned none that does (detach, no_grad)


@dataclass
class Trace:
    ops: list = field(default_factory=list)
    sinks: set = field(default_factory=set)  # keys of tensors the model returned
    inputs: dict = field(default_factory=dict)  # name -> the tensor the model received (a copy)
    complete: bool = True  # False when max_bytes stopped the recording
    keys: dict = field(default_factory=dict, repr=False)  # id(tensor) -> key, while the trace runs
    module_outputs: list = field(default_factory=list)  # (module name, keys of its output), in completion order

    def returned(self, out) -> None:
        """Mark what a traced call returned as the output (a model's generate() calls its forward
        as ``self.forward``, which no module hook sees)."""
        self.sinks.update(self.keys[id(t)] for t in _tensors(out, []) if id(t) in self.keys)


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
    elif hasattr(x, "__dict__") and not isinstance(x, torch.nn.Module):  # an output object (out.logits)
        for y in vars(x).values():
            if isinstance(y, torch.Tensor):
                out.append(y)
    return out


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace, keys: dict, stack: list, keep: list, max_bytes: int):
        super().__init__()
        self.trace, self.keys, self.stack, self.keep, self.budget = trace, keys, stack, keep, max_bytes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.trace.complete:
            return out
        if getattr(func, "__name__", "") == "__setitem__" and args and isinstance(args[0], torch.Tensor):
            out_tensors = [args[0]]  # x[i] = v writes into x and returns None: x is what it produced
        else:
            out_tensors = _tensors(out, [])
        outs = [t for t in out_tensors if t.layout == torch.strided]
        if not outs or getattr(func, "__name__", "") in ("__get__", "__set__"):
            return out
        read = _tensors((args, kwargs or {}), [])
        reads = [self.keys[id(t)] for t in read if id(t) in self.keys]
        writes = next((self.keys[id(t)][1] for t in outs if self.keys.get(id(t), ("",))[0] == "input"), None)
        cuts = any(t.requires_grad for t in read) and not any(t.requires_grad for t in outs)  # detach, no_grad
        i = len(self.trace.ops)
        self.keep.extend(outs)  # alive until the trace ends: ids stay unique
        for slot, t in enumerate(outs):  # an in-place op's result is its input: later reads see this op
            self.keys[id(t)] = ("op", i, slot)
        self.trace.ops.append(Op(getattr(func, "__name__", str(func)), self.stack[-1] if self.stack else "",
                                 user_frame(), reads, [t.detach().clone() for t in outs], writes, cuts))
        self.budget -= sum(t.numel() * t.element_size() for t in outs)
        if self.budget < 0:
            self.trace.complete = False
        return out


@contextlib.contextmanager
def traced(model: torch.nn.Module, inputs: dict, max_bytes: int = 1 << 30):
    """Record the torch operations run inside the block; ``inputs`` maps names to the tensors the
    model receives (their keys are ``("input", name)``). Every hook is removed in ``finally``."""
    trace, stack, keep = Trace(inputs={n: t.detach().clone() for n, t in inputs.items()}), [], []
    keys = trace.keys
    keys.update({id(p): ("param", n) for n, p in model.named_parameters()})
    keys.update({id(t): ("input", name) for name, t in inputs.items()})
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def pre(m, args):
        stack.append(names[m])

    def post(m, args, out):
        if stack:
            stack.pop()
        trace.module_outputs.append((names[m], [keys[id(t)] for t in _tensors(out, []) if id(t) in keys]))
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
        trace.keys = {}


def trace_pair(cap, a: tuple, b: tuple, train: bool = False, seed: Optional[int] = 0, generate: bool = False) -> list:
    """Traced forwards (or ``generate`` calls) of batches ``a`` and ``b`` (``(images, captions)`` each)
    in ``train``/eval mode, seeded alike (``seed=None``: not reseeded, so randomness shows). The model
    is left as it was (modes, RNG, hooks)."""
    from .state import in_mode, seeded

    traces = []
    for images, captions in (a, b):
        images, captions = images.clone(), captions.clone()  # the model may edit what it is given
        with torch.no_grad(), in_mode(cap.model, train), (seeded(seed) if seed is not None else contextlib.nullcontext()), \
                traced(cap.model, {"images": images, "captions": captions}) as trace:
            trace.returned(cap.model.generate(images, max_len=cap.spec.max_len) if generate and cap.has_generate
                           else cap.call(images, captions))
        traces.append(trace)
    return traces


def trace_call(cap, images, captions, train: bool = False, seed: int = 0, grad: bool = False,
               protect: bool = True) -> Trace:
    """One traced forward (``grad``: with autograd on, so ``Op.cuts_grad`` means something;
    ``protect=False``: the model receives the tensors themselves, so ``Op.writes`` can show)."""
    from .state import in_mode, seeded

    with torch.set_grad_enabled(grad), in_mode(cap.model, train), seeded(seed), \
            traced(cap.model, {"images": images, "captions": captions}) as trace:
        cap.call(images, captions, protect=protect)
    return trace


def first_op(trace: Trace, pred: Callable[[Op], bool]) -> Optional[Op]:
    return next((op for op in trace.ops if pred(op)), None)


def in_module(op: Op, name: str) -> bool:
    return op.module == name or op.module.startswith(name + ".") or not name


@dataclass(frozen=True)
class Write:
    func: str  # the in-place op (uniform_, normal_, copy_, ...)
    site: Optional[tuple]  # (file, line) of the innermost user frame
    via: Optional[tuple]  # (file, line) of the user's call into Module.apply, when the write came through it


def _user_frames(depth: int = 2) -> tuple:
    """(innermost user frame, the user frame that called ``Module.apply``) on the current stack."""
    f, inner, via, after_apply = sys._getframe(depth), None, None, False
    while f is not None:
        name = f.f_code.co_filename
        user = _is_user(name)
        if user and inner is None:
            inner = (name, f.f_lineno)
        if user and after_apply and via is None:
            via = (name, f.f_lineno)
        if f.f_code.co_name == "apply" and name.startswith(_TORCH_DIR):
            after_apply = True
        f = f.f_back
    return inner, via


_NOT_WRITES = {"requires_grad_", "share_memory_", "retain_grad_"}  # in-place in name only: values stay


class _WriteRecorder(TorchFunctionMode):
    def __init__(self, writes: dict):
        super().__init__()
        self.writes = writes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        inplace = (name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES) or \
            (name.startswith("__i") and name.endswith("__"))  # x *= s
        if inplace and args and isinstance(args[0], torch.Tensor):
            inner, via = _user_frames()
            self.writes[id(args[0])] = Write(name, inner, via)  # the last write wins
        return func(*args, **(kwargs or {}))


def traced_build(build: Callable[[], torch.nn.Module]) -> tuple:
    """Run ``build()`` recording the last in-place write to every tensor: ``(model, {param name: Write})``.
    Only in-place writes reach parameters after construction (``nn.init.*``, ``load_state_dict``'s
    ``copy_``, ``.data.mul_``), so the last one says who set the final value."""
    writes: dict = {}
    with _WriteRecorder(writes):
        model = build()
    return model, {n: writes[id(p)] for n, p in model.named_parameters() if id(p) in writes}

"""Recording what a model computes: every torch operation of a forward (or ``generate``) at the
granularity of torch's functional API, with the tensors it read and wrote, the module running it and
the line of the user's code that ran it; and every in-place write while a model is built.

``TorchFunctionMode`` sees ``F.linear``, ``Tensor.mean``, ``F.multi_head_attention_forward``,
``torch.gru`` as one operation each and does not re-enter a function's internals, so a library
module is one step whose site is the user's line that called it. ``capdiag.measure.localize`` reads these
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

from ..hooks import hooked, tensors_in
from ..usercode import is_user, user_frame

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


@dataclass
class Op:
    """One torch operation of a traced forward."""

    func: str
    module: str  # dotted name of the innermost module running ("" = the model's own forward)
    site: Optional[tuple]  # (file, line) of the user's code that ran it
    inputs: list  # keys of the tensors it read: ("op", i, slot), ("input", name) or ("param", name)
    outputs: list  # its tensor outputs (detached)
    writes: Optional[str] = None  # the model input it modified in place (itself or through a view of it)
    cuts_grad: bool = False  # read a tensor that requires grad, returned none that does (detach, no_grad)
    random: bool = False  # drew random numbers (torch.multinomial, a dropout with training=True, ...)


@dataclass
class Trace:
    ops: list = field(default_factory=list)
    sinks: set = field(default_factory=set)  # keys of tensors the model returned
    inputs: dict = field(default_factory=dict)  # name -> the tensor the model received (a copy)
    complete: bool = True  # False when max_bytes stopped the recording
    keys: dict = field(default_factory=dict, repr=False)  # id(tensor) -> key, while the trace runs
    module_outputs: list = field(default_factory=list)  # (module name, keys of its output), in completion order
    module_inputs: list = field(default_factory=list)  # (module name, [keys of each positional argument]), per call
    training: bool = False  # the model's mode when the traced call began
    switches: list = field(default_factory=list)  # Switch: mode changes the user's code made during the call
    stores: list = field(default_factory=list)  # Store: tensors the user's code put on a module during the call
    storages: dict = field(default_factory=dict, repr=False)  # storage address -> input name, while the trace runs
    result: object = field(default=None, repr=False)  # what the traced call returned (``trace_call``)

    def returned(self, out) -> None:
        """Mark what a traced call returned as the output (a model's generate() calls its forward
        as ``self.forward``, which no module hook sees)."""
        self.sinks.update(self.keys[id(t)] for t in tensors_in(out) if id(t) in self.keys)


@dataclass(frozen=True)
class Store:
    """A tensor the user's code stored as an attribute of a module during a traced call."""

    module: str  # the module it was stored on
    attr: str
    site: tuple  # (file, line) of the assignment
    caller: str = ""  # the module whose code made it
    value: object = field(default=None, compare=False, repr=False)  # what was stored


@dataclass(frozen=True)
class Switch:
    """A ``.train()``/``.eval()`` the user's code called on a module of the model during a traced call."""

    module: str  # dotted name of the module switched ("" = the model itself)
    training: bool  # the mode it set
    site: tuple  # (file, line) of the user's call
    caller: str = ""  # the module whose code made the call


# Operations that draw random numbers whatever their arguments; dropouts draw only when training.
RANDOM_FUNCS = {"multinomial", "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint",
                "randint_like", "randperm", "normal", "normal_", "uniform_", "exponential_", "geometric_",
                "cauchy_", "log_normal_", "random_", "poisson", "rrelu", "gumbel_softmax"}
DROPOUT_FUNCS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}


def _draws(name: str, args: tuple, kwargs: dict) -> bool:
    if name in RANDOM_FUNCS:
        return True
    if name in DROPOUT_FUNCS:  # F.dropout(input, p=0.5, training=True, inplace=False)
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        return bool(training) and float(p) > 0
    return False


def _inplace(name: str) -> bool:
    return (name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES) or \
        (name.startswith("__i") and name.endswith("__")) or name == "__setitem__"  # x *= s, x[i] = v


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (functional wrappers)
        return -1


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
            out_tensors = list(tensors_in(out))
        outs = [t for t in out_tensors if t.layout == torch.strided]
        if not outs or getattr(func, "__name__", "") in ("__get__", "__set__"):
            return out
        read = list(tensors_in((args, kwargs or {})))
        reads = [self.keys[id(t)] for t in read if id(t) in self.keys]
        name = getattr(func, "__name__", "")
        writes = None  # an in-place op into an input (``x.float()`` returning x itself writes nothing)
        if _inplace(name) or "out" in (kwargs or {}):
            writes = next((self.keys[id(t)][1] for t in outs if self.keys.get(id(t), ("",))[0] == "input"), None)
            if writes is None and self.trace.storages:  # through a view of an input
                writes = next((self.trace.storages[p] for p in map(_storage, outs) if p in self.trace.storages), None)
        cuts = any(t.requires_grad for t in read) and not any(t.requires_grad for t in outs)  # detach, no_grad
        i = len(self.trace.ops)
        self.keep.extend(outs)  # alive until the trace ends: ids stay unique
        for slot, t in enumerate(outs):  # an in-place op's result is its input: later reads see this op
            self.keys[id(t)] = ("op", i, slot)
        self.trace.ops.append(Op(getattr(func, "__name__", str(func)), self.stack[-1] if self.stack else "",
                                 user_frame(), reads, [t.detach().clone() for t in outs], writes, cuts,
                                 _draws(name, args, kwargs or {})))
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
    trace.storages.update({_storage(t): name for name, t in inputs.items() if _storage(t) > 0})
    trace.training = model.training
    names = {m: n for n, m in model.named_modules()}

    def pre(m, args):
        stack.append(names[m])
        trace.module_inputs.append((names[m], [[keys.get(id(t)) for t in tensors_in(a)] for a in args]))

    def post(m, args, out):
        if stack:
            stack.pop()
        trace.module_outputs.append((names[m], [keys[id(t)] for t in tensors_in(out) if id(t) in keys]))
        if m is model:
            trace.sinks.update(keys[id(t)] for t in tensors_in(out) if id(t) in keys)

    try:
        with hooked(names, pre, pre=True), hooked(names, post, always_call=True), \
                _Recorder(trace, keys, stack, keep, max_bytes), _switches_recorded(names, trace.switches, stack), \
                _stores_recorded(names, trace.stores, stack):
            yield trace
    finally:
        keep.clear()
        trace.keys, trace.storages = {}, {}


@contextlib.contextmanager
def _module_method_wrapped(name: str, wrap: Callable):
    """``nn.Module.<name>`` replaced by ``wrap(original)`` while the block runs; restored in ``finally``."""
    original = getattr(torch.nn.Module, name)
    setattr(torch.nn.Module, name, wrap(original))
    try:
        yield
    finally:
        setattr(torch.nn.Module, name, original)


def _stores_recorded(names: dict, out: list, stack: list):
    """Record tensors (or tuples/lists/dicts holding them) that the user's code assigns to an attribute
    of a module of ``names`` while the block runs (``nn.Module.__setattr__`` wrapped for the block)."""
    def wrap(original):
        def setattr_(module, attr, value):
            if module in names and not isinstance(value, (torch.nn.Parameter, torch.nn.Module)) and \
                    any(True for _ in tensors_in(value)):
                caller = sys._getframe(1)  # the assignment itself must be the user's (not torch's own bookkeeping)
                if is_user(caller.f_code.co_filename):
                    out.append(Store(names[module], attr, (caller.f_code.co_filename, caller.f_lineno),
                                     stack[-1] if stack else "", value))
            original(module, attr, value)
        return setattr_

    return _module_method_wrapped("__setattr__", wrap)


def _switches_recorded(names: dict, out: list, stack: list):
    """Record every ``.train(mode)`` (``.eval()`` calls it) that the user's code makes on a module of
    ``names`` while the block runs: the outermost call only (``train`` recurses into children)."""
    depth = [0]

    def wrap(original):
        def train(module, mode=True):
            if depth[0] == 0 and module in names:
                site = user_frame()
                if site is not None:
                    out.append(Switch(names[module], bool(mode), site, stack[-1] if stack else ""))
            depth[0] += 1
            try:
                return original(module, mode)
            finally:
                depth[0] -= 1
        return train

    return _module_method_wrapped("train", wrap)


def trace_pair(cap, a: tuple, b: tuple, train: bool = False, seed: Optional[int] = 0, generate: bool = False) -> list:
    """Traced forwards (or ``generate`` calls) of batches ``a`` and ``b`` (``(images, captions)`` each)
    in ``train``/eval mode, seeded alike (``seed=None``: not reseeded, so randomness shows). The model
    is left as it was (modes, RNG, hooks)."""
    from ..state import in_mode, seeded

    traces = []
    for images, captions in (a, b):
        images, captions = images.clone(), captions.clone()  # the model may edit what it is given
        with torch.no_grad(), in_mode(cap.model, train), (seeded(seed) if seed is not None else contextlib.nullcontext()), \
                traced(cap.model, {"images": images, "captions": captions}) as trace:
            trace.returned(cap.model.generate(images, max_len=cap.spec.max_len) if generate and cap.has_generate
                           else cap.call(images, captions))
        traces.append(trace)
    return traces


def trace_call(cap, images, captions, train: bool = False, seed: Optional[int] = 0, grad: bool = False,
               protect: bool = True, generate: bool = False) -> Trace:
    """One traced forward (``grad``: with autograd on, so ``Op.cuts_grad`` means something;
    ``protect=False``: the model receives the tensors themselves, so ``Op.writes`` can show;
    ``generate``: the model's ``generate(images)`` instead; ``seed=None``: not reseeded)."""
    from ..state import in_mode, seeded

    with torch.set_grad_enabled(grad), in_mode(cap.model, train), \
            (seeded(seed) if seed is not None else contextlib.nullcontext()), \
            traced(cap.model, {"images": images, "captions": captions}) as trace:
        trace.result = cap.model.generate(images, max_len=cap.spec.max_len) if generate \
            else cap.call(images, captions, protect=protect)
        trace.returned(trace.result)
    return trace


def trace_function(fn: Callable, args: tuple) -> Trace:
    """The operations of one no-grad call ``fn(*args)`` of a plain function (a ``loss_fn``, a ``bleu_fn``):
    its arguments are not keyed, what it returned is the trace's sink."""
    trace, keep = Trace(), []
    with torch.no_grad(), _Recorder(trace, trace.keys, [], keep, 1 << 28):
        out = fn(*args)
    trace.returned(out)
    keep.clear()
    trace.keys = {}
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
        user = is_user(name)
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
        if _inplace(name) and name != "__setitem__" and args and isinstance(args[0], torch.Tensor):
            inner, via = _user_frames()
            self.writes[id(args[0])] = Write(name, inner, via)  # the last write wins
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Load:
    """A ``load_state_dict(..., strict=False)`` of the user's that left keys unmatched."""

    module: str  # where it loaded, dotted name in the built model ("" = the model; "?" = not part of it)
    site: tuple  # (file, line) of the user's call
    n_given: int  # keys in the state dict it was given
    missing: tuple  # the module's keys the state dict did not have
    unexpected: tuple  # the state dict's keys the module does not have


def traced_build(build: Callable[[], torch.nn.Module]) -> tuple:
    """Run ``build()`` recording the last in-place write to every tensor and every non-strict
    ``load_state_dict`` that left keys unmatched: ``(model, {param name: Write}, [Load])``. Only
    in-place writes reach parameters after construction (``nn.init.*``, ``load_state_dict``'s
    ``copy_``, ``.data.mul_``), so the last one says who set the final value. ``load_state_dict`` is
    restored in ``finally``."""
    writes: dict = {}
    loads: list = []  # (module object, site, n_given, missing, unexpected)

    def wrap(original):
        def load_state_dict(module, state_dict, strict=True, assign=False):
            result = original(module, state_dict, strict=strict, assign=assign)
            site = user_frame()
            if site is not None and (result.missing_keys or result.unexpected_keys):
                loads.append((module, site, len(state_dict), tuple(result.missing_keys), tuple(result.unexpected_keys)))
            return result
        return load_state_dict

    with _module_method_wrapped("load_state_dict", wrap), _WriteRecorder(writes):
        model = build()
    names = {m: n for n, m in model.named_modules()}
    return (model, {n: writes[id(p)] for n, p in model.named_parameters() if id(p) in writes},
            [Load(names.get(m, "?"), *rest) for m, *rest in loads])


def graph(trace: Trace) -> tuple:
    """(consumers of each op, ops from which a returned tensor can be reached)."""
    consumers: dict = {}
    for i, op in enumerate(trace.ops):
        for key in op.inputs:
            if key[0] == "op":
                consumers.setdefault(key[1], []).append(i)
    feeds = [False] * len(trace.ops)
    sinks = {k[1] for k in trace.sinks if k[0] == "op"}
    for i in range(len(trace.ops) - 1, -1, -1):
        feeds[i] = i in sinks or any(feeds[j] for j in consumers.get(i, ()))
    return consumers, feeds

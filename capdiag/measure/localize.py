"""Where does a violation start? The first torch operation whose output breaks a property while its
inputs still satisfy it, named by module and by the line of the user's code that ran it.

A perturbation check compares two forwards (baseline, perturbed), recorded by ``capdiag.measure.trace``
operation by operation with the tensors each read and wrote, the module running it and the line of
the user's code; ``capdiag.measure.violations`` says how a pair of tensors breaks the property checked.
``first_violation`` aligns the two traces and returns the origin:
an operation whose output violates the property (``violates(a, b)``), whose inputs do not, and from
which the violation reaches the model's output through violating operations only. The last
condition discards transient differences that later operations undo (the future tokens a causal
loop slices out at step t > k, an attention score that the mask removes): without it a correct
component would be blamed for a violation that starts elsewhere.

Cost: run only for a check that failed; usually one traced pair of forwards (a single traced forward,
or one rebuild of the model, for some checks; three forwards where a gradient check falls back to the
image path). Recorded outputs stay on their device until ``trace.traced``'s ``max_bytes`` (beyond
it the trace stops and the origin is searched in what was recorded).
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Callable, Optional

import torch

from ..finding import CALLED, ORIGIN, SYMPTOM, Location
from .origins import constant_argument, image_substitute, loop_location, mode_switch, probabilities_into_loss
from .trace import Op, Trace, first_op, graph, trace_call, trace_function, trace_pair, traced_build
from .violations import any_difference


def _aligned(a: Trace, b: Trace) -> int:
    """How many operations two traces share from the start (the same functions, in the same order)."""
    n = 0
    for oa, ob in zip(a.ops, b.ops):
        if oa.func != ob.func or len(oa.outputs) != len(ob.outputs):
            break
        n += 1
    return n


def _reaching(trace: Trace, bad: list) -> list:
    """For the first ``len(bad)`` operations: bad, and reaching a returned tensor through bad operations
    only (walked backwards over consumers)."""
    consumers, _ = graph(trace)
    sinks = {k[1] for k in trace.sinks if k[0] == "op"}
    reaches = [False] * len(bad)
    for i in range(len(bad) - 1, -1, -1):
        reaches[i] = bad[i] and (i in sinks or any(j < len(bad) and reaches[j] for j in consumers.get(i, ())))
    return reaches


def _location(module: str, file: Optional[str], line: Optional[int], evidence: str, kind: str = SYMPTOM) -> Location:
    """A ``Location`` with its source line read from ``file``."""
    import linecache

    code = (linecache.getline(file, line).strip() or None) if file and line else None
    return Location(module, file, line, evidence, code, kind)


def first_violation(a: Trace, b: Trace, violates: Callable[[torch.Tensor, torch.Tensor], bool]) -> Optional[Op]:
    """The origin of a violation in the aligned traces ``a`` (baseline) and ``b`` (perturbed), or None.

    ``violates(x_a, x_b)``: whether a pair of tensors breaks the property. A model input that already
    does (a perturbed image) is no origin, and neither is an operation reading it."""
    dirty_inputs = {n for n in a.inputs if n in b.inputs and _safe(violates, a.inputs[n], b.inputs[n])}
    n = _aligned(a, b)
    bad = [a.ops[i].func not in _UNINITIALIZED and any(_safe(violates, x, y) for x, y in zip(a.ops[i].outputs, b.ops[i].outputs))
           for i in range(n)]

    def dirty(key) -> bool:
        if key[0] == "input":
            return key[1] in dirty_inputs
        return key[0] == "op" and key[1] < n and bad[key[1]]

    reaches = _reaching(a, bad)
    for i in range(n):
        if reaches[i] and not any(dirty(k) for k in a.ops[i].inputs):
            return a.ops[i]
    return None


# Operations that read a tensor's shape (and dtype, device), never its values.
_SHAPE_FACTORIES = {"zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "randint_like",
                    "new_zeros", "new_ones", "new_full", "new_empty", "expand_as", "view_as", "reshape_as", "type_as"}

# Their values are whatever memory held: two runs differ there without meaning anything.
_UNINITIALIZED = {"empty", "empty_like", "new_empty", "empty_strided"}


def _safe(violates, x, y) -> bool:
    try:
        return bool(violates(x, y))
    except (RuntimeError, IndexError):  # shapes the predicate cannot line up: not judged
        return False


def localize_pair(cap, a: tuple, b: tuple, violates: Callable, evidence: str, train: bool = False,
                  seed: Optional[int] = 0) -> Optional[Location]:
    """Where ``violates`` first holds between the traced forwards of batches ``a`` and ``b``: the user's
    mode switch that put that operation's module in the other mode, when one did, else the operation."""
    ta, tb = trace_pair(cap, a, b, train, seed)
    op = first_violation(ta, tb, violates)
    return mode_switch(ta, op, cap.model, evidence) or locate(op, cap.model, evidence)


def dependence_dies(a: Trace, b: Trace, changed: Callable[[torch.Tensor, torch.Tensor], bool],
                    within: tuple = (), floating_only: bool = False,
                    moved: Optional[Callable[[torch.Tensor, torch.Tensor], bool]] = None) -> tuple:
    """Where an input stops mattering: ``(op, "dies")`` for the first operation on the way to the output
    that reads a tensor the perturbation changed and writes one of the same dtype and rank that it did
    not change (``torch.zeros_like(features)``, ``x * 0``, tokens replaced by a constant, a shift that
    moves the changed position away); ``(None, "unread")`` when no operation of the model reads the
    changed input at all (what reads it but reaches nothing may be linked through Python values:
    ``"unknown"``). The death must last: nothing computed from that output may change again (a
    prefix prepended and sliced off later moves a position and moves it back). ``within``: only
    operations of these modules (and their submodules) count; ``floating_only``: only floating-point
    outputs (an argmax or a token choice legitimately ignores small changes). ``moved``: the same
    question as ``changed`` with no tolerance; a dependence has died only where the output is exactly
    unchanged (a tiny change under the tolerance is a weak dependence, not a dead one)."""
    moved = moved or changed
    c = _Changes(a, b, changed)
    read_any = False  # by the model's own code (capdiag's clone of the input does not count)
    for i in range(c.n):
        ins = [c.read(k) for k in a.ops[i].inputs]
        changed_in = [t for t, d in ins if d and t is not None]
        read_any = read_any or bool(changed_in and a.ops[i].site)
        if not c.feeds[i] or not changed_in or c.shape_only(i) or i in c.drawn:
            continue
        if within and not any(a.ops[i].module == m or a.ops[i].module.startswith(m + ".") for m in within):
            continue
        for out, d, out_b in zip(a.ops[i].outputs, c.dirty[i], b.ops[i].outputs):
            if d or (floating_only and not out.is_floating_point()) or _safe(moved, out, out_b):
                continue
            if any(t.dtype == out.dtype and t.dim() == out.dim() for t in changed_in) and c.stays_dead(i):
                return a.ops[i], "dies"
    return None, ("unread" if not read_any else "unknown")


class _Changes:
    """What a perturbation changed in two aligned traces ``a`` (baseline) and ``b`` (perturbed): which
    inputs and operation outputs (``dirty``), which operations reach the output (``feeds``), which
    read each tensor, and which values a random draw decided."""

    def __init__(self, a: Trace, b: Trace, changed: Callable):
        self.a, self.n = a, _aligned(a, b)
        self.dirty_in = {name for name in a.inputs if name in b.inputs and _safe(changed, a.inputs[name], b.inputs[name])}
        self.dirty = [[a.ops[i].func not in _UNINITIALIZED and _safe(changed, x, y)
                       for x, y in zip(a.ops[i].outputs, b.ops[i].outputs)] for i in range(self.n)]
        _, self.feeds = graph(a)
        self.slot_feeds = {k for k in a.sinks if k[0] == "op"}  # (op, slot) pairs from which the output is reached
        self.readers: dict = {}  # key -> ops that read it and reach the output
        self.drawn: set = set()  # ops whose values a random draw decided (scheduled sampling's torch.where)
        for j in range(self.n - 1, -1, -1):
            if self.feeds[j]:
                self.slot_feeds.update(k for k in a.ops[j].inputs if k[0] == "op")
                for k in a.ops[j].inputs:
                    self.readers.setdefault(k, set()).add(j)
        for j in range(self.n):
            if a.ops[j].random or any(k[0] == "op" and k[1] in self.drawn for k in a.ops[j].inputs):
                self.drawn.add(j)

    def read(self, key) -> tuple:
        """The tensor behind a key, and whether it changed."""
        if key[0] == "input":
            return self.a.inputs.get(key[1]), key[1] in self.dirty_in
        if key[0] == "op" and key[1] < self.n:
            return self.a.ops[key[1]].outputs[key[2]], self.dirty[key[1]][key[2]]
        return None, False

    def stays_dead(self, i: int) -> bool:
        """No operation computed from op i changes while nothing it reads changed: a dependence that
        dies here does not come back downstream (a prefix prepended, then sliced off, moves a position
        and moves it back). Changes carried in from elsewhere (the image next to dead attention scores)
        do not count."""
        chain = {i}
        for j in range(i + 1, self.n):
            ins = self.a.ops[j].inputs
            if not any(k[0] == "op" and k[1] in chain for k in ins):
                continue
            chain.add(j)
            if any(self.read(k)[1] for k in ins):
                continue
            if any(d and ("op", j, slot) in self.slot_feeds for slot, d in enumerate(self.dirty[j])):
                return False
        return True

    def shape_only(self, i: int) -> bool:
        """``torch.zeros_like(ctx)`` reads only the shape: it kills the dependence only where nothing else
        carries that tensor's values on to the output (an initial state beside the features is no death)."""
        op = self.a.ops[i]
        if op.func not in _SHAPE_FACTORIES:
            return False
        return any(self.readers.get(k, set()) - {i} for k in op.inputs if self.read(k)[1])


def forward_location(model: torch.nn.Module, evidence: str) -> Location:
    """The user's ``forward`` of the model itself."""
    try:
        fn = type(model).forward
        file, line = inspect.getsourcefile(fn), inspect.getsourcelines(fn)[1]
    except (TypeError, OSError):
        file = line = None
    return _location(f"({type(model).__name__})", file, line, evidence, CALLED)


def module_location(model: torch.nn.Module, name: str, evidence: str) -> Location:
    """A module's own location, for modules no operation points at: the line of the user's class that
    assigns it (``self.aux_head = nn.Linear(...)``), else its class definition."""
    import re

    file = line = None
    try:
        mod = model.get_submodule(name) if name else model
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        attr = name.rsplit(".", 1)[-1]
        src, first = inspect.getsourcelines(type(owner))
        hit = next((i for i, text in enumerate(src) if re.search(rf"self\.{re.escape(attr)}\s*(:[^=]*)?=", text)), None)
        if name and hit is not None:  # where the owner builds it
            file, line = inspect.getsourcefile(type(owner)), first + hit
        else:  # its class definition
            file, line = inspect.getsourcefile(type(mod)), inspect.getsourcelines(type(mod))[1]
    except (TypeError, OSError, AttributeError):
        pass
    return _location(name or f"({type(model).__name__})", file, line, evidence, ORIGIN)


def locate(op: Optional[Op], model: torch.nn.Module, evidence: str, kind: str = SYMPTOM) -> Optional[Location]:
    """A ``Location`` for ``op``: its module and the user's line that ran it."""
    if op is None:
        return None
    if op.site is None:  # nothing of the user's on the stack: the module's class definition
        return dataclasses.replace(module_location(model, op.module, f"{evidence} (in {op.func})"), kind=kind)
    return _location(op.module or f"({type(model).__name__})", *op.site, f"{evidence} (in {op.func})", kind)


def who_wrote(build, module: str, tensors: list) -> Optional[Location]:
    """The user's line that last wrote most of ``tensors`` (parameter names under ``module``) in a
    fresh ``build()`` (or in what ``traced_build`` returned for one); None when nothing of the user's
    wrote them."""
    import collections
    import linecache

    _, writes, _ = traced_build(build) if callable(build) else build
    sites = collections.Counter((w.site, w.via, w.func) for n, w in writes.items() if n in tensors and w.site)
    if not sites:
        return None
    (site, via, func), n = sites.most_common(1)[0]
    inner = f"{Path(site[0]).name}:{site[1]}: {linecache.getline(site[0], site[1]).strip()}"
    if via is not None and via != site:  # the line to fix is the apply() that carried the init this far
        return _location(module, *via, f"{n} of the {len(tensors)} tensors were last written by {func} in {inner}", ORIGIN)
    return _location(module, *site, f"{n} of the {len(tensors)} tensors were last written here ({func})", ORIGIN)


def where_image_dies(cap, images: torch.Tensor, captions: torch.Tensor, seed: int = 0,
                     generate: bool = False, within: tuple = ()) -> Optional[Location]:
    """Along the image path, where the output stops depending on the image: eval-mode forwards (or
    ``generate`` calls) of the batch and of the batch with its images rolled by one are compared.
    None when every stage still depends on the image (a model that reads its image but has learned
    to ignore it has no single place to point at)."""
    if images.shape[0] < 2:
        return None
    a, b = trace_pair(cap, (images, captions), (images.roll(1, 0), captions), False, seed, generate)
    op, how = dependence_dies(a, b, any_difference(1e-6), within, floating_only=True, moved=any_difference(0.0))
    call = "generate()" if generate else "forward"
    if generate and op is None and not within:  # what generate() feeds its decoder in place of image features
        sub = image_substitute(trace_call(cap, images, captions, seed=seed), a, cap.model)
        if sub is not None or how == "unread":
            return sub or loop_location(cap, images, "no operation of generate() reads the images")
    if how == "unread" and not within:
        return constant_argument(a, cap.model, images.shape[0]) or forward_location(cap.model, f"no operation of {call} on the way to the output reads the images")
    evidence = f"reads image-dependent values in {call}, but its output no longer depends on the image"
    return mode_switch(a, op, cap.model, evidence) or locate(op, cap.model, evidence)


def function_location(fn: Callable, args: tuple, evidence: str,
                      prefer: tuple = ("cross_entropy", "nll_loss", "log_softmax", "softmax")) -> Location:
    """Where in the user's function ``fn`` (a ``loss_fn``, a ``bleu_fn``) the result is computed: the
    line of its first operation named in ``prefer`` (the loss itself), else of the operation that
    produced what it returned, else its ``def`` line (pure Python, e.g. BLEU over token lists)."""
    trace = trace_function(fn, args)
    sinks = sorted(k[1] for k in trace.sinks if k[0] == "op")
    op = first_op(trace, lambda o: o.func in prefer and o.site is not None) or \
        (trace.ops[sinks[-1]] if sinks and trace.ops[sinks[-1]].site else None)
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", "the function"))
    if op is not None:
        return _location(name, *op.site, f"{evidence} (in {op.func})")
    try:
        target = inspect.unwrap(getattr(fn, "__func__", fn))
        file, line = inspect.getsourcefile(target), inspect.getsourcelines(target)[1]
    except (TypeError, OSError):
        file = line = None
    return _location(name, file, line, evidence, CALLED)


def where_probabilities(cap, images: torch.Tensor, captions: torch.Tensor, seed: int = 0) -> Optional[Location]:
    """A softmax whose probabilities reach the training loss, which takes logits (the forward's output
    and the loss the model trains with, each traced once)."""
    from ..captioner import align_logits, extract_logits

    fwd = trace_call(cap, images, captions, seed=seed)
    logits = extract_logits(fwd.result)
    losses = [lambda x, c: cap.loss_from_logits(align_logits(x, c), c)]  # the loss capdiag trains copies with
    if cap.loss_fn is not None:  # and the model file's own, which may apply a softmax itself
        losses.insert(0, cap.loss_fn)
    for fn in losses:
        where = probabilities_into_loss(fwd, trace_function(fn, (logits, captions)), cap.model)
        if where is not None:
            return where
    return None



"""Where a gradient stops and where values blow up: the operations of one traced forward that cut,
zero or lose the path from parameters to the loss, the first non-finite operation and the largest
gain. ``capdiag.measure.localize`` compares two traces; these read one."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..finding import Location
from .localize import _reaching, locate, module_location, where_image_dies
from .origins import constant_argument
from .trace import Op, Trace, graph, trace_call


def first_nonfinite(trace: Trace) -> Optional[Op]:
    """The first operation whose NaN/inf output reaches the model's output through non-finite
    operations, while its inputs were finite (a -inf attention mask that attention absorbs is not it)."""
    bad = [not all(bool(torch.isfinite(t).all()) for t in op.outputs if t.is_floating_point()) for op in trace.ops]
    reaches = _reaching(trace, bad)
    return next((op for i, op in enumerate(trace.ops)
                 if reaches[i] and not any(bad[k[1]] for k in op.inputs if k[0] == "op")), None)


def largest_gain(trace: Trace) -> Optional[Op]:
    """The operation on the way to the output that scales its input up the most (RMS of its output over
    the largest RMS of the floating-point tensors it read from earlier operations), when that gain
    is above 10x; else the operation that produced the output."""
    _, feeds = graph(trace)
    rms = [max((float(t.float().pow(2).mean().sqrt()) for t in op.outputs if t.is_floating_point() and t.numel()),
               default=0.0) for op in trace.ops]
    best, gain = None, 10.0
    for i, op in enumerate(trace.ops):
        ins = [rms[k[1]] for k in op.inputs if k[0] == "op" and trace.ops[k[1]].outputs[k[2]].is_floating_point()]
        if feeds[i] and ins and max(ins) > 0 and rms[i] / max(ins) > gain:
            best, gain = op, rms[i] / max(ins)
    if best is None:
        sinks = sorted(k[1] for k in trace.sinks if k[0] == "op")
        best = trace.ops[sinks[0]] if sinks else None
    return best


def _zero(op: Op) -> bool:
    return all(t.is_floating_point() and not bool(t.any()) for t in op.outputs)


def gradient_cut(trace: Trace, params: set) -> tuple:
    """Where parameters ``params`` (names) lose their path to the loss in a grad-enabled trace:
    ``(op, how)`` with ``how`` one of "cut" (a detach or no_grad op on the way to the output),
    "zeroed" (an all-zero output of non-zero inputs on the way: the gradient that passes is zero),
    "dead end" (their branch never reaches the output: ``op`` is its last operation) or
    "never called" (no operation read them: ``op`` is None)."""
    consumers, feeds = graph(trace)
    start = [i for i, op in enumerate(trace.ops) if any(k[0] == "param" and k[1] in params for k in op.inputs)]
    if not start:
        return None, "never called"
    seen, todo = set(start), list(start)
    while todo:  # everything computed from them
        for j in consumers.get(todo.pop(), ()):
            if j not in seen:
                seen.add(j)
                todo.append(j)
    on_way = sorted(i for i in seen if feeds[i])
    cut = next((trace.ops[i] for i in on_way if trace.ops[i].cuts_grad), None)
    if cut is not None:
        return cut, "cut"
    # Where zeros start on the way (x * 0, zeros_like(features), a ReLU dead for every input): an all-zero
    # output of an operation that read something and nothing all-zero. Searched over what feeds the
    # parameters' branch too: images replaced by zeros before the encoder zero its gradient as well.
    upstream, todo = set(), [i for i in seen]
    while todo:
        for k in trace.ops[todo.pop()].inputs:
            if k[0] == "op" and k[1] not in upstream:
                upstream.add(k[1])
                todo.append(k[1])
    for i in sorted(upstream | set(on_way)):
        op = trace.ops[i]
        reads = [k for k in op.inputs if k[0] in ("op", "input")]
        if _zero(op) and reads and not op.func.startswith("new_") and not any(
                k[0] == "op" and _zero(trace.ops[k[1]]) for k in reads):
            return op, "zeroed"
    if not on_way:
        return trace.ops[max(seen)], "dead end"
    return None, "unknown"


def dead_module(trace: Trace, op: Op) -> Optional[str]:
    """The outermost module whose output is the dead end ``op`` produced (or computed from it)."""
    i = trace.ops.index(op)
    best = None
    for name, keys in trace.module_outputs:  # outer modules complete later
        if any(k[0] == "op" and k[1] >= i for k in keys) and not any(k[0] == "op" and k[1] > i for k in keys):
            best = name
    return best


def owner_module(name: str) -> str:
    """The module a parameter belongs to (``(top level)`` for the model's own)."""
    return name.rsplit(".", 1)[0] if "." in name else "(top level)"


def summarize_modules(names: list, limit: int = 4) -> str:
    """``a, b, c and 2 more``: the modules that parameters ``names`` belong to."""
    mods = sorted({owner_module(n) for n in names})
    more = f" and {len(mods) - limit} more" if len(mods) > limit else ""
    return ", ".join(mods[:limit]) + more


def where_gradient_stops(s, names: list) -> Optional[Location]:
    """Where the parameters ``names`` lose their path to the loss: a detach/no_grad or an all-zero output
    on the way (one traced forward); else, when their branch never reaches the output or never runs, the
    point where the image stops mattering (an image replaced by zeros or a constant: two more), else the
    dead branch or the module never called. ``s`` is a non-live ``Subject`` (the traced forward runs the
    model in train mode, so only under the runner's state snapshot)."""
    from .probe import param_part
    cap = s.captioner
    trace = trace_call(cap, s.images, s.captions, train=True, seed=s.seed, grad=True)
    op, how = gradient_cut(trace, set(names))
    if how == "cut":
        return locate(op, cap.model, f"the gradient of {summarize_modules(names, 2)} stops here")
    if how == "zeroed":
        return locate(op, cap.model, f"all-zero output computed from {summarize_modules(names, 2)}: the gradient back is zero")
    enc = cap.spec.image_module
    image_side = any(n.startswith(enc + ".") if enc else param_part(n) == "encoder" for n in names)
    image = where_image_dies(cap, s.images, s.captions, s.seed) if image_side else None
    if image is not None:
        return image
    if how == "never called":  # name the outermost module none of whose parameters are reached
        owner, cut = owner_module(names[0]), set(names)
        owner = "" if owner == "(top level)" else owner
        while "." in owner:
            parent = owner.rsplit(".", 1)[0]
            if not all(f"{parent}.{n}" in cut for n, p in cap.model.get_submodule(parent).named_parameters() if p.requires_grad):
                break
            owner = parent
        return module_location(cap.model, owner, "built (it has trainable parameters) but never called in forward")
    if how == "dead end":
        instead = constant_argument(trace, cap.model, s.images.shape[0]) if image_side else None
        if instead is not None:  # the image branch runs, and the decoder gets a constant in its place
            return dataclasses.replace(instead, evidence=instead.evidence.replace(
                "no operation of forward reads the images", f"the output of {summarize_modules(names, 2)} never reaches "
                "the logits"))
        module = dead_module(trace, op)
        if module:
            return module_location(cap.model, module, "its output never reaches the logits (computed, then unused)")
        return locate(op, cap.model, f"computed from {summarize_modules(names, 2)}, but nothing after it reaches the logits")
    return None

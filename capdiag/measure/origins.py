"""Origins: the line of the user's code that causes a class of failure, read off one traced call
instead of found by comparing two. Each function answers one question about a trace (or a build)
and returns a ``Location`` of kind ``origin``, or None when the trace shows no such cause; the
check then falls back to a compared trace (``first symptom``) or to the method it called
(``called from``, see ``called_location``).

- ``random_draw``: an operation drawing random numbers (``torch.multinomial``, a dropout with
  ``training=True``) in an eval-mode call;
- ``input_write``: an in-place write into the caller's tensor, itself or a view of it
  (``dec_in = captions[:, :-1]; dec_in[...] = PAD``);
- ``mode_switch``: ``.train()``/``.eval()`` called on a submodule inside the call, where the op a
  comparison blamed runs in that submodule;
- ``unmatched_load``: ``load_state_dict(strict=False)`` during ``build_model()`` that left the keys of
  the module a check failed on unmatched;
- ``stuck_positions``: a position table read with the same constant index at every decoding step;
- ``probabilities_into_loss``: a softmax whose probabilities reach a loss that applies its own
  log-softmax;
- ``image_substitute``: in ``generate()``, the tensor a decoder module reads where the forward feeds
  it image features, computed from none of the images.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch

from ..finding import CALLED, ORIGIN, SYMPTOM, Location
from ..hooks import hooked, tensors_in
from ..state import in_mode, seeded
from ..usercode import is_user
from .trace import Op, Trace


def _loc(module: str, site: Optional[tuple], evidence: str, kind: str = ORIGIN) -> Location:
    import linecache

    file, line = site if site else (None, None)
    code = (linecache.getline(file, line).strip() or None) if file and line else None
    return Location(module, file, line, evidence, code, kind)


def _model_name(model: torch.nn.Module, module: str) -> str:
    return module or f"({type(model).__name__})"


def random_draw(trace: Trace, model: torch.nn.Module, call: str = "forward") -> Optional[Location]:
    """The first operation of an eval-mode ``trace`` that draws random numbers from the user's code."""
    if trace.training:
        return None
    op = next((o for o in trace.ops if o.random and o.site is not None), None)
    if op is None:
        return None
    return _loc(_model_name(model, op.module), op.site,
                f"{op.func} draws random numbers in {call} while the model is in eval mode")


def input_write(trace: Trace, model: torch.nn.Module, call: str = "forward") -> Optional[Location]:
    """The first in-place write of ``trace`` into a tensor the caller passed (or a view of one)."""
    op = next((o for o in trace.ops if o.writes is not None and o.site is not None), None)
    if op is None:
        return None
    what = "an indexed assignment (x[...] = v)" if op.func == "__setitem__" else op.func
    return _loc(_model_name(model, op.module), op.site,
                f"{what} writes into the caller's {op.writes} tensor (or a view of it) during {call}")


def mode_switch(trace: Trace, op: Optional[Op], model: torch.nn.Module, evidence: str) -> Optional[Location]:
    """The user's ``.train()``/``.eval()`` call during the traced call that put ``op``'s module in the
    other mode than the one capdiag called the model in (``self.encoder.train()`` inside forward: a
    BatchNorm layer of the encoder then normalizes with batch statistics in eval mode)."""
    if op is None:
        return None
    for sw in trace.switches:
        inside = not sw.module or op.module == sw.module or op.module.startswith(sw.module + ".")
        if inside and sw.training != trace.training:
            mode, called = ("train", "eval") if sw.training else ("eval", "train")
            what = f"{sw.module!r}" if sw.module else "the model"
            return _loc(_model_name(model, sw.caller), sw.site,
                        f"the model switches {what} to {mode} mode inside the call capdiag made in {called} mode; "
                        f"{evidence} (in {op.func} of {op.module or 'the model'})")
    return None


def unmatched_load(loads: list, module: str) -> Optional[Location]:
    """Of the ``load_state_dict(..., strict=False)`` calls a traced build recorded (``trace.Load``),
    the first that left keys of ``module`` (or a module above or below it) unmatched: its line, with
    both key groups."""
    for ld in loads:
        related = ld.module == "?" or not ld.module or not module or module == ld.module or \
            module.startswith(ld.module + ".") or ld.module.startswith(module + ".")
        if not related:
            continue
        matched = ld.n_given - len(ld.unexpected)
        return _loc(ld.module if ld.module not in ("", "?") else module, ld.site,
                    f"load_state_dict(strict=False) matched {matched} of the {ld.n_given} keys it was given: "
                    f"{len(ld.missing)} of the module's keys missing ({_some(ld.missing)}), {len(ld.unexpected)} "
                    f"unexpected ({_some(ld.unexpected)})")
    return None


def _some(keys: tuple, n: int = 2) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _constant_lookups(trace: Trace) -> dict:
    """``{(site, table): [op index]}``: reads of one parameter (an embedding weight) at one line with an
    index computed from no input and no parameter (``arange``, ``zeros``, a Python int)."""
    const: set = set()  # ops computed from constants only
    for i, op in enumerate(trace.ops):
        if all(k[0] == "op" and k[1] in const for k in op.inputs):
            const.add(i)
    groups: dict = {}
    for i, op in enumerate(trace.ops):
        params = [k for k in op.inputs if k[0] == "param"]
        others = [k for k in op.inputs if k[0] != "param"]
        if op.func in ("embedding", "__getitem__", "index_select") and len(params) == 1 and op.site \
                and all(k[0] == "op" and k[1] in const for k in others):
            groups.setdefault((op.site, params[0][1]), []).append(i)
    return groups


def stuck_positions(trace: Trace, model: torch.nn.Module, fwd: Trace) -> Optional[Location]:
    """In a ``generate()`` trace: a position table (one the forward ``fwd`` reads with constant indices,
    not with the captions) read at one line at three or more steps with a constant index, returning
    the same rows every time: position ids that do not advance with the decoding step. The line that
    computed the index, else the lookup's own line."""
    tables = {table for _, table in _constant_lookups(fwd)}
    groups = {key: idx for key, idx in _constant_lookups(trace).items() if key[1] in tables}
    for (site, param), idx in groups.items():
        outs = [trace.ops[i].outputs[0] for i in idx]
        if len(idx) >= 3 and all(o.shape == outs[0].shape and torch.equal(o, outs[0]) for o in outs[1:]):
            op = trace.ops[idx[-1]]
            index_op = next((trace.ops[k[1]] for k in op.inputs if k[0] == "op" and trace.ops[k[1]].site), None)
            at, module = (index_op.site, index_op.module) if index_op is not None else (site, op.module)
            return _loc(_model_name(model, module), at,
                        f"{param} is read at the same position at all {len(idx)} decoding steps: the position "
                        f"index does not advance with the step (same rows every call of {op.func})")
    return None


_SHAPE_ONLY = {"view", "reshape", "permute", "transpose", "contiguous", "__getitem__", "narrow", "squeeze",
               "unsqueeze", "flatten", "to", "float", "type_as", "clone", "detach", "t", "expand", "view_as"}


def probabilities_into_loss(fwd: Trace, loss: Trace, model: torch.nn.Module) -> Optional[Location]:
    """A ``softmax`` (not a log-softmax) whose probabilities reach the loss through shape-only
    operations, where the loss applies a log-softmax of its own (``cross_entropy``): the loss of
    probabilities cannot fall below ``log(1 + (V - 1) / e)``. Looked for in the loss function's trace
    (``cross_entropy(softmax(logits))``) and at the forward's output (``return logits.softmax(-1)``
    followed by a loss that takes logits)."""
    def softmax_behind(trace: Trace, i: int) -> Optional[Op]:
        while True:
            op = trace.ops[i]
            if op.func == "softmax":
                return op
            if op.func not in _SHAPE_ONLY:
                return None
            srcs = [k for k in op.inputs if k[0] == "op"]
            if len(srcs) != 1:
                return None
            i = srcs[0][1]

    ce = [op for op in loss.ops if op.func in ("cross_entropy", "log_softmax")]
    if not ce:
        return None
    for op in ce:  # a softmax inside the loss function
        src = next((k for k in op.inputs if k[0] == "op"), None)
        sm = softmax_behind(loss, src[1]) if src else None
        if sm is not None and sm.site:
            return _loc(_model_name(model, sm.module), sm.site,
                        f"softmax probabilities go into {op.func}, which applies its own log-softmax")
    for k in sorted(fwd.sinks):  # the forward returns probabilities
        if k[0] != "op":
            continue
        sm = softmax_behind(fwd, k[1])
        if sm is not None and sm.site and _rows_sum_to_one(sm.outputs[0]):
            return _loc(_model_name(model, sm.module), sm.site,
                        f"forward returns softmax probabilities (every row sums to 1) and the loss applies "
                        f"{ce[0].func}'s own log-softmax on top")
    return None


def _rows_sum_to_one(t: torch.Tensor) -> bool:
    t = t.float()
    return t.numel() > 0 and bool((t >= 0).all()) and bool(((t.sum(-1) - 1).abs() < 1e-3).all())


def _computed_from(trace: Trace, inputs: set) -> set:
    """The keys of ``trace`` computed from the named model inputs (the inputs' own keys included)."""
    out = {("input", name) for name in inputs}
    for i, op in enumerate(trace.ops):
        if any(k in out for k in op.inputs):
            out.update(("op", i, slot) for slot in range(len(op.outputs)))
    return out


def image_substitute(fwd: Trace, gen: Trace, model: torch.nn.Module) -> Optional[Location]:
    """In ``generate()``: an argument of a module call computed from none of the images, where at every
    call of that module in the forward the same argument is computed from them (``memory =
    self.memory0.expand(B, -1, -1)`` passed to the decoder in place of the encoder's output). The
    line that computed it, or None when generate() feeds every such argument from the images."""
    img_f, img_g = _computed_from(fwd, {"images"}), _computed_from(gen, {"images"})
    fed: dict = {}  # (module, argument) -> computed from the images at every forward call
    for module, args in fwd.module_inputs:
        for j, keys in enumerate(args):
            if keys and all(k is not None for k in keys):
                fed[(module, j)] = fed.get((module, j), True) and all(k in img_f for k in keys)
    for module, args in gen.module_inputs:
        for j, keys in enumerate(args):
            if not fed.get((module, j)) or not keys or any(k is None or k in img_g for k in keys):
                continue
            src = next((gen.ops[k[1]] for k in keys if k[0] == "op" and gen.ops[k[1]].site), None)
            if src is not None:
                return _loc(_model_name(model, src.module), src.site,
                            f"generate() passes {module!r} an argument computed from none of the images (argument "
                            f"{j + 1}; the forward passes image features there): generate() never reads the image")
    return None


def constant_argument(trace: Trace, model: torch.nn.Module, batch: int) -> Optional[Location]:
    """In a forward that reads no image: the first batch-sized floating-point argument of a module call
    computed from no input at all (``memory = self.memory_const.expand(B, -1, -1)``, ``torch.zeros(B,
    d)``): what the model feeds where image features belong. Its line, or None."""
    derived = _computed_from(trace, set(trace.inputs))
    for module, args in trace.module_inputs:
        for j, keys in enumerate(args):
            if not keys or any(k is None or k[0] != "op" or k in derived for k in keys):
                continue
            src = trace.ops[keys[0][1]]
            t = src.outputs[keys[0][2]]
            if src.site is not None and t.is_floating_point() and t.dim() >= 2 and t.shape[0] == batch:
                return _loc(_model_name(model, src.module), src.site,
                            f"no operation of forward reads the images; argument {j + 1} of {module!r}, batch-sized, "
                            f"is computed from no input at all ({src.func})", SYMPTOM)
    return None


def called_location(cap, images: torch.Tensor, method: str, evidence: str) -> Optional[Location]:
    """Where nothing inside could be traced: the user's method ``method`` that capdiag called and that
    misbehaved. For ``generate`` the line of its loop that runs the decoder; for ``forward``,
    ``loss_fn`` and ``bleu_fn`` their ``def`` line. None when the method is not the user's code."""
    model = cap.model
    if method == "generate" and cap.has_generate:
        where = loop_location(cap, images, evidence)
        if where is not None:
            return where
    fn = getattr(cap, method, None) if method in ("loss_fn", "bleu_fn") else getattr(type(model), method, None)
    if fn is None:
        return None
    try:
        target = inspect.unwrap(getattr(fn, "__func__", fn))
        file, line = inspect.getsourcefile(target), inspect.getsourcelines(target)[1]
    except (TypeError, OSError):
        return None
    if not is_user(file):
        return None
    name = getattr(target, "__qualname__", method)
    where = _model_name(model, "") if method in ("forward", "generate") else name
    return _loc(where, (file, line), f"{evidence} (no single operation in it could be traced)", CALLED)


def loop_location(cap, images: torch.Tensor, evidence: str, max_len: Optional[int] = None) -> Optional[Location]:
    """``called from`` the line of ``generate()``'s loop that runs the decoder (``generate_loop_site``),
    with ``evidence``; None when nothing of generate() can be traced."""
    site = generate_loop_site(cap, images, max_len or cap.spec.max_len)
    if site is None:
        return None
    module, file, line, _ = site
    return _loc(_model_name(cap.model, ""), (file, line),
                f"{evidence}; generate()'s loop runs the decoder ({module or 'the model'}) here", CALLED)


def carried_state(cap, first: tuple, then: tuple, generate: bool = False) -> Optional[Location]:
    """State carried from one call to the next: on a deep copy, call the model on ``first`` (images,
    captions) recording the tensors the user's code stores on its modules (``self._cached = feats``),
    then on ``then`` with those tensors watched. The line that stored the first of them the second call
    reads is the origin; the operation that read it is in the evidence."""
    import copy

    from ..state import in_mode
    from .trace import traced

    model = copy.deepcopy(cap.model)
    used = cap.with_model(model)
    used.stateless = False

    def call(images, captions):
        return model.generate(images, max_len=cap.spec.max_len) if generate else used.call(images, captions)

    with torch.no_grad(), in_mode(model, False):
        with traced(model, {"images": first[0].clone(), "captions": first[1].clone()}) as a:
            call(first[0].clone(), first[1].clone())
        stored = {f"self.{st.attr}": st for st in a.stores}
        watched = {}
        for name, st in stored.items():
            for i, t in enumerate(_tensors_of(st.value)):
                watched[f"{name}#{i}"] = t
        if not watched:
            return None
        images, captions = then[0].clone(), then[1].clone()
        with traced(model, {"images": images, "captions": captions, **watched}) as b:
            call(images, captions)
    for op in b.ops:
        hit = next((k[1] for k in op.inputs if k[0] == "input" and k[1] in watched), None)
        if hit is not None:
            st = stored[hit.split("#")[0]]
            read = f" at line {op.site[1]}" if op.site else ""
            return _loc(_model_name(model, st.caller), st.site,
                        f"{'generate()' if generate else 'forward'} stores {hit.split('#')[0]} here and the next "
                        f"call reads it ({op.func} in {op.module or 'the model'}{read}): state carried between calls")
    return None


def _tensors_of(value) -> list:
    return list(tensors_in(value))


def generate_loop_site(cap, images: torch.Tensor, max_len: int):
    """``(module, file, line, code)`` of the line in the model's generate() loop that runs the decoder:
    the user's line, outside forward()'s own call path, from which most module calls of one generate()
    call are made (a loop calls its decoder step once per token). None when nothing can be traced."""
    import collections
    import inspect
    import linecache
    import sys

    model = cap.model
    try:
        gen_file = inspect.getsourcefile(inspect.unwrap(type(model).generate))  # past @torch.no_grad()
    except (TypeError, OSError, AttributeError):
        return None
    names = {m: n for n, m in model.named_modules()}

    def user_frames():
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_filename == gen_file:
                yield f
            f = f.f_back

    forward_path: set = set()
    calls: collections.Counter = collections.Counter()

    def on_forward(m, args):
        for f in user_frames():
            forward_path.add(f.f_code)

    depth = [0]  # module calls running: only outermost calls count (an encoder's layers are one call)

    def on_generate(m, args):
        depth[0] += 1
        if depth[0] > 1:
            return
        for f in user_frames():
            if f.f_code not in forward_path and f.f_code.co_name != "forward":
                calls[(f.f_code.co_filename, f.f_lineno, names.get(m, ""))] += 1
                return

    def done(m, args, out):
        depth[0] -= 1

    def run(hook, fn, post=None):
        modules = [m for m in model.modules() if m is not model]
        with hooked(modules, hook, pre=True), (hooked(modules, post) if post else contextlib.nullcontext()), \
                torch.no_grad(), in_mode(model, False), seeded(0):
            fn()

    x = images[:2]
    ids = torch.full((x.shape[0], 2), cap.spec.bos_id, dtype=torch.long, device=x.device)
    run(on_forward, lambda: cap.call(x, ids))
    run(on_generate, lambda: cap.generate(x, max_len=max_len), done)
    if not calls:
        return None
    by_line: dict = {}  # line -> (module calls, parameters those calls ran): the decoder step beats the embeddings
    sizes = {n: sum(p.numel() for p in m.parameters()) for m, n in names.items()}
    for (file, line, mod), n in calls.items():
        c, p = by_line.get((file, line), (0, 0))
        by_line[(file, line)] = (c + n, p + n * sizes.get(mod, 0))
    file, line = max(by_line, key=by_line.get)
    modules = collections.Counter({mod: n for (f, ln, mod), n in calls.items() if (f, ln) == (file, line)})
    module = min((m for m, n in modules.items() if n == max(modules.values())), key=lambda m: m.count("."))
    return module, file, line, linecache.getline(file, line).strip()

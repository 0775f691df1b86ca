"""Per-parameter gradient statistics: one definition for the gradient_flow check and the monitor.

``gradient_rows`` turns gradients (from a probe's own backward, or the ``.grad`` a training step
left) into one row per trainable parameter: part, mean |g|, max |g|, L2 norm and a flag. The
statistics are fused ``torch._foreach_norm`` calls read back in one device sync, so the pass costs
about the same on 20 parameters or 2,000. On the training hot path only the L2 pass runs: it is
the fastest (3.4 ms over 11M gradients here, against 6.0 ms for L1 and 18.8 ms for L-inf).

Sharded gradients (FSDP2 ``DTensor``s, FSDP1 flat shards): each rank holds a piece of each
gradient, so the sums (L1, squared L2, presence) are reduced with one SUM and the maxima with one
MAX collective; nothing is gathered.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..captioner import Captioner
from ..state import in_mode, seeded
from ..distributed import clean_name, comm_device, dist_or_none, local_shard
from .probe import param_part

IMAGE_PATH = ("encoder", "projection")
TEXT_PATH = ("decoder", "embedding", "output")
PARTS = IMAGE_PATH + TEXT_PATH


@functools.lru_cache(maxsize=65536)  # called per parameter on the training hot path
def part_of(name: str, image_module: Optional[str]) -> str:
    """The part of a captioner a parameter belongs to: ``encoder`` for everything under the
    declared ``image_module``, else judged from its name (see ``probe.param_part``)."""
    name = clean_name(name)
    if image_module and (name == image_module or name.startswith(image_module + ".")):
        return "encoder"
    return param_part(name)


def gradient_rows(named: Sequence[tuple], grads: Mapping[str, Optional[torch.Tensor]],
                  image_module: Optional[str], sharded: bool = False, full: bool = True) -> list:
    """One row per ``(name, parameter)`` of ``named``: name, part, numel, mean_abs, max_abs, norm,
    flag ("" healthy, "none" no gradient, "zero" all zeros, "nonfinite" NaN/inf).

    Args:
        named: the trainable parameters, in order.
        grads: gradient per name (None or missing: no gradient).
        image_module: the declared image module (its parameters are the "encoder" part).
        sharded: gradients are shards of a tensor split across ranks: reduce the statistics.
        full: also L1 and L-inf (two more passes over all gradient memory, each slower than the
            fused L2 pass). Without it (the training hot path) only the L2 pass runs: ``mean_abs``
            and ``max_abs`` are NaN, and a zero norm marks an all-zero gradient.
    """
    present = [(i, local_shard(grads[n]).detach()) for i, (n, _) in enumerate(named) if grads.get(n) is not None]
    idx = [i for i, _ in present]
    device = present[0][1].device if present else (comm_device() if sharded else torch.device("cpu"))
    # A rank's piece of a small tensor can be empty (a bias split over ranks): it contributes zeros
    # (and the L-inf norm of an empty tensor is an error), so only non-empty pieces are measured.
    full_pieces = [(k, g) for k, (_, g) in enumerate(present) if g.numel()]
    sums = torch.zeros(3, len(present), device=device)
    sums[2] = 1.0  # present
    maxima = torch.zeros(len(present), device=device)
    if full_pieces:
        at = torch.tensor([k for k, _ in full_pieces], dtype=torch.long, device=device)
        pieces = [g for _, g in full_pieces]
        sums[1, at] = torch.stack(torch._foreach_norm(pieces, 2)).float() ** 2
        if full:
            sums[0, at] = torch.stack(torch._foreach_norm(pieces, 1)).float()
            maxima[at] = torch.stack(torch._foreach_norm(pieces, float("inf"))).float()
    if sharded:
        # Every rank must contribute the same layout: scatter into one slot per parameter.
        at = torch.tensor(idx, dtype=torch.long, device=device)
        all_sums = torch.zeros(3, len(named), device=device).index_copy_(1, at, sums).to(comm_device())
        all_max = torch.zeros(len(named), device=device).index_copy_(0, at, maxima).to(comm_device())
        d = dist_or_none()
        d.all_reduce(all_sums)
        d.all_reduce(all_max, op=d.ReduceOp.MAX)
        idx, sums, maxima = list(range(len(named))), all_sums, all_max
    values = torch.cat([sums, maxima[None]]).tolist() if len(idx) else [[], [], [], []]  # one sync
    stats = {i: (l1, sq, seen, mx) for i, l1, sq, seen, mx in zip(idx, *values)}
    rows = []
    for i, (n, p) in enumerate(named):
        row = {"name": clean_name(n), "part": part_of(n, image_module), "numel": p.numel()}
        l1, sq, seen, mx = stats.get(i, (0.0, 0.0, 0.0, 0.0))
        if not seen:
            row.update(mean_abs=0.0, max_abs=0.0, norm=0.0, flag="none")
        else:
            finite = math.isfinite(l1) and math.isfinite(sq) and math.isfinite(mx)
            if not full:
                l1 = mx = float("nan")
            row.update(mean_abs=l1 / max(p.numel(), 1), max_abs=mx, norm=math.sqrt(sq) if finite else float("nan"),
                       sq=sq, flag="nonfinite" if not finite else ("zero" if sq == 0 else ""))
        rows.append(row)
    return rows


def step_grads(named: Sequence[tuple]) -> dict:
    """The ``.grad`` a training step left on each parameter (None where it left none)."""
    return {n: p.grad for n, p in named}


def by_layer(rows: list) -> list:
    """Aggregate parameter rows per module (weight and bias together)."""
    layers: dict = {}
    for r in rows:
        mod = r["name"].rsplit(".", 1)[0] if "." in r["name"] else r["name"]
        L = layers.setdefault(mod, {"name": mod, "part": r["part"], "sum_abs": 0.0, "numel": 0, "max_abs": 0.0, "flags": []})
        L["sum_abs"] += r["mean_abs"] * r["numel"]
        L["numel"] += r["numel"]
        L["max_abs"] = max(L["max_abs"], r["max_abs"])
        if r["flag"]:
            L["flags"].append(r["flag"])
    out = []
    for L in layers.values():
        L["mean_abs"] = L["sum_abs"] / max(L["numel"], 1)
        L["flag"] = L["flags"][0] if L["flags"] else ""
        out.append(L)
    return out


def part_mean_abs(rows: list, parts: Sequence[str]) -> Optional[float]:
    """Mean |g| over all elements of the parameters in ``parts`` (None when there are none)."""
    sel = [r for r in rows if r["part"] in parts]
    n = sum(r["numel"] for r in sel)
    return sum(r["mean_abs"] * r["numel"] for r in sel) / n if n else None


def part_rms(rows: list, parts: Sequence[str]) -> Optional[float]:
    """Root mean square gradient over all elements of the parameters in ``parts`` (None when there
    are none): from the L2 norms, the one statistic the training hot path computes."""
    sel = [r for r in rows if r["part"] in parts]
    n = sum(r["numel"] for r in sel)
    return math.sqrt(sum(r["sq"] for r in sel if r["flag"] != "none") / n) if n else None


def gradient_metrics(rows: list) -> dict:
    """The scalars every front end reports for one gradient pass (same names everywhere):
    ``rms_grad_<part>`` and ``image_over_text_rms_grad`` always (the monitor's too), and with full
    statistics ``mean_abs_grad_<part>`` and ``image_over_text_grad`` (mean |g|, which gradient_flow
    judges)."""
    metrics = {"n_nonfinite_grads": float(sum(r["flag"] == "nonfinite" for r in rows))}
    full = all(math.isfinite(r["mean_abs"]) or r["flag"] == "nonfinite" for r in rows)
    for part in PARTS:
        v = part_rms(rows, (part,))
        if v is not None:
            metrics[f"rms_grad_{part}"] = v
        v = part_mean_abs(rows, (part,)) if full else None
        if v is not None:
            metrics[f"mean_abs_grad_{part}"] = v
    img, txt = part_rms(rows, IMAGE_PATH), part_rms(rows, TEXT_PATH)
    if img is not None and txt:
        metrics["image_over_text_rms_grad"] = img / txt
    img, txt = (part_mean_abs(rows, IMAGE_PATH), part_mean_abs(rows, TEXT_PATH)) if full else (None, None)
    if img is not None and txt:
        metrics["image_over_text_grad"] = img / txt
    return metrics


# ---- frozen in effect --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NoGradModule:
    """A module none of whose trainable parameters gets a gradient from the caption loss.

    ``deliberate`` when the model itself says the module is not trained: its forward runs under
    ``torch.no_grad()``/``inference_mode``, or the model's own ``train()`` keeps it in eval mode (a
    fixed feature extractor behind ``.detach()``). Otherwise the cut may be a bug (a detached image
    path) and gradient checks judge it as one."""

    module: str
    how: str
    deliberate: bool
    params: tuple


def train_step_grads(s) -> tuple:
    """``(grads, no_grad_modules)``: the gradient of capdiag's loss on the subject's batch for every
    trainable parameter (None where none arrives), in train mode, seeded, and the modules whose
    forward ran with autograd off. Measured once per subject; gradient_reachability, gradient_flow
    and frozen_drift read it."""
    from .probe import traced_no_grad
    from ..state import in_mode, seeded

    def compute():
        cap = s.captioner
        with in_mode(cap.model, True), seeded(s.seed), traced_no_grad(cap.model) as no_grad:
            grads = grads_of(cap, lambda: cap.loss(s.images, s.captions))
        return grads, frozenset(no_grad)

    return s.measured("train_step_grads", compute)


def modules_without_gradient(model: torch.nn.Module, none: set, no_grad_modules) -> list:
    """The largest submodules all of whose trainable parameters are in ``none`` (get no gradient),
    each with how it is cut off and whether the model does that on purpose (see ``NoGradModule``)."""
    from ..state import in_mode

    with in_mode(model, True):  # the model's own train(): a frozen trunk may keep itself in eval
        kept_eval = {n for n, m in model.named_modules() if not m.training}
    out: list = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(o.module + ".") for o in out):
            continue
        own = [f"{name}.{n}" for n, p in m.named_parameters() if p.requires_grad]
        if not own or not all(n in none for n in own):
            continue
        under = name in no_grad_modules or any(name.startswith(g + ".") for g in no_grad_modules)
        if under:
            how, deliberate = "runs under torch.no_grad()", True
        elif name in kept_eval:
            how, deliberate = "is cut from the loss (detached) and kept in eval mode by the model's train()", True
        else:
            how, deliberate = "gets no gradient from the caption loss", False
        out.append(NoGradModule(name, how, deliberate, tuple(own)))
    return out


def frozen_in_effect(s) -> list:
    """``modules_without_gradient`` for a subject's model and batch (``train_step_grads``)."""

    def compute():
        grads, no_grad = train_step_grads(s)
        none = {n for n, _ in trainable(s.captioner.model) if grads.get(n) is None}
        return modules_without_gradient(s.captioner.model, none, no_grad) if none else []

    return s.measured("frozen_in_effect", compute)


def reentrant_refusal(e: RuntimeError) -> bool:
    return "checkpoint" in str(e).lower() or ".grad()" in str(e)


def input_grad(cap: Captioner, loss_of: Callable[[Captioner, torch.Tensor], torch.Tensor], x: torch.Tensor,
               train: bool, seed: int):
    """Gradient of ``loss_of(cap, x)`` w.r.t. the input ``x`` (None when unused), leaving the
    model's ``.grad`` alone.

    Forward and backward run inside one ``in_mode(train)`` and ``seeded(seed)`` block: reentrant
    activation checkpointing recomputes the forward during the backward, and a backward run after
    the mode context has exited would recompute BatchNorm in train mode (mixing the batch) and
    draw other dropout masks. Reentrant checkpointing also refuses ``autograd.grad``; then the
    backward runs on a deep copy of the model.
    """
    import copy

    with in_mode(cap.model, train), seeded(seed):
        x1 = x.detach().clone().requires_grad_(True)
        try:
            loss = loss_of(cap, x1)
        except RuntimeError:
            if not refuses_grad_inputs(cap, loss_of, x):
                raise
            return None  # the forward cannot take images that require grad: they get none
        if not loss.requires_grad:
            return None
        try:
            return torch.autograd.grad(loss, x1, allow_unused=True)[0]
        except RuntimeError as e:
            if not reentrant_refusal(e):
                raise
    twin = cap.with_model(copy.deepcopy(cap.model))
    with in_mode(twin.model, train), seeded(seed):
        x2 = x.detach().clone().requires_grad_(True)
        loss_of(twin, x2).backward()
    return x2.grad


def refuses_grad_inputs(cap: Captioner, loss_of: Callable, x: torch.Tensor) -> bool:
    """Whether the forward raised only because ``x`` required grad: some models ``copy_`` their
    images into a view made under ``torch.no_grad()`` (a padded canvas), which autograd forbids for
    an input that requires grad but allows for a plain one. Such a model is legal; its pixels simply
    cannot carry a gradient, and checks fall back to what they do for a no-grad encoder."""
    try:
        with torch.no_grad():
            loss_of(cap, x.detach().clone())
    except Exception:  # noqa: BLE001 - it fails either way: the original error is the model's own
        return False
    return True


def trainable(model: nn.Module) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grads_of(cap: Captioner, loss_of: Callable[[], torch.Tensor]) -> dict:
    """Gradients of a loss w.r.t. every trainable parameter, without touching ``.grad``.

    Uses ``torch.autograd.grad``; models with reentrant gradient checkpointing reject that,
    so they fall back to ``.backward()`` on a deep copy of the model.
    """
    import copy

    params = trainable(cap.model)
    loss = loss_of()
    if not loss.requires_grad:  # nothing trainable is on the loss's graph at all
        return {n: None for n, _ in params}
    try:
        gs = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        return {n: g for (n, _), g in zip(params, gs)}
    except RuntimeError as e:
        if not reentrant_refusal(e):
            raise
    twin = cap.with_model(copy.deepcopy(cap.model))
    twin.model.zero_grad(set_to_none=True)
    original = cap.model
    cap.model = twin.model
    try:
        loss_of().backward()
    finally:
        cap.model = original
    return {n: p.grad for n, p in twin.model.named_parameters() if p.requires_grad}

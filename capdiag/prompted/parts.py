"""Which part of a prompted captioner each parameter belongs to (vision tower, projector, language model,
and the LoRA adapters on each), and the gradient each receives from the caption loss.

The gradient is ``torch.autograd.grad`` of the cross-entropy over the caption tokens, computed from the
logits and the input ids (not the batch's labels, which label_sanity judges): nothing is accumulated
into ``.grad``, and the model is left as it was.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .probes import inputs_of, predicting, targets

SIDES = ("vision", "projector", "language")
IMAGE_SIDE = ("vision", "projector")


def is_adapter(name: str) -> bool:
    return "lora_" in name or ".modules_to_save." in name


def unit(name: str) -> str:
    """The module an adapter weight belongs to (``...q_proj`` for ``...q_proj.lora_A.default.weight``)."""
    return name.split(".lora_")[0] if ".lora_" in name else name


def side_of(name: str, family) -> str:
    """``vision``, ``projector``, ``language`` or ``other`` for a parameter name of the (unwrapped) model."""
    name = name.replace("base_model.model.", "", 1)
    for side, paths in (("projector", family.projector), ("vision", family.vision), ("language", family.language)):
        if any(name == p or name.startswith(p + ".") for p in paths):
            return side
    return "other"


def trainable(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class PartGradients:
    norms: dict  # parameter name -> gradient norm (0.0 when the loss does not reach it)
    sides: dict  # parameter name -> side
    adapters: set  # parameter names that are adapter weights
    loss: float
    nonfinite: list = field(default_factory=list)
    unread: set = field(default_factory=set)  # parameters whose module ran with grad enabled, output not read
    flat: set = field(default_factory=set)  # parameters on the loss's path whose gradient is exactly zero here
    untracked: set = field(default_factory=set)  # parameters whose module ran with its output outside autograd

    def by_design(self, names: list) -> bool:
        """True when every name in ``names`` belongs to a module that ran with gradients enabled but whose
        output the caption never reads (LLaVA's last vision layer, SigLIP's unused head): no gradient by the
        architecture's design, measured (autograd finds no path), not assumed."""
        return bool(names) and all(n in self.unread for n in names)

    def cause(self, names: list, has_pixels: bool) -> str:
        """Why ``names`` get no gradient, where the forward told it apart; "" where it did not."""
        if not has_pixels:
            return "the batch carries no pixel_values, so the vision side never runs"
        if names and all(n in self.untracked for n in names):
            return ("their modules ran outside autograd (their outputs need no gradient: torch.no_grad, "
                    "inference_mode or detached inputs)")
        if names and all(n in self.unread for n in names):
            return "their modules ran, but nothing the caption depends on reads their output"
        return ""

    def on_path(self, names: list) -> bool:
        """True when every name in ``names`` is on the loss's path with an exactly zero gradient at these
        weights (identical inputs at a random init, e.g. BLIP-2's zero-initialized query tokens): not
        disconnected, and it moves once what feeds it does."""
        return bool(names) and all(n in self.flat for n in names)

    def group(self, side: str, adapter: bool) -> list:
        return [n for n in self.norms if self.sides[n] == side and (n in self.adapters) == adapter]

    def reached(self, names: list) -> list:
        """The names that get gradient. An adapter counts as one unit: LoRA starts with B = 0, so A gets no
        gradient until B has moved; the pair is reached when either weight is."""
        units = {unit(n) for n in self.norms if self.norms[n] > 0}
        return [n for n in names if self.norms[n] > 0 or (n in self.adapters and unit(n) in units)]


def part_gradients(model, batch: dict, prompt_len: int, family) -> PartGradients:
    """Gradient norms of every trainable parameter under the caption cross-entropy (see the module doc)."""
    params = trainable(model)
    inputs = inputs_of(batch, prompt_len)
    owners = {n.rsplit(".", 1)[0] for n, _ in params}
    owners |= {o.rsplit(".", 1)[0] for o in owners}  # parents: a module used functionally (MHA's out_proj) never fires
    ran = {}

    def seen(name):
        def hook(module, args, out):
            outs = [out] if torch.is_tensor(out) else out if isinstance(out, (tuple, list)) else \
                list(out.values()) if isinstance(out, dict) else []
            ran[name] = ran.get(name, False) or any(torch.is_tensor(o) and o.requires_grad for o in outs)
        return hook

    handles = [m.register_forward_hook(seen(n)) for n, m in model.named_modules() if n in owners]
    try:
        with torch.enable_grad():
            logits = model(**inputs).logits.float()
    finally:
        for h in handles:
            h.remove()
    with torch.enable_grad():
        where = predicting(batch, prompt_len)
        loss = F.cross_entropy(logits[where], targets(batch, prompt_len)[where])
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    norms, bad = {}, []
    for (n, _), g in zip(params, grads):
        v = 0.0 if g is None else float(g.detach().float().norm())
        if not math.isfinite(v):
            bad.append(n)
        norms[n] = v
    sides = {n: side_of(n, family) for n, _ in params}
    def computed(n):  # its module ran with gradients (True), without (False), or never (None); a module never
        module = n.rsplit(".", 1)[0]  # called itself (MHA's out_proj) answers for the module that uses it
        return ran[module] if module in ran else ran.get(module.rsplit(".", 1)[0])
    off_path = {n for (n, _), g in zip(params, grads) if g is None}  # autograd: the loss does not depend on it
    unread = {n for n in off_path if computed(n)}
    untracked = {n for n in off_path if computed(n) is False}
    flat = {n for n, _ in params if norms[n] == 0 and n not in off_path}
    return PartGradients(norms, sides, {n for n, _ in params if is_adapter(n)}, float(loss.detach()), bad, unread,
                         flat, untracked)

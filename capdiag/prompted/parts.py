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

from .folder import base_model
from .probes import predicting

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
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.enable_grad():
        logits = model(**inputs).logits.float()
        where = predicting(batch, prompt_len)
        target = torch.zeros_like(batch["input_ids"])
        target[:, :-1] = batch["input_ids"][:, 1:]
        loss = F.cross_entropy(logits[where], target[where])
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    norms, bad = {}, []
    for (n, _), g in zip(params, grads):
        v = 0.0 if g is None else float(g.detach().float().norm())
        if not math.isfinite(v):
            bad.append(n)
        norms[n] = v
    sides = {n: side_of(n, family) for n, _ in params}
    return PartGradients(norms, sides, {n for n, _ in params if is_adapter(n)}, float(loss.detach()), bad)


def last_vision_layer_unread(model, names: list) -> bool:
    """LLaVA-style models read vision layer ``vision_feature_layer`` (-2 by default): the layers after it and
    the tower's post-layernorm get no gradient by design. True when every name in ``names`` is one of them."""
    cfg = base_model(model).config
    layer = getattr(cfg, "vision_feature_layer", None)
    n_layers = getattr(getattr(cfg, "vision_config", None), "num_hidden_layers", None)
    if not isinstance(layer, int) or n_layers is None:
        return False
    first_unread = layer % (n_layers + 1)  # hidden_states[0] is the embeddings: layer k's output is index k + 1
    def unread(n: str) -> bool:
        if "post_layernorm" in n or ".head." in n:
            return True
        parts = n.split(".")
        for i, p in enumerate(parts[:-1]):
            if p == "layers" and parts[i + 1].isdigit():
                return int(parts[i + 1]) >= first_unread
        return False
    return bool(names) and all(unread(n) for n in names)

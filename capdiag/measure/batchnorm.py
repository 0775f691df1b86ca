"""BatchNorm running statistics: do they match the weights that feed them?

Two tools for the overfit check. ``stats_mismatch`` measures, on the model as given, how far
each BatchNorm layer's running variance is from the variance its input actually has on a
batch (train-mode forward, nothing kept): pretrained statistics under weights a custom init
overwrote (the forum case) are off by e^2-e^3 in a typical layer, while intact pretrained
statistics on capdiag's synthetic images are within e^0.25 (EfficientNet-Lite0, measured).
``recalibrate`` re-estimates the statistics of a *copy* on one batch: a pretrained encoder
fine-tuned hard on one batch has running statistics that lag its weights (momentum 0.01-0.1),
an artifact of the test rather than of the model.
"""
from __future__ import annotations

import statistics
from typing import Optional

import torch
from torch import nn

from ..captioner import Captioner
from ..hooks import hooked
from ..state import in_mode, preserved_buffers, preserved_modes, seeded


def tracking_batchnorms(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_var is not None]


def has_default_stats(m) -> bool:
    """Running statistics still at their initial values (mean 0, var 1): never trained."""
    return bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())


@torch.no_grad()
def stats_mismatch(cap: Captioner, images: torch.Tensor, captions: torch.Tensor, seed: int = 0) -> Optional[float]:
    """Median over BatchNorm layers (those with non-default statistics) of the median over
    channels of |log(batch variance / running variance)|; None when there are no such layers.
    The model's buffers and modes are restored."""
    layers = [(n, m) for n, m in tracking_batchnorms(cap.model) if not has_default_stats(m)]
    if not layers:
        return None
    scores = []

    def hook(m, args):
        x = args[0].detach().float()
        dims = [0] + list(range(2, x.dim()))
        ratio = x.var(dims, unbiased=False).clamp_min(1e-12) / m.running_var.float().clamp_min(1e-12)
        scores.append(float(ratio.log().abs().median()))

    with hooked([m for _, m in layers], hook, pre=True), preserved_buffers(cap.model), seeded(seed), \
            in_mode(cap.model, True):
        cap.logits(images, captions)
    return statistics.median(scores) if scores else None


@torch.no_grad()
def recalibrate(cap: Captioner, images: torch.Tensor, captions: torch.Tensor, seed: int = 0, passes: int = 3) -> None:
    """Re-estimate the running statistics of ``cap``'s BatchNorm layers on one batch, in place:
    only ever call it on a copy. Everything but BatchNorm runs in eval mode, so the statistics
    are those of eval-mode inputs (EfficientNet's drop-connect and dropout are train-only);
    a cumulative average over ``passes`` forwards; momentum and modes are restored afterwards."""
    layers = tracking_batchnorms(cap.model)
    momenta = [m.momentum for _, m in layers]
    try:
        with seeded(seed), preserved_modes(cap.model):
            cap.model.eval()
            for _, m in layers:
                m.train()
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average
            for _ in range(passes):
                cap.logits(images, captions)
    finally:
        for (_, m), mom in zip(layers, momenta):
            m.momentum = mom

"""Image ablation: the caption loss with the true images and with the image taken away.

One definition of *image reliance*, used by the ``image_ablation`` check, the training monitor
and the TensorBoard scalars alike::

    image_reliance = 1 - L_true / L_shuffled

where ``L_shuffled`` is the loss with every sample given another sample's image (a
permutation-based "perceptual score"): 0 for a decoder that ignores the image, near 1 for one
whose captions come from it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..hooks import shuffled_output, zeroed_output
from ..state import in_mode, seeded

ALL_KINDS = ("shuffled_images", "zeroed_images", "noise_images", "zeroed_features", "shuffled_features")
FEATURE_KINDS = ("zeroed_features", "shuffled_features")


def derangement(images: torch.Tensor) -> torch.Tensor:
    """Every sample gets another sample's image (a roll by one along the batch)."""
    return images.roll(1, 0)


@torch.no_grad()
def ablation_losses(cap, images: torch.Tensor, captions: torch.Tensor, seed: int, kinds=ALL_KINDS,
                    true_loss: Optional[float] = None) -> dict:
    """Loss (eval mode, seeded) with true images and under each ablation in ``kinds``.

    Feature-level kinds replace the output of ``image_module`` through a forward hook and are
    left out when the model declares none. ``true_loss``: the true pass when already computed
    (``true_pass``), so it is not run twice.
    """
    out = {}
    mod = cap.image_module() if any(k in FEATURE_KINDS for k in kinds) else None
    with seeded(seed), in_mode(cap.model, False):
        out["true"] = float(cap.loss(images, captions)) if true_loss is None else true_loss
        for kind in kinds:
            if kind == "shuffled_images":
                out[kind] = float(cap.loss(derangement(images), captions))
            elif kind == "zeroed_images":
                out[kind] = float(cap.loss(torch.zeros_like(images), captions))
            elif kind == "noise_images":
                g = torch.Generator().manual_seed(seed)
                out[kind] = float(cap.loss(torch.randn(images.shape, generator=g).to(images), captions))
            elif mod is not None:
                with (zeroed_output(mod) if kind == "zeroed_features" else shuffled_output(mod)):
                    out[kind] = float(cap.loss(images, captions))
    return out


def image_reliance(losses: dict) -> float:
    """``1 - L_true / L_shuffled`` (0 when the shuffled loss is not positive)."""
    shuffled = losses["shuffled_images"]
    return 1.0 - losses["true"] / shuffled if shuffled > 0 else 0.0


def ablation_metrics(losses: dict) -> dict:
    """The scalars every front end reports for one set of ablation losses (same names everywhere)."""
    metrics = {f"loss_{k}": v for k, v in losses.items()}
    metrics["image_reliance"] = image_reliance(losses)
    for k in ("shuffled_images", "zeroed_images", "zeroed_features"):
        if k in losses:
            metrics[f"loss_gap_{k}"] = losses[k] - losses["true"]
    return metrics


def true_pass(s, cap, images: torch.Tensor, captions: torch.Tensor) -> tuple:
    """``(loss, attention records)`` of one eval-mode forward with the true images: the pass that
    image_ablation and attention_maps share, computed once per subject and captioner."""
    from .attention import captured_attention

    def compute():
        with torch.no_grad(), seeded(s.seed), in_mode(cap.model, False), \
                captured_attention(cap.model, cap.spec.attention_modules) as recs:
            loss = float(cap.loss(images, captions))
        return loss, {n: r for n, r in recs.items() if r.weights}

    return s.measured(("true_pass", id(cap.model), id(images), id(captions)), compute)


def generated(s, cap, images: torch.Tensor, max_len: int) -> torch.Tensor:
    """``cap.generate(images, max_len)`` in eval mode, seeded: computed once per subject, captioner
    and batch, and shared by overfit (exact match), image_ablation (distinct captions) and
    decoding_consistency (agreement with the forward)."""
    def compute():
        with torch.no_grad(), seeded(s.seed), in_mode(cap.model, False):
            return cap.generate(images, max_len=max_len)

    return s.measured(("generated", id(cap.model), id(images), max_len), compute)

"""image_ablation: does the decoder use the image?

On a model that has learned something (the user's trained model, or a copy overfit on one
batch), compare the caption loss with the true images against images shuffled across the
batch, zeroed and replaced by noise, and, through a forward hook on ``image_module``, against
zeroed and batch-shuffled features. The image-reliance score is ``1 - L_true / L_shuffled``
(a permutation-based "perceptual score"): 0 for a model that ignores the image, near 1 for
one whose captions come from it. Also: ``generate`` must give different captions for
different images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.data import empirical_blind_floor
from capdiag.finding import Status
from capdiag.hooks import shuffled_output, zeroed_output
from capdiag.registry import register_check
from capdiag.state import mode, seeded
from capdiag.training import learned


def derangement(images: torch.Tensor) -> torch.Tensor:
    """Every sample gets another sample's image (a roll by one along the batch)."""
    return images.roll(1, 0)


ALL_KINDS = ("shuffled_images", "zeroed_images", "noise_images", "zeroed_features", "shuffled_features")


@torch.no_grad()
def ablation_losses(cap, images, captions, seed: int, feature_level: bool = True, kinds=ALL_KINDS,
                    watch_true=None, records=None) -> dict:
    """Loss with true images and under each ablation in ``kinds`` (eval mode).

    Feature-level kinds replace the output of ``image_module`` through a forward hook and are
    skipped when the model has none. ``watch_true``: a context-manager factory entered around
    the true pass only (the training monitor captures attention there); what it yields is
    stored in ``records["attention"]``.
    """
    out = {}
    mod = cap.image_module() if feature_level else None
    with seeded(seed), mode(cap.model, False):
        if watch_true is not None:
            with watch_true() as rec:
                out["true"] = float(cap.loss(images, captions))
            if records is not None:
                records["attention"] = rec
        else:
            out["true"] = float(cap.loss(images, captions))
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


def reliance_score(losses: dict) -> float:
    shuffled = losses["shuffled_images"]
    return 1.0 - losses["true"] / shuffled if shuffled > 0 else 0.0


@register_check
@dataclass
class ImageAblation(Check):
    name = "image_ablation"
    catches = "decoder ignoring the image: loss unchanged when images are shuffled, zeroed or noised"
    cheap = False
    min_reliance: float = 0.2

    def run(self, s: Subject):
        cap, images, captions, source = learned(s)
        if images.shape[0] < 2:
            return self.skip("needs a batch of at least 2 images to shuffle")
        losses = ablation_losses(cap, images, captions, s.seed)
        ln_v = math.log(cap.spec.vocab_size)
        score = reliance_score(losses)
        metrics = {f"loss_{k}": v for k, v in losses.items()}
        metrics["image_reliance"] = score
        metrics["loss_gap_shuffled_images"] = losses["shuffled_images"] - losses["true"]
        metrics["loss_gap_zeroed_images"] = losses["zeroed_images"] - losses["true"]
        if "zeroed_features" in losses:
            metrics["loss_gap_zeroed_features"] = losses["zeroed_features"] - losses["true"]
        distinct = None
        with torch.no_grad(), seeded(s.seed), mode(cap.model, False):
            gen = cap.strip(cap.generate(images, max_len=captions.shape[1] + 2))
        distinct = len({tuple(g) for g in gen}) / len(gen)
        metrics["generate_distinct_fraction"] = distinct
        artifacts = {"losses": losses, "source": source}
        path = s.output_path("image_ablation.png")
        if path is not None:
            from capdiag.viz.plots import plot_bars, save

            labels = list(losses)
            save(plot_bars([l.replace("_", "\n") for l in labels], [losses[l] for l in labels],
                           f"caption loss under image ablation (reliance {score:.2f})", "loss (nats/token)",
                           empirical_blind_floor(captions.cpu(), cap.target_mask(captions).cpu())), path)
            artifacts["ablation_png"] = path
        if losses["true"] > 0.8 * ln_v:
            return self.finding(Status.SKIP, f"the model has not learned anything yet (loss {losses['true']:.2f} "
                                f"near ln V={ln_v:.2f}); ablation would be meaningless", metrics, artifacts=artifacts)
        hint = (
            "The decoder ignores the image. Usual causes: a pretrained encoder clobbered by a custom init "
            "(model.apply(init) reaching the encoder), features detached or multiplied by zero, a dead ReLU "
            "after the projection, features scaled to nothing next to the token embeddings, or the wrong "
            "variable passed to the decoder. Check pretrained_guard and gradient_flow."
        )
        if score < self.min_reliance:
            return self.finding(
                Status.FAIL,
                f"image reliance {score:.2f}: shuffling images across the batch moves the loss from "
                f"{losses['true']:.3f} to only {losses['shuffled_images']:.3f} ({source})",
                metrics, hint, artifacts,
            )
        if distinct <= 1 / len(gen) + 1e-9 and len(gen) > 1:
            return self.finding(
                Status.FAIL, f"generate() returns the same caption for all {len(gen)} different images "
                f"although the teacher-forced loss relies on them (reliance {score:.2f})", metrics,
                "generate() does not pass the image to the decoder (or uses a cached/zero image state). "
                "Compare it line by line with forward().", artifacts,
            )
        return self.finding(
            Status.PASS,
            f"image reliance {score:.2f}: loss {losses['true']:.3f} with true images vs "
            f"{losses['shuffled_images']:.3f} shuffled, {losses['zeroed_images']:.3f} zeroed; "
            f"{distinct:.0%} distinct generated captions",
            metrics, artifacts=artifacts,
        )

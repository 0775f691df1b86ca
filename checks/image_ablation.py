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

from capdiag.measure.ablation import ALL_KINDS, ablation_losses, ablation_metrics, generated, true_pass
from capdiag.check import Check, Subject
from capdiag.intake.data import empirical_blind_floor
from capdiag.finding import Status
from capdiag.measure.localize import where_image_dies
from capdiag.measure.training import learned_of
from capdiag.registry import register_check

LIVE_KINDS = ("shuffled_images", "zeroed_features")  # during training: two extra no-grad forwards


@register_check
@dataclass
class ImageAblation(Check):
    name = "image_ablation"
    subjects = ("captioner", "prompted")  # prompted: capdiag.prompted.verdicts.image_ablation
    catches = "decoder ignoring the image: loss unchanged when images are shuffled, zeroed or noised"
    cheap = False
    live = True
    min_reliance: float = 0.2

    def run(self, s: Subject):
        if s.kind == "prompted":
            from capdiag.prompted import verdicts

            return verdicts.image_ablation(self, s)
        learned = learned_of(s)
        if learned.unlearned:  # no verdict on a copy that did not learn
            return self.finding(Status.WARN, learned.inconclusive(), {"learned_loss": learned.loss, "blind_floor": learned.floor})
        cap, images, captions, source = learned
        if images.shape[0] < 2:
            return self.skip("needs a batch of at least 2 images to shuffle")
        true_loss, _ = true_pass(s, cap, images, captions)
        losses = ablation_losses(cap, images, captions, s.seed, LIVE_KINDS if s.live else ALL_KINDS, true_loss)
        ln_v = math.log(cap.spec.vocab_size)
        metrics = ablation_metrics(losses)
        score = metrics["image_reliance"]
        shown = round(score, 2) + 0.0  # for the summaries: no "-0.00"
        if s.live:  # the training monitor judges the history of these numbers, not one verdict
            return self.finding(Status.PASS if score >= self.min_reliance else Status.WARN,
                                f"image reliance {shown:.2f} ({source})", metrics)
        gen = cap.strip(generated(s, cap, images, captions.shape[1] + 2))
        distinct = len({tuple(g) for g in gen}) / len(gen)
        metrics["generate_distinct_fraction"] = distinct
        artifacts = {"losses": losses, "source": source,
                     "blind_floor": empirical_blind_floor(captions.cpu(), cap.target_mask(captions).cpu())}
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
                f"image reliance {shown:.2f}: shuffling images across the batch moves the loss from "
                f"{losses['true']:.3f} to only {losses['shuffled_images']:.3f} ({source})",
                metrics, hint, artifacts, location=where_image_dies(cap, images, captions, s.seed),
            )
        # Only the model's own generate() can drop the image at inference: capdiag's greedy decoding runs
        # the very forward whose reliance was just measured.
        if cap.has_generate and distinct <= 1 / len(gen) + 1e-9 and len(gen) > 1:
            return self.finding(
                Status.FAIL, f"generate() returns the same caption for all {len(gen)} different images "
                f"although the teacher-forced loss relies on them (reliance {shown:.2f})", metrics,
                "generate() does not pass the image to the decoder (or uses a cached/zero image state). "
                "Compare it line by line with forward().", artifacts,
                location=where_image_dies(cap, images, captions, s.seed, generate=True),
            )
        return self.finding(
            Status.PASS,
            f"image reliance {shown:.2f}: loss {losses['true']:.3f} with true images vs "
            f"{losses['shuffled_images']:.3f} shuffled, {losses['zeroed_images']:.3f} zeroed; "
            f"{distinct:.0%} distinct generated captions ({source})",
            metrics, artifacts=artifacts,
        )

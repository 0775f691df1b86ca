"""batch_independence: sample i's outputs depend on sample i alone, not on the rest of the batch
nor on where in the batch it sits.

Catches ``view``/``reshape`` where a ``permute`` was meant (time and batch mixed), pooling or
normalizing over the batch dimension (``feats.mean(0)``), attention over the wrong axis, and
output that depends on a sample's index in the batch: a positional encoding added along the batch
axis instead of the sequence axis, per-index buffers. Four probes, all in eval mode (where
BatchNorm legitimately stops mixing the batch): change one sample (the others' logits and
gradients must not move), permute the batch (logits and ``generate`` must permute the same way),
and run one sample alone (it must get what it gets inside the batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.localize import localize_pair
from capdiag.probe import (RANDOM_EVAL, inner_positions, input_grad, judged_mask, logits_in,
                           rel_diff, replace_tokens, subject_eval_is_random, tolerance)
from capdiag.registry import register_check
from capdiag.state import in_mode, seeded
from capdiag.violations import not_alone, not_permuted, other_samples


def _generated(cap, images, seed):
    with torch.no_grad(), in_mode(cap.model, False), seeded(seed):
        return cap.strip(cap.generate(images))


@register_check
@dataclass
class BatchIndependence(Check):
    name = "batch_independence"
    catches = "samples mixing across the batch (view instead of permute, mean over dim 0), output depending on the position in the batch"

    def run(self, s: Subject):
        cap = s.captioner
        images, captions = s.images, s.captions
        if images.shape[0] < 2:
            images, captions = torch.cat([images, images.flip(-1)]), torch.cat([captions, captions])
        if subject_eval_is_random(s):
            return self.skip(RANDOM_EVAL)
        B = images.shape[0]
        base = logits_in(cap, images, captions, False, s.seed)
        tol = tolerance(base, cap.dtype)
        judged = judged_mask(cap, captions)[..., None]  # (B, T-1, 1)
        # 1. Replace the last sample's image and words; the others must not notice.
        g = torch.Generator().manual_seed(s.seed + 2)
        imgs2 = images.clone()
        imgs2[-1] = torch.randn(imgs2[-1].shape, generator=g).to(imgs2)
        where = torch.zeros_like(captions, dtype=torch.bool)
        where[-1] = inner_positions(cap, captions[-1:])[0]  # BOS, EOS and padding kept
        caps2 = replace_tokens(cap, captions, where, g)
        out = logits_in(cap, imgs2, caps2, False, s.seed)
        fwd = float(rel_diff(base[:-1] * judged[:-1], out[:-1] * judged[:-1]))
        metrics = {"max_rel_change_forward": fwd}
        # 2. Permute the batch: every sample must get what it got in its old place.
        perm = torch.arange(B - 1, -1, -1, device=captions.device)  # reversal moves every sample when B > 1
        if B % 2:  # an odd reversal keeps the middle sample in place: rotate instead
            perm = torch.roll(torch.arange(B, device=captions.device), 1)
        permuted = logits_in(cap, images[perm], captions[perm], False, s.seed)
        perm_d = float(rel_diff(base[perm] * judged[perm], permuted * judged[perm]))
        metrics["max_rel_change_permuted_batch"] = perm_d
        # 3. Sample 0 alone must get what it gets inside the batch.
        alone = logits_in(cap, images[:1], captions[:1], False, s.seed)
        alone_d = float(rel_diff(base[:1] * judged[:1], alone * judged[:1]))
        metrics["max_rel_change_alone"] = alone_d
        # 4. generate() too: permuted batch and a sample alone.
        gen_problem = None
        if cap.has_generate:
            gens = _generated(cap, images, s.seed)
            gens_perm = _generated(cap, images[perm], s.seed)
            gen_alone = _generated(cap, images[:1], s.seed)
            moved = sum(gens[int(p)] != q for p, q in zip(perm.tolist(), gens_perm))
            metrics["generate_changed_by_permutation"] = float(moved)
            metrics["generate_changed_alone"] = float(gen_alone[0] != gens[0])
            if moved:
                gen_problem = f"permuting the batch changes {moved} of {B} generated captions"
            elif gen_alone[0] != gens[0]:
                gen_problem = "generate() gives sample 0 another caption alone than inside the batch"
        # 5. Gradient of sample 0's loss with respect to the other samples' images must be zero.
        grad_leak = None
        gx = input_grad(cap, lambda c, x: c.loss(x, captions, per_sample=True)[0], images, train=False, seed=s.seed)
        if gx is not None:
            own = float(gx[0].abs().max())
            others = float(gx[1:].abs().max())
            grad_leak = others / max(own, 1e-12) if own > 0 else (float("inf") if others > 0 else 0.0)
            metrics["grad_other_samples_over_own"] = grad_leak
        mixing = []
        if fwd > tol:
            mixing.append(f"changing sample {B - 1} changes the others' logits (relative {fwd:.2g})")
        if grad_leak is not None and grad_leak > tol:
            mixing.append(f"sample 0's loss has gradient w.r.t. other samples' images ({grad_leak:.2g} of its own)")
        position = []
        if perm_d > tol:
            position.append(f"permuting the batch changes each sample's logits (relative {perm_d:.2g})")
        if alone_d > tol:
            position.append(f"sample 0 alone gets other logits than inside the batch (relative {alone_d:.2g})")
        if gen_problem:
            position.append(gen_problem)
        if mixing:
            where = localize_pair(cap, (images, captions), (imgs2, caps2), other_samples(B - 1, B, tol),
                                  f"output for samples 0..{B - 2} changes when only sample {B - 1} changes", seed=s.seed) \
                if fwd > tol else None
            return self.finding(
                Status.FAIL, "samples mix across the batch: " + "; ".join(mixing + position), metrics,
                "Look for .view()/.reshape() used to swap batch and time/channel axes (use .permute/.transpose), "
                "reductions over dim 0 (mean/sum/softmax over the batch), and batch_first mismatches in "
                "nn.LSTM/nn.MultiheadAttention.",
                location=where,
            )
        if position:
            where = None
            if perm_d > tol:
                where = localize_pair(cap, (images, captions), (images[perm], captions[perm]), not_permuted(perm, tol),
                                      "output does not permute with the batch", seed=s.seed)
            elif alone_d > tol:
                where = localize_pair(cap, (images, captions), (images[:1], captions[:1]), not_alone(B, tol),
                                      "output for sample 0 alone differs from sample 0 inside the batch", seed=s.seed)
            return self.finding(
                Status.FAIL, "outputs depend on the sample's position in the batch: " + "; ".join(position), metrics,
                "Something is indexed by the batch index: a positional encoding added along dim 0 of a batch-first "
                "tensor (x + pe[:x.size(0)] with x of shape (B, T, d)), a per-index buffer or cache, or state "
                "sized by the batch.",
                location=where,
            )
        note = "" if grad_leak is not None else " (images receive no gradient: forward probes only)"
        what = "forward, backward and generate" if cap.has_generate else "forward and backward"
        return self.finding(Status.PASS, f"samples are independent of each other and of their place in the batch in "
                                         f"{what}{note}", metrics)

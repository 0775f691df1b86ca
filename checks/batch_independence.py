"""batch_independence: sample i's outputs depend on sample i alone, not on the rest of the batch
nor on where in the batch it sits.

Catches ``view``/``reshape`` where a ``permute`` was meant (time and batch mixed), pooling or
normalizing over the batch dimension (``feats.mean(0)``), attention over the wrong axis, and
output that depends on a sample's index in the batch: a positional encoding added along the batch
axis instead of the sequence axis, per-index buffers, and masks computed from float noise
(``x.sum(-1) == 0`` on a LayerNorm output) that flip with the batch size. All in eval mode (where
BatchNorm legitimately stops mixing the batch):

1. change the last sample: the others' logits must not move;
2. the gradient of sample 0's loss must not reach the other samples' images;
3. permute the batch: logits and ``generate`` must permute the same way;
4. batch size: every sample run in halves, in quarters and (the last one) alone must get what it gets in
   the full batch, and sample 0 in a batch of B copies of itself must get what it gets alone;
   ``generate`` gives sample 0 the same caption alone.

Tolerances follow the precision the forward really computes in (``probe.compute_dtype``: a bf16
autocast region inside a float32 model moves logits by ~5e-3 with the batch size alone) and never sit
below the run-to-run noise of two identical calls, measured in the same run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import localize_pair
from capdiag.measure.gradients import input_grad
from capdiag.measure.probe import (RANDOM_EVAL, inner_positions, judged_mask, logits_in, precision, rel_diff,
                                   replace_tokens, subject_eval_is_random, tolerance)
from capdiag.registry import register_check
from capdiag.state import in_mode, seeded
from capdiag.measure.violations import not_alone, not_permuted, other_samples


def _generated(cap, images, seed):
    with torch.no_grad(), in_mode(cap.model, False), seeded(seed):
        return cap.strip(cap.generate(images))


def _chunks(B: int) -> list:
    """Batch splits whose every sample runs in a smaller batch: halves, quarters, the last sample alone."""
    out = []
    for size in sorted({max(1, B // 2), max(1, B // 4)}, reverse=True):
        if size < B:
            out.append([slice(i, min(i + size, B)) for i in range(0, B, size)])
    out.append([slice(B - 1, B)])
    return out


@dataclass
class Probes:
    """What the probes measured (max relative changes on real target positions)."""

    B: int
    tol: float
    metrics: dict
    mixing: list
    position: list
    perm: torch.Tensor
    changed: tuple  # the batch with its last sample changed
    worst_sample: int = -1  # the sample whose logits moved most with the batch size (-1: none did)


@register_check
@dataclass
class BatchIndependence(Check):
    name = "batch_independence"
    catches = "samples mixing across the batch (view instead of permute, mean over dim 0), output depending on the position in the batch"

    def run(self, s: Subject):
        images, captions = s.images, s.captions
        if images.shape[0] < 2:
            images, captions = torch.cat([images, images.flip(-1)]), torch.cat([captions, captions])
        if subject_eval_is_random(s):
            return self.skip(RANDOM_EVAL)
        p = self._measure(s, images, captions)
        if p.mixing:
            return self._mixing(s, p, images, captions)
        if p.position:
            return self._position(s, p, images, captions)
        note = "" if "grad_other_samples_over_own" in p.metrics else " (images receive no gradient: forward probes only)"
        what = "forward, backward and generate" if s.captioner.has_generate else "forward and backward"
        return self.finding(Status.PASS, f"samples are independent of each other, of their place in the batch and of "
                                         f"the batch size in {what}{note} (tolerance {p.tol:.1g})", p.metrics)

    # ---- measure -----------------------------------------------------------------------------
    def _measure(self, s, images, captions) -> Probes:
        cap, B = s.captioner, images.shape[0]
        base = logits_in(cap, images, captions, False, s.seed)
        rerun = float(rel_diff(base, logits_in(cap, images, captions, False, s.seed)))  # the machine's own noise
        tol = max(tolerance(base, precision(s)), 3 * rerun)
        judged = judged_mask(cap, captions)[..., None]  # (B, T-1, 1)
        at = lambda t, idx=slice(None): t[idx] * judged[idx]  # noqa: E731
        metrics = {"tolerance": tol, "rerun_noise": rerun}
        mixing, position = [], []
        # 1. Replace the last sample's image and words; the others must not notice.
        g = torch.Generator().manual_seed(s.seed + 2)
        imgs2 = images.clone()
        imgs2[-1] = torch.randn(imgs2[-1].shape, generator=g).to(imgs2)
        where = torch.zeros_like(captions, dtype=torch.bool)
        where[-1] = inner_positions(cap, captions[-1:])[0]  # BOS, EOS and padding kept
        caps2 = replace_tokens(cap, captions, where, g)
        out = logits_in(cap, imgs2, caps2, False, s.seed)
        fwd = metrics["max_rel_change_forward"] = float(rel_diff(at(base, slice(0, -1)), at(out, slice(0, -1))))
        if fwd > tol:
            mixing.append(f"changing sample {B - 1} changes the others' logits (relative {fwd:.2g})")
        # 2. Gradient of sample 0's loss with respect to the other samples' images must be zero.
        gx = input_grad(cap, lambda c, x: c.loss(x, captions, per_sample=True)[0], images, train=False, seed=s.seed)
        if gx is not None:
            own, others = float(gx[0].abs().max()), float(gx[1:].abs().max())
            leak = others / max(own, 1e-12) if own > 0 else (float("inf") if others > 0 else 0.0)
            metrics["grad_other_samples_over_own"] = leak
            if leak > tol:
                mixing.append(f"sample 0's loss has gradient w.r.t. other samples' images ({leak:.2g} of its own)")
        # 3. Permute the batch: every sample must get what it got in its old place.
        perm = torch.arange(B - 1, -1, -1, device=captions.device)  # reversal moves every sample when B > 1
        if B % 2:  # an odd reversal keeps the middle sample in place: rotate instead
            perm = torch.roll(torch.arange(B, device=captions.device), 1)
        permuted = logits_in(cap, images[perm], captions[perm], False, s.seed)
        perm_d = metrics["max_rel_change_permuted_batch"] = float(rel_diff(at(base, perm), permuted * judged[perm]))
        if perm_d > tol:
            position.append(f"permuting the batch changes each sample's logits (relative {perm_d:.2g})")
        # 4. Batch size: every sample in halves, quarters, alone; sample 0 among copies of itself.
        per_sample = torch.zeros(B)
        for split in _chunks(B):
            for sl in split:
                part = logits_in(cap, images[sl], captions[sl], False, s.seed)
                per_sample[sl] = torch.maximum(per_sample[sl], rel_diff(at(base, sl), part * judged[sl], dim=(1, 2)).cpu())
        copies = [logits_in(cap, images[:1].expand(n, *images.shape[1:]), captions[:1].expand(n, -1), False, s.seed)[:1]
                  for n in sorted({1, B})]
        copies_d = max(float(rel_diff(copies[0] * judged[:1], c * judged[:1])) for c in copies[1:])
        metrics.update({"max_rel_change_smaller_batch": float(per_sample.max()), "max_rel_change_among_copies": copies_d,
                        "n_samples_changed_by_batch_size": float((per_sample > tol).sum())})
        worst = int(per_sample.argmax()) if float(per_sample.max()) > tol else -1
        if worst >= 0:
            position.append(f"{int((per_sample > tol).sum())} of {B} samples get other logits in a smaller batch than "
                            f"in the full one (largest: sample {worst}, relative {float(per_sample[worst]):.2g})")
        elif copies_d > tol:
            position.append(f"sample 0 gets other logits in a batch of copies of itself than alone (relative {copies_d:.2g})")
        if cap.has_generate:
            position += self._generate_probes(s, cap, images, perm, metrics)
        return Probes(B, tol, metrics, mixing, position, perm, (imgs2, caps2), worst)

    def _generate_probes(self, s, cap, images, perm, metrics) -> list:
        """generate() must permute with the batch, and give sample 0 the same caption alone."""
        B = images.shape[0]
        gens = _generated(cap, images, s.seed)
        gens_perm = _generated(cap, images[perm], s.seed)
        gen_alone = _generated(cap, images[:1], s.seed)
        moved = sum(gens[int(p)] != q for p, q in zip(perm.tolist(), gens_perm))
        metrics["generate_changed_by_permutation"] = float(moved)
        metrics["generate_changed_alone"] = float(gen_alone[0] != gens[0])
        if moved:
            return [f"permuting the batch changes {moved} of {B} generated captions"]
        if gen_alone[0] != gens[0]:
            return ["generate() gives sample 0 another caption alone than inside the batch"]
        return []

    # ---- judge and explain -----------------------------------------------------------------------
    def _mixing(self, s, p: Probes, images, captions):
        cap, B = s.captioner, p.B
        where = localize_pair(cap, (images, captions), p.changed, other_samples(B - 1, B, p.tol),
                              f"output for samples 0..{B - 2} changes when only sample {B - 1} changes", seed=s.seed) \
            if p.metrics["max_rel_change_forward"] > p.tol else None
        return self.finding(
            Status.FAIL, "samples mix across the batch: " + "; ".join(p.mixing + p.position), p.metrics,
            "Look for .view()/.reshape() used to swap batch and time/channel axes (use .permute/.transpose), "
            "reductions over dim 0 (mean/sum/softmax over the batch), and batch_first mismatches in "
            "nn.LSTM/nn.MultiheadAttention.",
            location=where,
        )

    def _position(self, s, p: Probes, images, captions):
        cap, B, m = s.captioner, p.B, p.metrics
        where, size = None, p.worst_sample >= 0
        if m["max_rel_change_permuted_batch"] > p.tol:
            where = localize_pair(cap, (images, captions), (images[p.perm], captions[p.perm]), not_permuted(p.perm, p.tol),
                                  "output does not permute with the batch", seed=s.seed)
        elif size:
            i = p.worst_sample
            where = localize_pair(cap, (images, captions), (images[i:i + 1], captions[i:i + 1]), not_alone(B, p.tol, i),
                                  f"output for sample {i} alone differs from sample {i} inside the batch", seed=s.seed)
        hint = ("Something is indexed by the batch index: a positional encoding added along dim 0 of a batch-first "
                "tensor (x + pe[:x.size(0)] with x of shape (B, T, d)), a per-index buffer or cache, or state "
                "sized by the batch.")
        if size and m["max_rel_change_permuted_batch"] <= p.tol:
            hint = ("The output depends on the batch size, not on the other samples' content: look for masks or "
                    "branches computed from float values that rounding moves (x.sum(-1) == 0 on a normalized "
                    "tensor to find padding: pass an explicit mask), state sized by the batch, or "
                    "batch-size-dependent kernels in reduced precision.")
        return self.finding(Status.FAIL, "outputs depend on the sample's position in the batch or on the batch size: "
                            + "; ".join(p.position), m, hint, location=where)

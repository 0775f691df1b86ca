"""batch_independence: sample i's logits and gradients must not depend on sample j.

Catches ``view``/``reshape`` where a ``permute`` was meant (time and batch mixed), pooling or
normalizing over the batch dimension (``feats.mean(0)``), and attention over the wrong axis.
Run in eval mode, where BatchNorm legitimately stops mixing the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.probe import input_grad, logits_in, random_tokens, rel_diff, tolerance
from capdiag.registry import register_check
from capdiag.state import mode, seeded


@register_check
@dataclass
class BatchIndependence(Check):
    name = "batch_independence"
    catches = "samples mixing across the batch (view instead of permute, mean over dim 0)"

    def run(self, s: Subject):
        cap = s.captioner
        images, captions = s.images, s.captions
        if images.shape[0] < 2:
            images, captions = torch.cat([images, images.flip(-1)]), torch.cat([captions, captions])
        B = images.shape[0]
        base = logits_in(cap, images, captions, False, s.seed)
        tol = tolerance(base, cap.dtype)
        # Replace the last sample's image and caption; the others must not notice.
        g = torch.Generator().manual_seed(s.seed + 2)
        imgs2, caps2 = images.clone(), captions.clone()
        imgs2[-1] = torch.randn(imgs2[-1].shape, generator=g).to(imgs2)
        real = cap.real_mask(caps2[-1:])[0]
        inner = real.clone()
        inner[0] = False
        inner[int(real.sum()) - 1] = False  # keep BOS and EOS
        caps2[-1, inner] = random_tokens(cap, (int(inner.sum()),), g).to(caps2.device)
        out = logits_in(cap, imgs2, caps2, False, s.seed)
        fwd = float(rel_diff(base[:-1], out[:-1]))
        metrics = {"max_rel_change_forward": fwd}
        # Gradient of sample 0's loss with respect to the other samples' images must be zero.
        def loss0(c, x):
            with mode(c.model, False), seeded(s.seed):
                return c.loss(x, captions, per_sample=True)[0]

        grad_leak = None
        gx = input_grad(cap, loss0, images)
        if gx is not None:
            own = float(gx[0].abs().max())
            others = float(gx[1:].abs().max())
            grad_leak = others / max(own, 1e-12) if own > 0 else (float("inf") if others > 0 else 0.0)
            metrics["grad_other_samples_over_own"] = grad_leak
        leaked_fwd = fwd > tol
        leaked_grad = grad_leak is not None and grad_leak > tol
        if leaked_fwd or leaked_grad:
            how = []
            if leaked_fwd:
                how.append(f"changing sample {B - 1} changes the others' logits (relative {fwd:.2g})")
            if leaked_grad:
                how.append(f"sample 0's loss has gradient w.r.t. other samples' images ({grad_leak:.2g} of its own)")
            return self.finding(
                Status.FAIL, "samples mix across the batch: " + "; ".join(how), metrics,
                "Look for .view()/.reshape() used to swap batch and time/channel axes (use .permute/.transpose), "
                "reductions over dim 0 (mean/sum/softmax over the batch), and batch_first mismatches in "
                "nn.LSTM/nn.MultiheadAttention.",
            )
        note = "" if grad_leak is not None else " (images receive no gradient: forward check only)"
        return self.finding(Status.PASS, f"samples are independent in forward and backward{note}", metrics)

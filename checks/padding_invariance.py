"""padding_invariance: logits at real caption positions must not depend on padding.

Two probes: append extra pad columns, and fill pad positions (after each caption's EOS)
with random tokens. Real-position logits must not move. Catches positional encodings scaled
by the padded length, poolings over the whole padded caption, and length-sorting bugs.
Padding is located from the first EOS, never from the pad id alone (pad == eos is common).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import localize_pair
from capdiag.measure.probe import (precision, RANDOM_EVAL, logits_in, random_tokens, rel_diff, reused_image_features,
                           subject_eval_is_random, tolerance)
from capdiag.registry import register_check
from capdiag.measure.violations import real_positions_differ


@register_check
@dataclass
class PaddingInvariance(Check):
    name = "padding_invariance"
    catches = "real-position logits changing with the amount or content of padding"
    extra_pad: int = 3

    def run(self, s: Subject):
        cap = s.captioner
        caps = s.captions
        T = caps.shape[1]
        if subject_eval_is_random(s):
            return self.skip(RANDOM_EVAL)
        with reused_image_features(cap):  # only the captions change: the image features are computed once
            mask = cap.target_mask(caps)[..., None]  # (B, T-1, 1)
            base = logits_in(cap, s.images, caps, False, s.seed)
            tol = tolerance(base, precision(s))
            pads = torch.full((caps.shape[0], self.extra_pad), cap.spec.pad_id, dtype=caps.dtype, device=caps.device)
            longer = logits_in(cap, s.images, torch.cat([caps, pads], 1), False, s.seed)[:, : T - 1]
            d_len = float(rel_diff(base * mask, longer * mask))
            metrics = {"max_rel_change_extra_padding": d_len}
            pad_pos = ~cap.real_mask(caps)
            d_content = 0.0
            if pad_pos.any():
                g = torch.Generator().manual_seed(s.seed + 3)
                filled = caps.clone()
                filled[pad_pos] = random_tokens(cap, (int(pad_pos.sum()),), g).to(caps.device)
                out = logits_in(cap, s.images, filled, False, s.seed)
                d_content = float(rel_diff(base * mask, out * mask))
                metrics["max_rel_change_pad_content"] = d_content
        problems = []
        if d_len > tol:
            problems.append(f"appending {self.extra_pad} pad tokens changes real-position logits (relative {d_len:.2g})")
        if d_content > tol:
            problems.append(f"changing tokens after EOS changes real-position logits (relative {d_content:.2g})")
        if problems:
            real = cap.real_mask(caps)
            if d_len > tol:
                where = localize_pair(cap, (s.images, caps), (s.images, torch.cat([caps, pads], 1)),
                                      real_positions_differ(real, tol), "real-position output changes with the padded length",
                                      seed=s.seed)
            else:
                where = localize_pair(cap, (s.images, caps), (s.images, filled), real_positions_differ(real, tol),
                                      "real-position output changes with the tokens after EOS", seed=s.seed)
            return self.finding(
                Status.FAIL, "; ".join(problems), metrics,
                "Real positions must not see padding: do not scale positions by the padded length, do not pool "
                "or normalize over the whole padded caption, and mask pad keys (key_padding_mask) where the "
                "decoder is not causal.",
                location=where,
            )
        extra = "" if pad_pos.any() else " (batch has no padding: only the extra-padding probe ran)"
        return self.finding(Status.PASS, f"real-position logits unaffected by padding{extra}", metrics)

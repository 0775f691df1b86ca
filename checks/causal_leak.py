"""causal_leak: logits at position t must not depend on caption tokens after t.

Catches a missing or wrong causal mask, a prefix mask that lets the caption see the future,
bidirectional RNNs over the caption, and targets fed as inputs (teacher-forcing leak). Such
a model reaches a near-zero training loss and generates garbage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import localize_pair
from capdiag.measure.probe import (precision, RANDOM_EVAL, inner_positions, judged_mask, logits_in, rel_diff,
                           replace_tokens, reused_image_features, subject_eval_is_random,
                           subject_train_reproducible, tolerance)
from capdiag.registry import register_check
from capdiag.measure.violations import causal_prefix


def _batchnorm_outside_encoder(s: Subject) -> bool:
    enc = s.captioner.spec.image_module
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not (enc and (n == enc or n.startswith(enc + ".")))
        for n, m in s.model.named_modules()
    )


@register_check
@dataclass
class CausalLeak(Check):
    name = "causal_leak"
    catches = "missing/wrong causal mask: position t sees caption tokens after t"

    def run(self, s: Subject):
        cap = s.captioner
        T = s.captions.shape[1]
        if T < 3:
            return self.skip("captions shorter than 3 tokens")
        if subject_eval_is_random(s):
            return self.skip(RANDOM_EVAL)
        g = torch.Generator().manual_seed(s.seed)
        cuts = sorted({1, T // 2, T - 2})
        # Structural questions are decided in eval mode; train mode only where an identical call
        # reproduces itself exactly (same dropout masks for the same sample).
        modes = [False] + ([True] if subject_train_reproducible(s) else [])
        worst, first_leak, metrics = 0.0, None, {}
        leaked_modes = set()
        with reused_image_features(cap):  # only the captions change: the image features are computed once
            for train in modes:
                base = logits_in(cap, s.images, s.captions, train, s.seed)
                tol = tolerance(base, precision(s))
                for k in cuts:  # keep inputs 0..k, replace the words after k (EOS and padding stay put)
                    where = inner_positions(cap, s.captions, after=k)
                    if not where.any():
                        continue
                    caps = replace_tokens(cap, s.captions, where, g)
                    out = logits_in(cap, s.images, caps, train, s.seed)
                    judged = judged_mask(cap, s.captions, caps)[:, : k + 1, None]  # (B, k+1, 1)
                    per_pos = rel_diff(base[:, : k + 1] * judged, out[:, : k + 1] * judged, dim=(0, 2))  # (k+1,)
                    worst = max(worst, float(per_pos.max()))
                    leaking = (per_pos > tol).nonzero()
                    if len(leaking):
                        leaked_modes.add("train" if train else "eval")
                    if len(leaking) and first_leak is None:
                        first_leak = (int(leaking[0]), k, "train" if train else "eval", caps, tol)
        metrics["max_rel_change_from_future_tokens"] = worst
        metrics["train_mode_judged"] = float(len(modes) == 2)
        if leaked_modes == {"train"} and _batchnorm_outside_encoder(s):
            return self.finding(
                Status.WARN,
                f"logits change with future tokens in train mode only (max relative change {worst:.2g}): BatchNorm "
                "outside the image encoder normalizes over caption positions, so its batch statistics carry "
                "future tokens",
                metrics,
                "A weak train-time leak: the model can exploit statistics of the tokens it must predict. Prefer "
                "LayerNorm in the decoder (eval mode, which uses running statistics, is causal).",
            )
        if first_leak:
            t, k, m, caps, tol = first_leak
            where = localize_pair(cap, (s.images, s.captions), (s.images, caps), causal_prefix(k, T, tol),
                                  f"output at positions <= {k} changes with the tokens after {k}", m == "train", s.seed)
            return self.finding(
                Status.FAIL,
                f"logits at position {t} change when tokens after position {k} change ({m} mode, "
                f"max relative change {worst:.2g}): the decoder sees the future",
                metrics,
                "Pass a causal mask to the decoder (nn.Transformer.generate_square_subsequent_mask(T), "
                "is_causal=True), do not run a bidirectional RNN over the caption, and feed captions[:, :-1] "
                "as input while scoring captions[:, 1:].",
                location=where,
            )
        note = "" if len(modes) == 2 else " (eval mode; train mode is not reproducible call to call, so not judged)"
        return self.finding(
            Status.PASS, f"future tokens do not affect earlier positions (max relative change {worst:.1g}){note}", metrics
        )

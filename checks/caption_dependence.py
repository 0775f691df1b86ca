"""caption_dependence: with teacher forcing, logits at position t must depend on the token at t.

Catches a decoder that never reads its caption input (so it can only learn the prior), an
off-by-one that feeds token t-1 where t belongs (captions shifted twice), and an eval-mode
forward that silently switches to free-running decoding, which makes every teacher-forced
validation number meaningless. Checked in train and eval mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.localize import dependence_dies, forward_location, locate
from capdiag.probe import (precision, RANDOM_EVAL, logits_in, rel_diff, replace_tokens, reused_image_features,
                           subject_eval_is_random, subject_train_reproducible, tolerance_same_shape)
from capdiag.registry import register_check
from capdiag.trace import trace_pair
from capdiag.violations import at_position


@register_check
@dataclass
class CaptionDependence(Check):
    name = "caption_dependence"
    catches = "decoder ignoring its caption input, off-by-one shifts, eval-mode free-running forward"
    min_fraction: float = 0.5  # of (sample, position) pairs whose logits must react to their token

    def run(self, s: Subject):
        cap = s.captioner
        lengths = cap.lengths(s.captions)
        last = int(lengths.min()) - 2  # positions whose token and next target are real for all samples
        if last < 1:
            return self.skip("captions too short to perturb a token inside every caption")
        if subject_eval_is_random(s):
            return self.skip(RANDOM_EVAL)
        positions = sorted({1, (1 + last) // 2, last})
        g = torch.Generator().manual_seed(s.seed + 1)
        metrics, verdicts = {}, {}
        # A train-mode reaction only counts where an identical call reproduces itself (otherwise
        # other dropout masks make every position "react").
        modes = (False, True) if subject_train_reproducible(s) else (False,)
        with reused_image_features(cap):  # only the captions change: the image features are computed once
            for train in modes:
                tag = "train" if train else "eval"
                base = logits_in(cap, s.images, s.captions, train, s.seed)
                tol = tolerance_same_shape(base, precision(s))  # same shapes: any real reaction counts
                hits = []
                for t in positions:  # a word inside every caption: lengths, EOS and padding stay put
                    where = torch.zeros_like(s.captions, dtype=torch.bool)
                    where[:, t] = True
                    caps = replace_tokens(cap, s.captions, where, g)
                    out = logits_in(cap, s.images, caps, train, s.seed)
                    hits.append(rel_diff(base[:, t], out[:, t], dim=(1,)) > tol)  # (B,)
                frac = float(torch.stack(hits).float().mean())
                metrics[f"fraction_dependent_{tag}"] = frac
                verdicts[tag] = frac >= self.min_fraction
        if "train" not in verdicts:
            if verdicts["eval"]:
                return self.finding(Status.PASS, f"logits react to the current token in eval mode "
                                    f"({metrics['fraction_dependent_eval']:.0%}; train mode is not reproducible call "
                                    "to call, so not judged)", metrics)
            verdicts["train"] = False  # unknown: report the general failure below
            metrics["fraction_dependent_train"] = float("nan")
        if not verdicts["eval"] and verdicts["train"]:
            return self.finding(
                Status.FAIL,
                f"in eval mode the logits ignore the caption tokens (only {metrics['fraction_dependent_eval']:.0%} "
                f"react, vs {metrics['fraction_dependent_train']:.0%} in train mode)",
                metrics,
                "forward() decodes free-running when not self.training. Keep forward teacher-forced in both "
                "modes and put free-running decoding in generate(); otherwise validation loss is not comparable.",
                location=self._where(s, positions[len(positions) // 2], False),
            )
        if not (verdicts["eval"] and verdicts["train"]):
            return self.finding(
                Status.FAIL,
                f"logits at position t do not depend on the caption token at t "
                f"(train {metrics['fraction_dependent_train']:.0%}, eval {metrics['fraction_dependent_eval']:.0%} react)",
                metrics,
                "The decoder does not read its caption input at the right position: check that the token "
                "embedding feeds the decoder, and that captions are shifted once (input captions[:, :-1], "
                "target captions[:, 1:]), not twice.",
                location=self._where(s, positions[len(positions) // 2], verdicts["eval"]),
            )
        return self.finding(
            Status.PASS,
            f"logits react to the current token in train ({metrics['fraction_dependent_train']:.0%}) "
            f"and eval ({metrics['fraction_dependent_eval']:.0%}) mode",
            metrics,
        )

    def _where(self, s: Subject, t: int, train: bool):
        """Where caption token ``t`` stops mattering on its way to the logits (or that nothing reads it)."""
        cap = s.captioner
        where = torch.zeros_like(s.captions, dtype=torch.bool)
        where[:, t] = True
        caps = replace_tokens(cap, s.captions, where, torch.Generator().manual_seed(s.seed + 1))
        a, b = trace_pair(cap, (s.images, s.captions), (s.images, caps), train, s.seed)
        T = s.captions.shape[1]
        op, how = dependence_dies(a, b, at_position(t, T, 1e-6), moved=at_position(t, T, 0.0))
        mode = "train" if train else "eval"
        if how == "unread":
            return forward_location(cap.model, f"no operation reads the caption tokens in {mode} mode")
        return locate(op, cap.model, f"reads caption token {t} ({mode} mode), but its output no longer depends on it")

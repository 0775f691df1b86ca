"""caption_dependence: with teacher forcing, logits at position t must depend on the token at t.

Catches a decoder that never reads its caption input (so it can only learn the prior), an
off-by-one that feeds token t-1 where t belongs (captions shifted twice), and an eval-mode
forward that silently switches to free-running decoding, which makes every teacher-forced
validation number meaningless. Checked in train and eval mode.

When only eval mode ignores the tokens, the cause is named only when a measurement tells it apart:
BatchNorm statistics (re-estimating them on a copy restores the reaction: a random deep CNN in eval
mode saturates an LSTM with features of 1e3+, which is not the user's bug while the model is
untrained), or a free-running forward (its eval argmax equals its own greedy decode while its
activations stay in range). Otherwise the finding states what was seen and the candidate causes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from capdiag.measure.batchnorm import recalibrate, tracking_batchnorms

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import dependence_dies, forward_location, locate
from capdiag.measure.probe import (RANDOM_EVAL, activation_scale, logits_in, precision, rel_diff, replace_tokens,
                           reused_image_features, subject_eval_is_random, subject_train_reproducible,
                           tolerance_same_shape)
from capdiag.registry import register_check
from capdiag.state import in_mode, seeded
from capdiag.measure.training import is_trained
from capdiag.measure.trace import trace_pair
from capdiag.measure.violations import at_position


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
                frac = metrics[f"fraction_dependent_{tag}"] = self._fraction(cap, s, positions, train, g)
                verdicts[tag] = frac >= self.min_fraction
        if "train" not in verdicts:
            if verdicts["eval"]:
                return self.finding(Status.PASS, f"logits react to the current token in eval mode "
                                    f"({metrics['fraction_dependent_eval']:.0%}; train mode is not reproducible call "
                                    "to call, so not judged)", metrics)
            verdicts["train"] = False  # unknown: report the general failure below
            metrics["fraction_dependent_train"] = float("nan")
        if not verdicts["eval"] and verdicts["train"]:
            return self._eval_only(s, positions, metrics)
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

    @staticmethod
    def _fraction(cap, s: Subject, positions, train: bool, g: torch.Generator) -> float:
        """The share of (sample, position) pairs whose logits react to their token being replaced, in train
        or eval mode (replacement words drawn from ``g``)."""
        base = logits_in(cap, s.images, s.captions, train, s.seed)
        tol = tolerance_same_shape(base, precision(s))  # same shapes: any real reaction counts
        hits = []
        for t in positions:  # a word inside every caption: lengths, EOS and padding stay put
            where = torch.zeros_like(s.captions, dtype=torch.bool)
            where[:, t] = True
            out = logits_in(cap, s.images, replace_tokens(cap, s.captions, where, g), train, s.seed)
            hits.append(rel_diff(base[:, t], out[:, t], dim=(1,)) > tol)  # (B,)
        return float(torch.stack(hits).float().mean())

    # ---- eval mode ignores the tokens, train mode does not: which cause? -------------------------

    def _eval_only(self, s: Subject, positions, metrics):
        """Name a cause only when a measurement told it apart from the others (see ``_causes``)."""
        frac_e, frac_t = metrics["fraction_dependent_eval"], metrics["fraction_dependent_train"]
        seen = (f"in eval mode the logits ignore the caption tokens (only {frac_e:.0%} react, vs {frac_t:.0%} in "
                "train mode)")
        cause, evidence = self._causes(s, positions, metrics)
        where = self._where(s, positions[len(positions) // 2], False)
        if cause == "batchnorm":
            if not is_trained(s):  # an untrained network's statistics: nothing the user did wrong
                return self.finding(Status.PASS, f"logits react to the current token in train mode ({frac_t:.0%}); in "
                                    f"eval mode they do only once BatchNorm statistics match the weights: {evidence}",
                                    metrics)
            return self.finding(Status.FAIL, f"{seen}: {evidence}", metrics,
                                "BatchNorm running statistics do not match the weights (a pretrained encoder whose "
                                "weights were overwritten, statistics never updated, or a frozen encoder whose "
                                "statistics drifted). Re-estimate them on training data or fix the init.",
                                location=where)
        if cause == "free_running":
            return self.finding(Status.FAIL, f"{seen}: {evidence}", metrics,
                                "forward() decodes free-running when not self.training. Keep forward teacher-forced in "
                                "both modes and put free-running decoding in generate(); otherwise validation loss is "
                                "not comparable.", location=where)
        return self.finding(Status.FAIL, f"{seen}; {evidence}", metrics,
                            "Candidate causes: forward() decodes free-running when not self.training; activations that "
                            "saturate in eval mode (BatchNorm running statistics that do not match the weights, "
                            "features of 1e3+ into tanh/sigmoid gates); a train/eval branch that drops the tokens. "
                            "Deciding measurement: compare model.eval() logits with its own greedy decode, and the "
                            "scale of eval-mode activations with train mode's.", location=where)

    def _causes(self, s: Subject, positions, metrics) -> tuple:
        """``(cause, evidence)``: ``batchnorm`` when re-estimating the BatchNorm statistics of a copy on the
        batch restores the eval-mode reaction; ``free_running`` when the eval forward equals its own greedy
        decode and ignores whole captions while its activations stay in range; else ``(None, what was seen)``."""
        cap = s.captioner
        if tracking_batchnorms(cap.model):
            twin = cap.with_model(copy.deepcopy(cap.model))
            recalibrate(twin, s.images, s.captions, s.seed)
            # The same replacement words as the eval-mode pass of run() (a generator seeded the same way).
            g = torch.Generator().manual_seed(s.seed + 1)
            after = metrics["fraction_dependent_eval_bn_reestimated"] = self._fraction(twin, s, positions, False, g)
            if after >= self.min_fraction:
                return "batchnorm", (f"with BatchNorm statistics re-estimated on the batch, {after:.0%} react in eval "
                                     "mode (the running statistics do not match what the weights produce, and the "
                                     "activations saturate)")
        scale_e, scale_t = (activation_scale(cap, s.images, s.captions, train, s.seed) for train in (False, True))
        metrics["max_activation_eval"], metrics["max_activation_train"] = scale_e, scale_t
        with torch.no_grad(), in_mode(cap.model, False), seeded(s.seed):
            greedy = cap.greedy(s.images, s.captions.shape[1])
        pred = logits_in(cap, s.images, s.captions, False, s.seed).argmax(-1)
        n = min(pred.shape[1], greedy.shape[1] - 1)
        mask = cap.target_mask(greedy)[:, :n]
        same = float(((pred[:, :n] == greedy[:, 1:n + 1]) & mask).sum()) / max(float(mask.sum()), 1.0)
        metrics["eval_argmax_equals_own_greedy"] = same
        in_range = scale_e <= 10 * max(scale_t, 1.0)
        if same >= 0.99 and in_range:
            return "free_running", (f"the eval forward's argmax equals its own greedy decode at {same:.0%} of positions, "
                                    f"with activations in range (max {scale_e:.3g} vs {scale_t:.3g} in train mode): "
                                    "forward() decodes free-running when not self.training")
        return None, (f"eval forward vs its own greedy decode: {same:.0%} equal; largest eval activation {scale_e:.3g} "
                      f"vs {scale_t:.3g} in train mode")

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

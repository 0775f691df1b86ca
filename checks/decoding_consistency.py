"""decoding_consistency: what generate() produces must agree with the teacher-forced forward.

Feed the tokens that greedy/beam ``generate`` produced back through ``forward``: at every
step the forward's argmax must reproduce the next generated token. Catches decoding-only
bugs: a beam search calling the decoder without its causal mask, a generate that never
feeds the image, a different start token, or recurrent state handled differently at
inference. Judged on a model that has learned (confident predictions make ties rare); a token that
is not the forward's argmax but within the noise floor of it is a tie, not a disagreement
(``capdiag.agreement``).
"""
from __future__ import annotations

from dataclasses import dataclass

from capdiag.ablation import generated
from capdiag.agreement import agreement, subject_noise_floor
from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.localize import where_image_dies
from capdiag.registry import register_check


@register_check
@dataclass
class DecodingConsistency(Check):
    name = "decoding_consistency"
    catches = "generate() disagreeing with the teacher-forced forward (mask, image or state missing at inference)"
    cheap = False
    min_agreement: float = 0.9

    def run(self, s: Subject):
        if not s.captioner.has_generate:
            return self.skip("the model has no generate(); capdiag's own greedy decoding is consistent by construction")
        learned = s.learned()
        if learned.unlearned:  # no verdict on a copy that did not learn
            return self.finding(Status.WARN, learned.inconclusive(), {"learned_loss": learned.loss, "blind_floor": learned.floor})
        cap, images, captions, source = learned
        ids = generated(s, cap, images, captions.shape[1] + 2)
        if ids.shape[1] < 2:
            return self.skip("generate() returned no tokens after BOS")
        agr = agreement(cap, images, ids, s.seed, subject_noise_floor(s, cap, images, captions))
        agree = agr.agreement  # the forward's argmax, or within the noise floor of it (a near tie)
        metrics = {"agreement": agree, "n_tokens": float(agr.n_tokens), "n_near_ties": float(agr.n_ties),
                   "noise_floor": agr.noise}
        if agree < self.min_agreement:
            return self.finding(
                Status.FAIL,
                f"forward's argmax reproduces only {agree:.0%} of the tokens generate() chose, near ties counted as "
                f"agreement ({source}); {agr.describe_first()}",
                metrics,
                "generate() runs the decoder differently from forward(): compare masks (causal mask in beam "
                "search), the image features passed, the start token, and how hidden state/caches are carried.",
                location=where_image_dies(cap, images, captions, s.seed, generate=True),
            )
        ties = f" ({agr.n_ties} near ties within the noise floor {agr.noise:.1g})" if agr.n_ties else ""
        return self.finding(Status.PASS, f"generate() and teacher-forced forward agree on {agree:.0%} of tokens{ties}", metrics)

"""label_sanity: are a vision-language captioner's labels the caption, and only the caption?

On the batch the user's collator wrote (or capdiag's own), every label position is classed (prompt,
image placeholder, padding, caption, EOS) and the labels are compared with the input ids at the same and
at the next position; one no-grad forward compares the model's own loss with the mean cross-entropy over
the caption tokens, from the same logits. Fails when prompt, image or pad positions are targets, labels
are pre-shifted for a model that shifts them itself (encoder-decoder: begin with its start token), EOS is
not a target, caption tokens are skipped, image placeholders come without ``pixel_values`` or do not
match the vision features, or the loss is not the caption mean. The fix names only the clauses found.
Measurements and verdict: ``capdiag.prompted.labels`` and ``capdiag.prompted.verdicts.label_sanity``.
"""
from __future__ import annotations

from dataclasses import dataclass

from capdiag.check import Check
from capdiag.prompted import verdicts
from capdiag.registry import register_check


@register_check
@dataclass
class LabelSanity(Check):
    name = "label_sanity"
    catches = "labels that train on the prompt, image or padding, pre-shifted labels, EOS not a target, image tokens that do not match the vision features (vision-language captioners)"
    cheap = True
    subjects = ("prompted",)

    def run(self, s):
        return verdicts.label_sanity(self, s)

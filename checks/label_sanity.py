"""label_sanity: labels that train on the prompt, image or padding, pre-shifted labels, EOS not a target, image tokens that do not match the vision features (vision-language captioners).

The measurement and verdict live in ``capdiag.prompted`` (see ``capdiag.prompted.verdicts.label_sanity``).
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

"""prompt_ablation: a vision-language captioner whose captions ignore the prompt (or, reading it, ignore the image).

The measurement and verdict live in ``capdiag.prompted`` (see ``capdiag.prompted.verdicts.prompt_ablation``).
"""
from __future__ import annotations

from dataclasses import dataclass

from capdiag.check import Check
from capdiag.prompted import verdicts
from capdiag.registry import register_check


@register_check
@dataclass
class PromptAblation(Check):
    name = "prompt_ablation"
    catches = "a vision-language captioner whose captions ignore the prompt (or, reading it, ignore the image)"
    cheap = True
    subjects = ("prompted",)

    def run(self, s):
        return verdicts.prompt_ablation(self, s)

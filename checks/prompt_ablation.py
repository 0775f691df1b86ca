"""prompt_ablation: does a vision-language captioner's caption read its prompt, and its image too?

The prompt's words are replaced by other words (image placeholders and special tokens kept) and the
caption tokens' log-probabilities compared, where the queries are caption tokens (they see the prompt
only through attention), against the batch's own noise floor (rows reversed and put back, or a rounding
step of the model's dtype). Fails when nothing moves beyond the floor (the attention mask hides the
prompt), or when the prompt is read but the image is not; warns when this precision cannot tell.
Measurements and verdict: ``capdiag.prompted.probes`` and ``capdiag.prompted.verdicts.prompt_ablation``.
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

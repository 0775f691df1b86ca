"""adapters: can a LoRA fine-tune of a vision-language captioner adapt what it sees?

With a peft adapter (``--adapter DIR``, or a ``PeftModel`` from ``build_model``): which weights train
(adapters, ``modules_to_save``, anything else), on which side (vision tower, projector, language model),
and whether the image-side adapters get gradient from the caption loss (``torch.autograd.grad``; an A/B
pair counts as one, since B starts at zero). Fails when base weights train beside the adapters, when the
LoRA config leaves nothing image-side trainable, or when no image-side adapter gets gradient; adapters in
modules whose output the caption never reads (LLaVA's last vision layer) are reported as by design.
Measurements and verdict: ``capdiag.prompted.parts`` and ``capdiag.prompted.verdicts.adapters``.
"""
from __future__ import annotations

from dataclasses import dataclass

from capdiag.check import Check
from capdiag.prompted import verdicts
from capdiag.registry import register_check


@register_check
@dataclass
class Adapters(Check):
    name = "adapters"
    catches = "LoRA adapters that leave nothing image-side trainable, image-side adapters without gradient, an unfrozen base"
    cheap = False
    subjects = ("prompted",)

    def run(self, s):
        return verdicts.adapters(self, s)

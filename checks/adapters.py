"""adapters: LoRA adapters that leave nothing image-side trainable, image-side adapters without gradient, an unfrozen base.

The measurement and verdict live in ``capdiag.prompted`` (see ``capdiag.prompted.verdicts.adapters``).
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

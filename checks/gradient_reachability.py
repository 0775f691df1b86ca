"""gradient_reachability: every trainable parameter gets a finite, non-zero gradient.

Catches a detached image path (``features.detach()``, encoder run under ``no_grad`` while
meant to fine-tune), dead projections (all-zero gradient), modules that are built but never
used, and NaN/inf gradients. One train-mode backward of capdiag's caption loss. A module the
model keeps out of training on purpose (run under ``no_grad``, or detached and kept in eval mode
by its own ``train()``) is frozen in effect: a warning that names it, not a failure.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.gradient_path import owner_module, summarize_modules, where_gradient_stops
from capdiag.measure.gradients import frozen_in_effect, train_step_grads
from capdiag.measure.gradients import trainable
from capdiag.measure.probe import param_part
from capdiag.registry import register_check


@register_check
@dataclass
class GradientReachability(Check):
    name = "gradient_reachability"
    catches = "detached image path, dead or unused modules, NaN/inf gradients"

    def run(self, s: Subject):
        cap = s.captioner
        params = trainable(cap.model)
        if not params:
            return self.skip("the model has no trainable parameters")
        none, zero, nonfinite, dead_modules = self._measure(s, params)
        metrics = {
            "n_trainable": len(params),
            "n_no_grad": len(none),
            "n_zero_grad": len(zero),
            "n_nonfinite_grad": len(nonfinite),
        }
        if nonfinite:
            return self.finding(
                Status.FAIL, f"{len(nonfinite)} parameters get NaN/inf gradients, first in {summarize_modules(nonfinite)}", metrics,
                "Non-finite gradients usually come from log/sqrt/division of values near zero or overflow in "
                "half precision; enable torch.autograd.detect_anomaly() once to find the op.",
                {"nonfinite": nonfinite},
            )
        if none:
            return self._unreached(s, params, none, metrics)
        return self._zero(s, params, zero, dead_modules, metrics)

    @staticmethod
    def _measure(s: Subject, params: list) -> tuple:
        """One training step: parameters without a gradient, with an all-zero one, with NaN/inf, and the
        modules none of whose parameters get anything."""
        grads, _ = train_step_grads(s)
        none = [n for n, _ in params if grads.get(n) is None]
        nonfinite = [n for n, _ in params if grads.get(n) is not None and not bool(torch.isfinite(grads[n]).all())]
        zero = [n for n, _ in params if grads.get(n) is not None and n not in nonfinite and not bool(grads[n].any())]
        # A module all of whose parameters get nothing is dead; a lone zero bias (e.g. before BatchNorm) is not.
        by_module = defaultdict(list)
        for n, _ in params:
            by_module[owner_module(n)].append(n)
        bad = set(none) | set(zero)
        dead_modules = [m for m, ns in by_module.items() if all(n in bad for n in ns)]
        return none, zero, nonfinite, dead_modules

    def _unreached(self, s: Subject, params: list, none: list, metrics: dict):
        """Parameters the loss never reaches: frozen in effect on purpose (WARN), else cut off (FAIL)."""
        cut = frozen_in_effect(s)
        if none and all(m.deliberate for m in cut) and sum(len(m.params) for m in cut) == len(none):
            return self.finding(
                Status.WARN,
                f"{len(none)} trainable parameters get no gradient because "
                f"{'; '.join(f'{m.module} {m.how}' for m in cut[:3])}: frozen in effect, though requires_grad=True",
                metrics,
                "Legal for a fixed feature extractor. If it is meant to stay frozen, say so with "
                "requires_grad_(False) (optimizers and capdiag then know); if it is meant to fine-tune, remove the "
                "torch.no_grad() or .detach() that cuts it off.",
                {"no_grad": none},
            )
        parts_none = sorted({param_part(n) for n in none})
        return self.finding(
            Status.FAIL,
            f"{len(none)} of {len(params)} trainable parameters get no gradient from the caption loss "
            f"({', '.join(parts_none)}: {summarize_modules(none)})",
            metrics,
            "These parameters are cut off from the loss: a .detach() or torch.no_grad() on the image "
            "features, a module built but never called, or a branch unused in forward. If they are meant "
            "frozen, set requires_grad=False.",
            {"no_grad": none},
            location=where_gradient_stops(s, none),
            )

    def _zero(self, s: Subject, params: list, zero: list, dead_modules: list, metrics: dict):
        """Every parameter is reached: modules whose gradient is all zero are a dead path."""
        if dead_modules:
            return self.finding(
                Status.FAIL,
                f"modules get an all-zero gradient: {', '.join(dead_modules[:4])}", metrics,
                "A dead path: a ReLU after a projection whose outputs are all negative, a multiply by zero, or "
                "features scaled to nothing. Check the init and the activation after this module.",
                {"zero_grad": zero},
                location=where_gradient_stops(s, [n for n in zero if owner_module(n) in dead_modules]),
            )
        if zero:
            return self.finding(
                Status.WARN, f"{len(zero)} parameters get an exactly zero gradient: {', '.join(zero[:4])}", metrics,
                "Often a bias followed by BatchNorm/LayerNorm (harmless but useless); otherwise a dead path.",
                {"zero_grad": zero},
            )
        return self.finding(Status.PASS, f"all {len(params)} trainable parameters get finite, non-zero gradients", metrics)

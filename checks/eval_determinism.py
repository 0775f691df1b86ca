"""eval_determinism: two eval-mode passes (and two generate calls) give identical outputs.

Catches dropout left on at inference (``F.dropout(x, p)`` without ``training=self.training``,
``nn.Dropout`` re-created in forward), sampling inside forward, and stateful modules that
carry state from one call to the next.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.probe import rel_diff, tolerance
from capdiag.registry import register_check
from capdiag.state import mode


@register_check
@dataclass
class EvalDeterminism(Check):
    name = "eval_determinism"
    catches = "dropout or sampling active in eval mode, state carried between calls"

    def run(self, s: Subject):
        cap = s.captioner
        # No reseeding between the calls on purpose: randomness in eval mode must show.
        with torch.no_grad(), mode(cap.model, False):
            a = cap.logits(s.images, s.captions).float()
            b = cap.logits(s.images, s.captions).float()
            d = float(rel_diff(a, b))
            metrics = {"max_rel_change_forward": d}
            gen_same = None
            if cap.has_generate:
                g1 = cap.generate(s.images)
                g2 = cap.generate(s.images)
                gen_same = g1.shape == g2.shape and bool(torch.equal(g1, g2))
                metrics["generate_identical"] = float(gen_same)
        tol = 1e-6 if a.device.type == "cpu" and a.dtype == torch.float32 else tolerance(a, cap.dtype)
        problems = []
        if d > tol:
            problems.append(f"two eval-mode forwards differ (relative {d:.2g})")
        if gen_same is False:
            problems.append("two generate() calls return different captions")
        if problems:
            return self.finding(
                Status.FAIL, "; ".join(problems), metrics,
                "Something random or stateful runs at inference: use nn.Dropout modules (or "
                "F.dropout(x, p, training=self.training)), keep sampling out of forward, and do not keep "
                "state on self between calls.",
            )
        what = "forward and generate" if gen_same else "forward"
        return self.finding(Status.PASS, f"eval-mode {what} deterministic", metrics)

"""eval_determinism: two eval-mode passes (and two generate calls) give identical outputs, and
no call depends on the calls before it.

Catches dropout left on at inference (``F.dropout(x, p)`` without ``training=self.training``,
``nn.Dropout`` re-created in forward), sampling inside forward, and state carried from one call to
the next: an encoder output cached on the module and reused whenever the batch size matches.
That last probe runs on two deep copies (``call(A); call(B)`` on one, ``call(B)`` on a fresh one),
so the caller's model never holds the state a probe leaves behind.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import localize_pair
from capdiag.measure.origins import carried_state, loop_location, random_draw
from capdiag.measure.trace import trace_call
from capdiag.measure.probe import precision, rel_diff, tolerance
from capdiag.registry import register_check
from capdiag.state import in_mode
from capdiag.measure.violations import any_difference


@register_check
@dataclass
class EvalDeterminism(Check):
    name = "eval_determinism"
    catches = "dropout or sampling active in eval mode, state carried between calls"

    def run(self, s: Subject):
        cap = s.captioner
        # No reseeding between the calls on purpose: randomness in eval mode must show.
        with torch.no_grad(), in_mode(cap.model, False):
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
        tol = 1e-6 if a.device.type == "cpu" and precision(s) == torch.float32 else tolerance(a, precision(s))
        # Carried state is only measurable when repeated calls agree at all.
        carried = {} if d > tol or gen_same is False else \
            self._carried_state(s, {"forward": a, **({"generate": g1} if cap.has_generate else {})})
        metrics.update({f"max_rel_change_{k}_after_other_call": v for k, v in carried.items()})
        problems = []
        if d > tol:
            problems.append(f"two eval-mode forwards differ (relative {d:.2g})")
        if gen_same is False:
            problems.append("two generate() calls return different captions")
        for what, v in carried.items():
            if v > tol:
                problems.append(f"{what} of batch B depends on the call made before it (a {what} of another batch of "
                                f"the same size first changes it by {v:.2g}): state is carried between calls")
        if problems:
            where = self._where(s, d > tol, gen_same is False, tol) or self._carried_where(s, carried, tol)
            return self.finding(
                Status.FAIL, "; ".join(problems), metrics,
                "Something random or stateful runs at inference: use nn.Dropout modules (or "
                "F.dropout(x, p, training=self.training)), keep sampling out of forward, and do not keep "
                "state on self between calls.",
                location=where,
            )
        what = "forward and generate" if gen_same else "forward"
        return self.finding(Status.PASS, f"eval-mode {what} deterministic and independent of earlier calls", metrics)

    def _where(self, s: Subject, forward_differs: bool, generate_differs: bool, tol: float):
        """A random draw in the eval-mode call that differed (its line), else the first operation whose
        output differs between two identical calls, not reseeded; else generate()'s loop."""
        cap = s.captioner
        for differs, gen in ((forward_differs, False), (generate_differs, True)):
            if not differs:
                continue
            call = "generate()" if gen else "forward"
            where = random_draw(trace_call(cap, s.images, s.captions, seed=None, generate=gen), cap.model, call)
            if where is None and not gen:
                where = localize_pair(cap, (s.images, s.captions), (s.images, s.captions), any_difference(tol),
                                      "two identical eval-mode calls differ here", seed=None)
            if where is None and gen:
                where = loop_location(cap, s.images, "two identical generate() calls return different captions")
            if where is not None:
                return where
        return None

    def _carried_where(self, s: Subject, carried: dict, tol: float):
        """The line of the second call that reads what the first stored on the model."""
        for what, v in carried.items():
            if v > tol:
                return carried_state(s.captioner, (s.images.roll(1, 0).flip(-1), s.captions.flip(0)),
                                     (s.images, s.captions), generate=what == "generate")
        return None

    def _carried_state(self, s: Subject, clean: dict) -> dict:
        """Relative change of call(B) when call(A) ran first, against ``clean[what]``: call(B) on the
        model as the check found it (capdiag's own calls restore every attribute, so that is a
        fresh call). A is B with the images rolled by one and flipped and the captions reversed
        (same shapes); the calls run on a deep copy whose state may carry from one call to the next."""
        cap = s.captioner
        imgs_a, caps_a = s.images.roll(1, 0).flip(-1), s.captions.flip(0)
        used = cap.with_model(copy.deepcopy(cap.model))
        used.stateless = False  # let state carry between these calls
        calls = {"forward": lambda i, t: used.logits(i, t).float(), "generate": lambda i, t: used.generate(i).float()}
        out = {}
        with torch.no_grad(), in_mode(used.model, False):
            for what, reference in clean.items():
                calls[what](imgs_a, caps_a)
                after = calls[what](s.images, s.captions)
                if after.shape != reference.shape:
                    out[what] = float("inf")
                elif what == "forward":
                    out[what] = float(rel_diff(reference, after))
                else:
                    out[what] = float(not torch.equal(reference.float(), after))
        return out

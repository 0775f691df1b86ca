"""input_mutation: the forward pass must not modify the caller's images or captions in place.

An in-place normalization (``images.sub_(mean)``) double-normalizes every re-used batch and
breaks gradient-based tools; in-place edits of captions corrupt the targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.origins import input_write
from capdiag.registry import register_check
from capdiag.state import in_mode, seeded
from capdiag.measure.trace import trace_call


@register_check
@dataclass
class InputMutation(Check):
    name = "input_mutation"
    catches = "forward (or generate) changing the caller's image/caption tensors in place"

    def run(self, s: Subject):
        cap = s.captioner
        changed, where = [], None
        calls = [("forward (train)", True, False), ("forward (eval)", False, False)]
        if cap.has_generate:
            calls.append(("generate", False, True))
        for label, train, gen in calls:
            images, captions = s.images.clone(), s.captions.clone()
            ref_i, ref_c = images.clone(), captions.clone()
            with torch.no_grad(), in_mode(cap.model, train), seeded(s.seed):
                cap.model.generate(images, max_len=cap.spec.max_len) if gen else cap.call(images, captions, protect=False)
            if not torch.equal(images, ref_i):
                d = float((images.float() - ref_i.float()).abs().max())
                changed.append(f"images by {label} (max change {d:.3g})")
            if not torch.equal(captions, ref_c):
                n = int((captions != ref_c).sum())
                changed.append(f"captions by {label} ({n} tokens)")
            if changed and where is None:
                trace = trace_call(cap, s.images.clone(), s.captions.clone(), train, s.seed, protect=False, generate=gen)
                where = input_write(trace, cap.model, "generate()" if gen else "forward")
        if changed:
            return self.finding(
                Status.FAIL, "inputs modified in place: " + "; ".join(changed), {"n_mutations": len(changed)},
                "Replace in-place ops on inputs (x.sub_(), x /= s, x[...] = v, torch.clamp_(x)) with "
                "out-of-place ones (x = x - mean), or clone the input first.",
                location=where,
            )
        return self.finding(Status.PASS, f"images and captions unchanged after {len(calls)} calls", {"n_mutations": 0})

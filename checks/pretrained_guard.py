"""pretrained_guard: pretrained modules must still hold pretrained weights.

The forum case: ``model.apply(init_weights)`` with xavier on every Linear/Conv also reached
the pretrained ResNet, so the decoder learned the caption prior from useless features. With a
reference (``CAPDIAG['pretrained'] = {'encoder': 'weights.pth'}``) tensors are compared with it
(changed and uncorrelated = clobbered; changed but correlated = fine-tuned, fine). Without one,
the fingerprint of a fresh init (see ``capdiag.measure.pretrained``) gives it away. Modules declared
pretrained fail; an undeclared module that looks like a torchvision backbone only warns,
since it may be trained from scratch on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import who_wrote
from capdiag.measure.origins import unmatched_load
from capdiag.measure.trace import traced_build
from capdiag.intake.checkpoints import read_state_dict
from capdiag.measure.pretrained import compare_to_reference, freshness, looks_like_backbone
from capdiag.registry import register_check

HINT = (
    "A custom init overwrote pretrained weights (model.apply(init_fn) reaches every submodule, the encoder "
    "included), or the weights were never loaded. Apply the init to the new layers only (e.g. "
    "model.decoder.apply(init_fn)), load the pretrained weights after the init, and wrap inits in "
    "capdiag.guard_pretrained(model.encoder)."
)


@register_check
@dataclass
class PretrainedGuard(Check):
    name = "pretrained_guard"
    catches = "pretrained encoder weights overwritten by a custom init (the forum case) or never loaded"
    max_fresh_fraction: float = 0.5

    def _targets(self, s: Subject):
        spec = s.captioner.spec
        declared = spec.pretrained
        if declared is not None:
            if isinstance(declared, str):
                declared = [declared]
            if isinstance(declared, dict):
                return [(n, ref, True) for n, ref in declared.items()]
            return [(n, None, True) for n in declared]
        found = []
        if spec.image_module and looks_like_backbone(s.captioner.image_module()):
            found.append((spec.image_module, None, False))
        else:
            for n, child in s.model.named_children():
                if looks_like_backbone(child):
                    found.append((n, None, False))
        return found

    def _who_wrote(self, s: Subject, suspects: list):
        """Rebuild the model the user's way and name the line that last wrote the failing tensors."""
        if s.rebuild is None or not suspects:
            return None
        module, names = suspects[0]
        built = traced_build(s.rebuild)  # a load that matched nothing, else the line that wrote the weights
        return unmatched_load(built[2], module) or who_wrote(built, module, [f"{module}.{n}" for n in names])

    def run(self, s: Subject):
        targets = self._targets(s)
        if not targets:
            return self.skip("no pretrained modules declared (CAPDIAG['pretrained']) or detected")
        metrics, problems, warnings, notes = {}, [], [], []
        suspects: list = []  # (module, parameter names) that failed, for the location
        for name, ref, declared in targets:
            module = s.captioner.submodule(name)
            if ref is not None:
                cmp = compare_to_reference(module, read_state_dict(ref, "reference weights"))
                metrics[f"{name}_fraction_clobbered"] = cmp.fraction_clobbered
                metrics[f"{name}_n_finetuned"] = len(cmp.finetuned)
                if cmp.clobbered:  # fine-tuning keeps tensors correlated with the reference; init does not
                    ex = ", ".join(f"{k} (cos {c:.2f})" for k, c in cmp.clobbered[:3])
                    problems.append(
                        f"{len(cmp.clobbered)} of {cmp.n_compared} tensors of {name!r} no longer resemble the "
                        f"reference weights: {ex}")
                    suspects.append((name, [k for k, _ in cmp.clobbered]))
                    continue
                notes.append(f"{name!r}: {len(cmp.identical)} tensors identical to the reference, "
                             f"{len(cmp.finetuned)} fine-tuned")
            fr = freshness(module)
            metrics[f"{name}_fraction_fresh"] = fr.fraction_fresh
            if fr.fraction_fresh >= self.max_fresh_fraction:
                what = (f"{fr.n_fresh} of {fr.n_tensors} weight tensors of {name!r} look freshly initialized "
                        f"({'; '.join(fr.examples[:2])})")
                if declared:
                    problems.append(what)
                    suspects.append((name, fr.fresh_names))
                else:
                    kind = looks_like_backbone(module)
                    warnings.append(f"{what}, though it is a {kind} backbone, usually used pretrained")
            elif ref is None:
                notes.append(f"{name!r}: {fr.fraction_fresh:.0%} of weight tensors look freshly initialized")
        if problems:
            return self.finding(Status.FAIL, "; ".join(problems), metrics, HINT, location=self._who_wrote(s, suspects))
        if warnings:
            return self.finding(
                Status.WARN, "; ".join(warnings), metrics,
                "If this backbone should be pretrained, load its weights (and keep custom inits off it); if it "
                "is trained from scratch on purpose, declare CAPDIAG['pretrained'] = [] to silence this.",
            )
        return self.finding(Status.PASS, "pretrained weights intact: " + "; ".join(notes), metrics)

"""frozen_drift: a module meant to stay frozen must come out of a training step unchanged.

Catches the frozen pretrained encoder whose parameters all have ``requires_grad=False`` but that
nothing keeps in eval mode: every train-mode forward overwrites its BatchNorm running statistics
with those of the current batch, so the "frozen" features drift away from what the weights were
trained with (and eval mode, which uses the statistics, degrades). Also any parameter of such a
module that a step changes (an optimizer over all parameters with weight decay, in-place edits).

One training step (``model.train()``, forward, backward, Adam over the trainable parameters) on a
deep copy, then the same comparison the training monitor makes (``capdiag.measure.pretrained.DriftWatcher``)
over the modules that are frozen: ``requires_grad=False``, or never reached by the loss's gradient
(run under ``torch.no_grad()``, behind ``.detach()``: the PyTorch tutorial freezes its ResNet that way,
and never calls ``eval()`` on it). A pretrained module that
trains (``requires_grad=True``) is being fine-tuned: its changes are the point, not drift.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.gradients import frozen_in_effect
from capdiag.measure.localize import module_location
from capdiag.measure.optim import Adam
from capdiag.measure.pretrained import DriftWatcher, frozen_modules, is_running_stat
from capdiag.registry import register_check
from capdiag.state import seeded


@register_check
@dataclass
class FrozenDrift(Check):
    name = "frozen_drift"
    catches = "frozen modules (requires_grad=False, or run under no_grad/detached) that still change in training: BatchNorm statistics of an encoder not kept in eval()"
    live = True
    lr: float = 1e-3

    def reads_only(self, s: Subject) -> bool:
        return s.live  # live: compares state_dicts with the reference taken at the start, nothing else

    def run(self, s: Subject):
        cap = s.captioner
        if s.live:
            return self._since_start(s)
        if not any(p.requires_grad for p in cap.model.parameters()):
            return self.skip("the model has no trainable parameters: nothing trains, nothing can drift")
        # Frozen however it is done: requires_grad_(False), or never reached by a gradient (run under
        # no_grad, behind .detach()): nothing trains such a module, so nothing may change it.
        declared = frozen_modules(cap.model)
        cut = {m.module: m.how for m in frozen_in_effect(s)
               if not any(m.module == d or m.module.startswith(d + ".") for d in declared)}
        names = declared + sorted(cut)
        if not names:
            return self.skip("no frozen modules (every module has trainable parameters that get a gradient)")
        twin = cap.with_model(copy.deepcopy(cap.model))
        watchers = [DriftWatcher(twin.submodule(n), n) for n in names]
        params = [p for p in twin.model.parameters() if p.requires_grad]
        opt = Adam(params, lr=self.lr)
        twin.model.train()  # what a training loop does: model.train() on the whole model
        with seeded(s.seed):
            loss = twin.loss(s.images, s.captions)
            loss.backward()
            opt.step()
        moved = {k: v for w in watchers for k, v in w.drift().items()}
        stats = [k for k in moved if is_running_stat(k)]
        weights = [k for k in moved if not is_running_stat(k)]
        metrics = {"n_frozen_modules": len(names), "n_tensors_moved": len(moved),
                   "max_rel_change": max(moved.values()) if moved else 0.0}
        if not moved:
            return self.finding(Status.PASS, f"frozen modules unchanged by a training step ({', '.join(names[:4])})",
                                metrics)
        worst = max(moved, key=moved.get)
        parts = []
        if stats:
            parts.append(f"{len(stats)} BatchNorm running statistics moved")
        if weights:
            parts.append(f"{len(weights)} frozen weights changed")
        owners = sorted({n for n in names if any(k.startswith(n + ".") for k in moved)})
        why = "; ".join(f"{o} {cut[o]} (requires_grad=True), so nothing trains it" for o in owners if o in cut)
        return self.finding(
            Status.FAIL,
            f"frozen module {', '.join(repr(o) for o in owners[:3])} changed in one training step: {' and '.join(parts)} "
            f"(largest: {worst}, relative {moved[worst]:.2g}){'; ' + why if why else ''}",
            metrics,
            "Neither requires_grad=False nor torch.no_grad() stops BatchNorm from updating its running statistics in train mode. Keep "
            "the frozen module in eval mode (override train(): super().train(mode); self.encoder.eval(); return "
            "self) or use torchvision.ops.FrozenBatchNorm2d; keep frozen parameters out of the optimizer.",
            {"moved": moved},
            location=module_location(cap.model, owners[0], f"frozen, yet {worst} moved in one training step")
            if owners else None,
        )

    def _since_start(self, s: Subject):
        """During training: the declared frozen modules against their state when training started.
        Metrics ``drift.<module>`` are this rank's largest relative change (0 when unchanged)."""
        if not s.frozen_reference:
            return self.skip("no frozen modules declared to the training monitor (frozen_modules=...)")
        metrics, moved = {}, {}
        for w in s.frozen_reference:
            m = w.drift()
            metrics[f"drift.{w.name}"] = max(m.values()) if m else 0.0
            moved.update(m)
        if not moved:
            return self.finding(Status.PASS, "frozen modules unchanged since training started", metrics)
        worst = max(moved, key=moved.get)
        return self.finding(
            Status.FAIL, f"frozen module changed since training started: {worst} by {moved[worst]:.2g} (relative)", metrics,
            "BatchNorm running stats update in train mode unless the module is kept in eval(); keep frozen "
            "parameters out of the optimizer.", {"moved": moved})

"""Training-time diagnostics: policy over the findings of the registered ``live`` checks.

Measuring is the checks' own, through ``run_checks`` on a ``live`` Subject: every ``every`` steps
``image_ablation``, ``attention_maps`` and ``frozen_drift`` on a fixed probe batch (eval mode, no
grad, RNG untouched); every ``grad_every`` steps ``gradient_flow`` on the ``.grad`` the step left.
What stays here is policy: warm-up, patience, the loss-still-falling condition, the action, and
agreement over ranks. TensorBoard tags are ``capdiag/<check>/<metric>``, as in ``--json``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import warnings
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .captioner import Captioner
from .check import Subject
from .distributed import any_rank, dist_or_none, preserved_sharding, reduce_metrics, sharding_state, unwrap
from .errors import CapdiagError, UsageError
from .finding import Finding, Flag, Status
from .intake.hints import caption_spec
from .measure.pretrained import DriftWatcher
from .registry import get_check
from .runner import run_checks
from .state import in_mode, preserved_rng

RELIANCE = "image_ablation/image_reliance"
GRAD_RATIO = "gradient_flow/image_over_text_rms_grad"


class CapdiagWarning(UserWarning):
    """A training-time diagnostic finding."""


class ImageIgnoredError(CapdiagError):
    """Raised (action="raise") when the decoder is judged to ignore the image."""


class TrainingDiagnostics:
    """Watch a captioner while it trains.

    Call ``after_backward(step)`` after ``loss.backward()`` and ``after_step(step, loss)`` after the
    optimizer step; stop when ``should_stop`` (see the README's "Watching training runs").

    Args:
        model: the captioner (DDP-wrapped or FSDP-sharded is fine), called ``model(images, captions)``.
        probe_batch: a fixed ``(images, captions)`` batch (at least 2 images) on the model's device; for a
            vision-language captioner (LLaVA, Qwen2-VL, ...: ``capdiag.prompted``) the dict its collator writes
            (pixel_values, input_ids, attention_mask, labels), with ``processor=`` (and ``prompt=``) as hints.
        log_dir: TensorBoard run directory (rank 0 writes; None: no files).
        every: probe cadence in steps; ``grad_every`` the gradient cadence (default the same).
        warmup: steps before the image-ignoring flag may fire.
        min_reliance: ``image_reliance`` (``1 - L_true / L_shuffled``, as in image_ablation) below which a probe is blind.
        patience: consecutive blind probes needed to flag.
        action: "warn", "raise" or "stop".
        frozen_modules: dotted names of modules meant to stay frozen (drift since the start is watched).
        histograms: also log gradient histograms (expensive: about 2x a step).
        figures, figure_every: log the reliance-history figure every ``figure_every`` probes.
        **hints: the same hints a model file's CAPDIAG takes (vocab_size, pad_id, image_module, ...).
    """

    def __init__(self, model: nn.Module, probe_batch: Sequence[torch.Tensor], *, log_dir: Optional[str] = None,
                 every: int = 100, grad_every: Optional[int] = None, warmup: int = 200, min_reliance: float = 0.05,
                 patience: int = 3, action: str = "warn", frozen_modules: Sequence[str] = (), histograms: bool = False,
                 figures: bool = True, figure_every: int = 10, max_history: int = 10_000, **hints):
        if action not in ("warn", "raise", "stop") or every < 1:
            raise UsageError(f"action must be 'warn', 'raise' or 'stop' (got {action!r}) and every >= 1 (got {every})")
        self.model, inner = model, unwrap(model)
        self._fsdp2, self._errored = bool(sharding_state(model)), set()  # resolved once: walking the modules costs ~1 ms a step
        if isinstance(probe_batch, Mapping):  # a vision-language captioner's batch, as its processor writes it
            self.prompted, self.captioner = self._prompted_subject(inner, probe_batch, frozen_modules, hints), None
        else:
            self.prompted = None
            self._captioner_probe(inner, probe_batch, frozen_modules, hints)
        self.probe_checks = [get_check(n) for n in ("image_ablation", "attention_maps", "frozen_drift")]
        self.grad_checks = [get_check("gradient_flow")]
        self.every, self.grad_every = every, grad_every or every
        self.warmup, self.min_reliance, self.patience, self.action = warmup, min_reliance, patience, action
        self.histograms, self.figures, self.figure_every = histograms, figures, max(1, figure_every)
        self.rank = dist_or_none().get_rank() if dist_or_none() else 0
        self.sink = _tensorboard(log_dir) if log_dir is not None and self.rank == 0 else None
        self.history = collections.defaultdict(lambda: collections.deque(maxlen=max_history))
        self.flags: list = []
        self.should_stop = self._stop_local = self._closed = False
        self._blind_streak, self._loss_at_warmup, self._ratio_start, self._last_loss = 0, None, None, None

    writer = property(lambda self: self.sink.writer if self.sink else None)  # SummaryWriter (rank 0, log_dir)

    def _captioner_probe(self, inner: nn.Module, probe_batch, frozen_modules, hints: dict) -> None:
        images, captions = probe_batch[0].detach(), probe_batch[1].detach()
        if images.shape[0] < 2:
            raise UsageError("probe_batch needs at least 2 images (reliance shuffles them across the batch)")
        spec = caption_spec(hints, inner, "TrainingDiagnostics(...)")
        self.captioner = Captioner(inner, spec, name=type(inner).__name__, stateless=True)
        if not spec.vocab_size:
            with torch.no_grad(), in_mode(inner, False), preserved_rng():
                spec.vocab_size = int(self.captioner.logits(images[:2], captions[:2]).shape[-1])
        self.images, self.captions = images, captions
        self.frozen = [DriftWatcher(self.captioner.submodule(n), n) for n in frozen_modules]

    @staticmethod
    def _prompted_subject(inner: nn.Module, batch, frozen_modules, hints: dict):
        """The live subject of a vision-language captioner: ``hints`` carry its ``processor`` (and ``prompt``)."""
        from .prompted.subject import subject_from_batch

        processor, prompt = hints.pop("processor", None), hints.pop("prompt", None)
        if processor is None or hints or frozen_modules:
            raise UsageError("a vision-language probe batch (the processor's dict) takes processor= and prompt=: "
                             "TrainingDiagnostics(model, batch, processor=processor, prompt=PROMPT)"
                             + (f"; {', '.join(hints)} and frozen_modules are for (images, captions) captioners"
                                if hints or frozen_modules else ""))
        return subject_from_batch(inner, processor, batch, prompt, live=True)

    def _run(self, checks, reduce: bool = True) -> tuple:
        """Run live checks on the probe batch; ``(findings, metrics averaged / maxed over ranks)``.
        Gradient statistics need no reduction: DDP synchronized the gradients, and sharded ones
        were summed over ranks by the measurement itself."""
        subject = dataclasses.replace(self.prompted, _cache={}) if self.prompted is not None else Subject(
            self.captioner, self.images, self.captions, seed=0, batch_source="user", live=True,
            frozen_reference=self.frozen)
        with preserved_sharding(self.model) if self._fsdp2 else contextlib.nullcontext():
            findings = run_checks(subject, checks).findings
        for f in findings:
            if f.status is Status.ERROR and f.check not in self._errored:  # never silently lose a measurement
                self._errored.add(f.check)
                warnings.warn(f"capdiag: the {f.check} check raised during training; its metrics are missing: "
                              f"{f.summary}", CapdiagWarning, stacklevel=4)
        values = {f"{f.check}/{k}": float(v) for f in findings for k, v in f.metrics.items() if k != "seconds"}
        if reduce:
            drift = {k: v for k, v in values.items() if k.startswith("frozen_drift/drift.")}
            values = {**reduce_metrics({k: v for k, v in values.items() if k not in drift}), **reduce_metrics(drift, "max")}
        return {f.check: f for f in findings}, values

    def after_backward(self, step: int) -> dict:
        """Gradient statistics from ``.grad`` (call after ``loss.backward()``, before ``zero_grad``)."""
        if step % self.grad_every:
            return {}
        found, out = self._run(self.grad_checks, reduce=False)
        f = found["gradient_flow"]
        ratio = out.get(GRAD_RATIO)
        if ratio is not None and math.isfinite(ratio) and ratio > 0:
            self._ratio_start = self._ratio_start or ratio
            if step >= self.warmup and ratio < 1e-3 * self._ratio_start:
                self._flag(step, "image_starved", f, f"the image path's share of the gradient fell from "
                           f"{self._ratio_start:.2g} to {ratio:.2g} of the text path's: the encoder has stopped learning")
        if out.get("gradient_flow/n_nonfinite_grads", 0) > 0:
            self._flag(step, "nonfinite", f, f.summary if f.status.failed else "non-finite gradients on another rank")
        self._log(step, out)
        if self.sink is not None and self.histograms:
            self.sink.gradient_histograms(inner_model(self), step)
        return out

    def after_step(self, step: int, loss: Optional[float] = None) -> dict:
        """Record the loss and, every ``every`` steps, run the live probe checks."""
        if loss is not None:
            self._last_loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            if not math.isfinite(self._last_loss):
                self._flag(step, "nonfinite", None, f"training loss is {self._last_loss}")
        out = {}
        if step % self.every == 0:
            found, out = self._run(self.probe_checks)
            if self._last_loss is not None:
                out["train_loss"] = self._last_loss
            for k, v in out.items():
                if k.startswith("frozen_drift/drift.") and v > 0:
                    self._flag(step, "drift", found["frozen_drift"], f"frozen module {k.split('.', 1)[1]!r} changed by "
                               f"up to {v:.2g} (relative); BatchNorm running stats update in train mode unless the "
                               "module is kept in eval()", once=True)
            self._judge(step, out, found.get("image_ablation"))
            self._log(step, out)
        # Agreeing on a stop is a collective: only at steps that probe or read gradients.
        if step % self.every == 0 or step % self.grad_every == 0 or dist_or_none() is None:
            self.should_stop = any_rank(self._stop_local)
        return out

    def _judge(self, step: int, out: dict, finding: Optional[Finding]) -> None:
        reliance = out.get(RELIANCE)
        if step >= self.warmup and self._loss_at_warmup is None:
            self._loss_at_warmup = self._last_loss
        if reliance is None or step < self.warmup:
            return
        self._blind_streak = self._blind_streak + 1 if reliance < self.min_reliance else 0
        falling = None not in (self._last_loss, self._loss_at_warmup) and self._last_loss < self._loss_at_warmup
        if self._blind_streak >= self.patience and (falling or self._blind_streak >= 2 * self.patience):
            self._flag(step, "image_ignored", finding, (
                f"image-ignoring decoder: image reliance {reliance:.3f} (shuffling the probe images barely moves the "
                f"loss) for {self._blind_streak} probes in a row while the training loss "
                f"{'keeps falling' if falling else 'stalls'} ({self._last_loss:.3f}). Likely causes: a pretrained "
                "encoder clobbered by a custom init, detached or zeroed features, a dead ReLU on the projection, "
                "features scaled to nothing."), once=True)

    def _flag(self, step: int, kind: str, finding: Optional[Finding], message: str, once: bool = False) -> None:
        if once and any(f.kind == kind for f in self.flags):
            return
        check = finding.check if finding else "training_loss"
        flag = Flag(step, kind, Finding(check, Status.FAIL, message, dict(finding.metrics) if finding else {},
                                        hint=finding.hint if finding else ""))
        self.flags.append(flag)
        if self.sink is not None:
            self.sink.text(f"flags/{kind}", f"step {step}: {message}", step)
        if self.action == "raise" and kind == "image_ignored":
            raise ImageIgnoredError(f"step {step}: {message}")
        if self.action == "stop" and kind in ("image_ignored", "nonfinite"):
            self._stop_local = True
        if self.rank == 0:
            warnings.warn(f"capdiag (step {step}): {message}", CapdiagWarning, stacklevel=3)

    def _log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.history[k].append((step, v))
        if self.sink is None:
            return
        self.sink.scalars(metrics, step)
        if self.figures and RELIANCE in metrics and len(self.history[RELIANCE]) % self.figure_every == 0:
            self.sink.history(RELIANCE, list(self.history[RELIANCE]), self.min_reliance, step)

    def add_gradient_flow_figure(self, step: int) -> None:
        """Log the gradient-flow bar plot of the current ``.grad`` (call after backward)."""
        if self.sink is not None:
            from .viz.findings import plot_gradient_flow

            found, _ = self._run([get_check("gradient_flow", live_full=True)], reduce=False)
            self.sink.figure("gradient_flow/layers", plot_gradient_flow(found["gradient_flow"]), step)

    def close(self) -> None:
        """Flush and close TensorBoard files; idempotent."""
        if not self._closed and self.sink is not None:
            self.sink.close()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def inner_model(diag: "TrainingDiagnostics") -> nn.Module:
    return diag.prompted.model if diag.prompted is not None else diag.captioner.model


def _tensorboard(log_dir):
    from .report.tensorboard import TensorBoardSink# imports tensorboard: only when asked for

    return TensorBoardSink(log_dir)

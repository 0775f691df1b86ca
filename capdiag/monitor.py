"""Training-time diagnostics: watch a real training run for image-ignoring decoders.

``TrainingDiagnostics`` is framework-free; the Lightning and Hugging Face callbacks are thin
adapters over it. Every ``every`` steps it measures, on a fixed probe batch, in eval mode,
under ``no_grad`` and without consuming the caller's RNG streams:

* the image-reliance gap (loss with batch-shuffled images, and with zeroed image features,
  minus the true loss; the same ``ablation_losses`` the image_ablation check uses);
* attention entropy (normalized, when attention modules exist);
* drift of modules meant to stay frozen (parameters and BatchNorm running statistics).

After each backward it reads the gradients already in ``.grad`` (no extra backward):
per-part gradient norms and the encoder's share, and NaN/inf events. The central flag:
after ``warmup`` steps, the reliance gap stays below ``min_reliance`` for ``patience``
probes while the training loss keeps falling, or the image path's gradient share collapses.
The action is configurable: "warn" (a ``CapdiagWarning``), "raise" (``ImageIgnoredError``) or
"stop" (``should_stop`` turns True; under DDP on every rank).
"""
from __future__ import annotations

import collections
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .attention import attention_modules, captured_attention, judged_rows, normalized_entropy
from .captioner import Captioner, CaptionSpec
from .errors import CapdiagError, UsageError
from .pretrained import DriftWatcher
from .distributed import clean_name, comm_device, dist_or_none as _dist, is_sharded, local_shard, preserved_sharding
from .probe import param_part
from .state import mode, preserved_rng


class CapdiagWarning(UserWarning):
    """A training-time diagnostic finding."""


class ImageIgnoredError(CapdiagError):
    """Raised (action="raise") when the decoder is judged to ignore the image."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class TrainingDiagnostics:
    """Watch a captioner while it trains.

    Example (plain PyTorch)::

        diag = capdiag.TrainingDiagnostics(model, probe_batch, log_dir="runs/diag", vocab_size=V)
        for step, (images, captions) in enumerate(loader):
            loss = criterion(model(images, captions), captions)
            loss.backward()
            diag.after_backward(step)
            optimizer.step(); optimizer.zero_grad()
            diag.after_step(step, loss)
            if diag.should_stop:
                break
        diag.close()

    Args:
        model: the captioner (DDP-wrapped is fine), called ``model(images, captions)``.
        probe_batch: a fixed ``(images, captions)`` batch on the model's device.
        log_dir: TensorBoard run directory (rank 0 writes; None: no files).
        every: probe cadence in steps (gradient statistics run every ``grad_every`` steps, default the same).
        warmup: steps before the image-ignoring flag may fire.
        min_reliance: reliance gap (relative loss increase with shuffled images) below which a probe counts as blind.
        patience: consecutive blind probes needed to flag.
        action: "warn", "raise" or "stop".
        frozen_modules: dotted names of modules meant to stay frozen (drift watched).
        histograms: also log gradient histograms (expensive: about 2x a step).
        figures, figure_every: log the reliance-history figure every ``figure_every`` probes (a
            matplotlib render costs ~0.1 s, so not at every probe).
        **hints: captioning hints (vocab_size, pad_id, bos_id, eos_id, image_module, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        probe_batch: Sequence[torch.Tensor],
        *,
        log_dir: Optional[str] = None,
        every: int = 100,
        grad_every: Optional[int] = None,
        warmup: int = 200,
        min_reliance: float = 0.05,
        patience: int = 3,
        action: str = "warn",
        frozen_modules: Sequence[str] = (),
        histograms: bool = False,
        figures: bool = True,
        figure_every: int = 10,
        max_history: int = 10_000,
        **hints,
    ):
        if action not in ("warn", "raise", "stop"):
            raise UsageError(f"action must be 'warn', 'raise' or 'stop', got {action!r}")
        if every < 1:
            raise UsageError(f"every must be >= 1, got {every}")
        self.model = model
        inner = _unwrap(model)
        images, captions = probe_batch[0], probe_batch[1]
        if images.shape[0] < 2:
            raise UsageError("probe_batch needs at least 2 images (reliance shuffles them across the batch)")
        spec = CaptionSpec(vocab_size=int(hints.pop("vocab_size", 0) or 0))
        for k, v in hints.items():
            if not hasattr(spec, k):
                raise UsageError(f"unknown hint {k!r} for TrainingDiagnostics")
            setattr(spec, k, v)
        self.captioner = Captioner(inner, spec, name=type(inner).__name__, stateless=True)
        self.images, self.captions = images.detach(), captions.detach()
        if not spec.vocab_size:
            with torch.no_grad(), mode(inner, False), preserved_rng():
                spec.vocab_size = int(self.captioner.logits(self.images[:2], self.captions[:2]).shape[-1])
        if spec.image_module:
            self.captioner.submodule(spec.image_module)
        self.every, self.grad_every = every, grad_every or every
        self.warmup, self.min_reliance, self.patience, self.action = warmup, min_reliance, patience, action
        self.histograms, self.figures, self.figure_every = histograms, figures, max(1, figure_every)
        self.watchers = [DriftWatcher(self.captioner.submodule(n), n) for n in frozen_modules]
        self.has_attention = bool(attention_modules(inner, spec.attention_modules))
        d = _dist()
        self.rank = d.get_rank() if d else 0
        self.writer = None
        if log_dir is not None and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir)
        self.history = collections.defaultdict(lambda: collections.deque(maxlen=max_history))
        self.flags: list = []
        self._stop_local = False
        self.should_stop = False
        self._blind_streak = 0
        self._loss_at_warmup: Optional[float] = None
        self._grad_share_start: Optional[float] = None
        self._last_loss: Optional[float] = None
        self._closed = False
        self._params = None
        self._sharded = False
        self._seg = None

    # ---- after backward: gradients already in .grad ---------------------------------------------
    def after_backward(self, step: int) -> dict:
        """Gradient statistics from ``.grad`` (call after ``loss.backward()``, before ``zero_grad``)."""
        if step % self.grad_every:
            return {}
        if self._params is None:  # names and parts resolved once: this runs on the hot path
            self._params = [(n, p) for n, p in self.captioner.model.named_parameters() if p.requires_grad]
            self._sharded = is_sharded(self.model)
            self._part_names = sorted({self._part(n) for n, _ in self._params})
            self._part_index = [self._part_names.index(self._part(n)) for n, _ in self._params]
        # Sharded gradients (FSDP2 DTensors, FSDP1 flat shards): each rank holds a piece of each
        # gradient, so per-part sums of squares are computed from the local pieces and summed over
        # ranks in one collective; nothing is gathered.
        present = [(i, local_shard(p.grad)) for i, (_, p) in enumerate(self._params) if p.grad is not None]
        present = [(i, g) for i, g in present if g.numel()]
        if not present and not self._sharded:
            return {}
        idx = [i for i, _ in present]
        grads = [g.detach() for _, g in present]
        device = grads[0].device if grads else self._comm_device()
        norms = torch.stack(torch._foreach_norm(grads)).float() if grads else torch.zeros(0, device=device)
        key = (tuple(idx), device)
        if self._seg is None or self._seg[0] != key:  # usually the same parameters have grads every step
            self._seg = (key, torch.tensor([self._part_index[i] for i in idx], dtype=torch.long, device=device))
        seg = self._seg[1]
        sq = torch.zeros(len(self._part_names) + 1, device=device).index_add_(0, seg, norms * norms)
        sq[-1] = (~torch.isfinite(norms)).sum()  # non-finite pieces, reduced with the sums
        if self._sharded:
            sq = sq.to(self._comm_device())
            _dist().all_reduce(sq)
        sq = sq.tolist()  # one device sync per call
        finite = sq.pop() == 0 and all(math.isfinite(v) for v in sq)
        parts = dict(zip(self._part_names, sq))
        out = {f"grad_norm/{k}": math.sqrt(v) for k, v in parts.items()}
        img = parts.get("encoder", 0.0) + parts.get("projection", 0.0)
        txt = sum(v for k, v in parts.items() if k not in ("encoder", "projection"))
        if img and txt and math.isfinite(img) and math.isfinite(txt):
            share = math.sqrt(img) / (math.sqrt(img) + math.sqrt(txt))
            out["grad_share/image_path"] = share
            if self._grad_share_start is None:
                self._grad_share_start = share
            elif step >= self.warmup and share < 1e-3 * self._grad_share_start:
                self._flag(step, f"the image path's gradient share fell from {self._grad_share_start:.2g} to {share:.2g}: "
                                 "the encoder has stopped learning")
        if not finite:
            bad = [self._params[i][0] for i, v in zip(idx, norms.tolist()) if not math.isfinite(v)]
            where = f"{len(bad)} parameters, first {bad[0]}" if bad else "another rank's shards"
            self._flag(step, f"non-finite gradients in {where}", kind="nonfinite")
        self._log(step, out)
        if self.writer is not None and self.histograms:
            for i, g in zip(idx, grads):
                self.writer.add_histogram(f"capdiag/grad/{self._params[i][0]}", g.float().cpu(), step)
        return out

    def _part(self, name: str) -> str:
        name = clean_name(name)
        im = self.captioner.spec.image_module
        if im and (name == im or name.startswith(im + ".")):
            return "encoder"
        return param_part(name)

    # ---- after the optimizer step: probes ------------------------------------------------------
    def after_step(self, step: int, loss: Optional[float] = None) -> dict:
        """Record the loss and, every ``every`` steps, probe image reliance, attention and drift."""
        if loss is not None:
            value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            self._last_loss = value
            if not math.isfinite(value):
                self._flag(step, f"training loss is {value}", kind="nonfinite")
        out = {}
        if step % self.every == 0:
            out = self.probe()
            out = self._reduce(out)
            if self._last_loss is not None:
                out["train_loss"] = self._last_loss
            moved = [w.drift() for w in self.watchers]  # this rank's shards
            worst = self._reduce([max(m.values()) if m else 0.0 for m in moved], op="max")
            for w, m, v in zip(self.watchers, moved, worst):
                out[f"drift/{w.name}"] = v
                if v > 0:
                    example = f" (e.g. {next(iter(m))})" if m else ""
                    self._flag(step, f"frozen module {w.name!r} changed by up to {v:.2g} (relative){example}; "
                                     "BatchNorm running stats update in train mode unless the module is kept in eval()",
                               kind="drift", once=True)
            self._judge(step, out)
            self._log(step, out)
        # Agreeing on a stop is a collective: only at steps that probe or read gradients (where flags
        # are raised), not every step, so the hot path makes no blocking call.
        if step % self.every == 0 or step % self.grad_every == 0 or _dist() is None:
            self._sync_stop()
        return out

    @torch.no_grad()
    def probe(self) -> dict:
        """Reliance gaps (and attention entropy) on the probe batch; eval mode, RNG untouched."""
        from capdiag.checks.image_ablation import ablation_losses

        cap = self.captioner
        kinds = ("shuffled_images", "zeroed_features") if cap.spec.image_module else ("shuffled_images",)
        records: dict = {}
        watch = (lambda: captured_attention(cap.model, cap.spec.attention_modules)) \
            if self.has_attention else None
        with preserved_rng(), preserved_sharding(self.model):
            losses = ablation_losses(cap, self.images, self.captions, seed=0, kinds=kinds, watch_true=watch, records=records)
        true = losses["true"]
        out = {"probe_loss": true}
        for k in kinds:
            if k in losses:
                out[f"reliance/{k}"] = (losses[k] - true) / max(true, 1e-8)
        ents = []
        for rec in records.get("attention", {}).values():
            if rec.weights:
                rows = judged_rows(rec)
                if rows.shape[-1] > 1:
                    ents.append(float(normalized_entropy(rows).mean()))
        if ents:
            out["attention_entropy"] = sum(ents) / len(ents)
        return out

    def _judge(self, step: int, out: dict) -> None:
        gap = out.get("reliance/shuffled_images")
        if gap is None or step < self.warmup:
            if step >= self.warmup and self._loss_at_warmup is None:
                self._loss_at_warmup = self._last_loss
            return
        if self._loss_at_warmup is None:
            self._loss_at_warmup = self._last_loss
        self._blind_streak = self._blind_streak + 1 if gap < self.min_reliance else 0
        falling = self._last_loss is not None and self._loss_at_warmup is not None and self._last_loss < self._loss_at_warmup
        if self._blind_streak >= self.patience and (falling or self._blind_streak >= 2 * self.patience):
            self._flag(step, f"image-ignoring decoder: shuffling the probe images raises the loss by only {gap:.1%} "
                             f"for {self._blind_streak} probes in a row while the training loss "
                             f"{'keeps falling' if falling else 'stalls'} ({self._last_loss:.3f}). Likely causes: a "
                             "pretrained encoder clobbered by a custom init, detached or zeroed features, a dead ReLU "
                             "on the projection, features scaled to nothing.", once=True)

    def _flag(self, step: int, message: str, kind: str = "image_ignored", once: bool = False) -> None:
        if once and any(f[1] == kind for f in self.flags):
            return
        self.flags.append((step, kind, message))
        if self.writer is not None:
            self.writer.add_text(f"capdiag/flags/{kind}", f"step {step}: {message}", step)
        if self.action == "raise" and kind == "image_ignored":
            raise ImageIgnoredError(f"step {step}: {message}")
        if self.action == "stop" and kind in ("image_ignored", "nonfinite"):
            self._stop_local = True
        if self.rank == 0:
            warnings.warn(f"capdiag (step {step}): {message}", CapdiagWarning, stacklevel=3)

    # ---- distributed -----------------------------------------------------------------------------
    def _reduce(self, metrics, op: str = "mean"):
        """Average (or take the max of) metrics over ranks, in one collective: a dict of probe metrics
        (each rank probed its own batch or replica) or a list of values (drift of local shards)."""
        d = _dist()
        if d is None or not metrics:
            return metrics
        keys = sorted(metrics) if isinstance(metrics, dict) else range(len(metrics))
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self._comm_device())
        d.all_reduce(t, op=d.ReduceOp.MAX if op == "max" else d.ReduceOp.SUM)
        if op == "mean":
            t /= d.get_world_size()
        return dict(zip(keys, t.tolist())) if isinstance(metrics, dict) else t.tolist()

    def _sync_stop(self) -> None:
        d = _dist()
        if d is None:
            self.should_stop = self._stop_local
            return
        t = torch.tensor([1.0 if self._stop_local else 0.0], device=self._comm_device())
        d.all_reduce(t, op=d.ReduceOp.MAX)
        self.should_stop = bool(t.item() > 0)

    def _comm_device(self):
        return comm_device()

    # ---- output ----------------------------------------------------------------------------------
    def _log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.history[k].append((step, v))
        if self.writer is None:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(f"capdiag/{k}", v, step)
        if self.figures and "reliance/shuffled_images" in metrics and len(self.history["reliance/shuffled_images"]) % self.figure_every == 0:
            self._figures(step)

    def _figures(self, step: int) -> None:
        from .viz.plots import _figure

        fig = _figure(6, 3.5)
        ax = fig.add_subplot()
        xs, ys = zip(*self.history["reliance/shuffled_images"])
        ax.plot(xs, ys, marker="o", label="shuffled images")
        if self.history.get("reliance/zeroed_features"):
            xz, yz = zip(*self.history["reliance/zeroed_features"])
            ax.plot(xz, yz, marker="s", label="zeroed features")
        ax.axhline(self.min_reliance, color="tab:red", ls="--", label="flag threshold")
        ax.set_xlabel("step")
        ax.set_ylabel("relative loss increase")
        ax.set_title("image reliance on the probe batch")
        ax.legend(fontsize=8)
        self.writer.add_figure("capdiag/reliance_history", fig, step)

    def add_gradient_flow_figure(self, step: int) -> None:
        """Log the gradient-flow bar plot of the current ``.grad`` (call after backward)."""
        if self.writer is None:
            return
        from capdiag.checks.gradient_flow import by_layer

        from .viz.plots import plot_gradient_flow

        rows = []
        for n, p in self.captioner.model.named_parameters():
            if not p.requires_grad:
                continue
            g = p.grad
            if g is None:
                rows.append({"name": n, "part": self._part(n), "numel": p.numel(), "mean_abs": 0.0, "max_abs": 0.0, "flag": "none"})
            else:
                g = g.detach().float()
                rows.append({"name": n, "part": self._part(n), "numel": p.numel(), "mean_abs": float(g.abs().mean()),
                             "max_abs": float(g.abs().max()), "flag": "" if bool(g.any()) else "zero"})
        layers = by_layer(rows)
        fig = plot_gradient_flow([L["name"] for L in layers], [L["mean_abs"] for L in layers], [L["max_abs"] for L in layers],
                                 [L["flag"] for L in layers], [L["part"] for L in layers], f"gradient flow at step {step}")
        self.writer.add_figure("capdiag/gradient_flow", fig, step)

    def close(self) -> None:
        """Flush and close TensorBoard files; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

"""The single-batch fit: train a deep copy of a captioner with Adam on one fixed batch until a named stop
rule fires. The rules and why each is as it is (the measurements behind them) are in
``docs/fitting.md``; ``capdiag.measure.training`` says what to fit (the ``Recipe``) and judges the copy.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..captioner import Captioner
from ..intake.data import empirical_blind_floor
from ..state import in_mode, seeded
from .optim import Adam


@dataclass
class FitResult:
    captioner: Captioner  # the trained copy
    losses: list = field(default_factory=list)  # train-mode loss per step
    lr: float = 1e-3
    interrupted: bool = False
    diverged: bool = False
    budget_steps: int = 0  # the steps allowed (the recipe's, or fewer when the time budget cut them)
    time_limited: bool = False  # the time budget cut the step budget and the loop used all of it
    seconds_per_step: float = float("nan")
    eval_loss: Optional[float] = None  # the eval-mode loss the memorized stop measured last (model unchanged since)
    abandoned_steps: int = 0  # steps of a start at a larger rate given up for a restart at ``lr`` (not in losses)
    images: Optional[torch.Tensor] = None  # the batch trained on when the loop shrank it (None: the one given)
    captions: Optional[torch.Tensor] = None

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def recent_loss(self) -> float:
        """Best train-mode loss of the last 10 steps (inf before any step)."""
        return min(self.losses[-10:]) if self.losses else float("inf")


def copy_captioner(cap: Captioner) -> Captioner:
    return cap.with_model(copy.deepcopy(cap.model))


SLOW = 0.85  # a start rate that improves the best loss by less than 15 % in 10 steps is dropped


START_WINDOW = 40  # ... within its first steps; later plateaus (at the caption prior, before the image is


def _plateaued(losses: list, patience: int, floor: Optional[float] = None) -> bool:
    """No 2 % improvement in ``patience`` steps, while still far from memorized (a model already
    well below the image-blind floor is converging, however slowly, and keeps training)."""
    if not patience or len(losses) < 2 * patience:
        return False
    if floor is not None and min(losses) < 0.5 * floor:
        return False
    return min(losses[-patience:]) > 0.98 * min(losses[:-patience])


def _at_floor(losses: list, floor: Optional[float], n: int) -> bool:
    if floor is None or not n or len(losses) < n:
        return False
    return all(abs(v - floor) < 0.05 * floor for v in losses[-n:])


@torch.no_grad()
def eval_loss(cap: Captioner, images: torch.Tensor, captions: torch.Tensor, seed: int = 0) -> float:
    with seeded(seed), in_mode(cap.model, False):
        return float(cap.loss(images, captions))


# ---- stop rules: the verdict is certain, or more steps only cost time ---------------------------------
def memorized(loss: float, stop_loss: float) -> bool:
    """The train-mode loss reached ``stop_loss``."""
    return loss < stop_loss


def hopeless(losses: list, patience: int, floor: Optional[float]) -> bool:
    """A plateau far from memorized, or ``patience // 2`` steps at the image-blind floor."""
    return _plateaued(losses, patience, floor) or _at_floor(losses, floor, patience // 2)


# ---- restart rule: a larger start rate that does not pay off is given up --------------------------------
def slow_start(losses: list, step: int, rate: float, lr: float) -> bool:
    """Within ``START_WINDOW`` steps at a rate above ``lr``, the best loss of the last 10 steps is above
    ``SLOW`` times the best before them."""
    return rate > lr and 20 <= step <= START_WINDOW and step % 10 == 0 and min(losses[-10:]) > SLOW * min(losses[:-10])


class _Fit:
    """One fit in progress: the copy, its optimizer and the result so far."""

    def __init__(self, cap: Captioner, images, captions, steps: int, lr: float, start_lr: Optional[float]):
        self.cap, self.images, self.captions, self.lr = cap, images, captions, lr
        self.twin = copy_captioner(cap)
        self.result = FitResult(self.twin, lr=lr, budget_steps=steps)  # lr: the rate the copy ends with
        self.params = [p for p in self.twin.model.parameters() if p.requires_grad]
        self.opt = Adam(self.params, lr=start_lr or lr) if self.params else None
        self.twin.model.train()  # our own copy: its BatchNorm statistics must keep what training taught them

    def step(self) -> float:
        self.opt.zero_grad()
        loss = self.twin.loss(self.images, self.captions)
        value = float(loss.detach())
        self.result.losses.append(value)
        if math.isfinite(value):
            loss.backward()
            self.opt.step()
        return value

    def restart(self, step: int) -> None:
        """Start again from the model's weights at the given rate, within the same total budget
        (continuing from where the large steps led trains GPT-2 decoders 2-4x slower)."""
        r = self.result
        r.abandoned_steps += step
        r.budget_steps = max(30, r.budget_steps - step)
        self.twin = r.captioner = copy_captioner(self.cap)
        self.params = [p for p in self.twin.model.parameters() if p.requires_grad]
        self.opt = Adam(self.params, lr=self.lr)
        self.twin.model.train()
        r.losses.clear()


class _Clock:
    """The time budget: steps 1-3 are timed (again after the batch shrinks); a fit too slow for its steps
    first trains on ``min_batch`` samples, then gets the steps that fit."""

    def __init__(self, steps: int, time_budget: Optional[float], min_batch: Optional[int]):
        self.steps, self.budget, self.min_batch = steps, time_budget, min_batch
        self.started, self.measure_at = time.perf_counter(), 4

    def check(self, fit: _Fit, step: int, floor: Optional[float]) -> tuple:
        """``(floor, restart)``: the floor of a shrunk batch; whether the start rate must go at once."""
        r = fit.result
        if step != self.measure_at or r.abandoned_steps:
            return floor, False
        now = time.perf_counter()
        r.seconds_per_step = (now - self.started) / 3
        if self.budget is None or r.seconds_per_step * self.steps <= self.budget:
            return floor, False
        if self.min_batch and fit.images.shape[0] > self.min_batch:  # half the batch buys twice the steps
            fit.images, fit.captions = r.images, r.captions = fit.images[:self.min_batch], fit.captions[:self.min_batch]
            if floor is not None:
                floor = empirical_blind_floor(fit.captions.cpu(), fit.twin.target_mask(fit.captions).cpu())
            self.measure_at, self.started = step + 3, now
            return floor, False
        r.budget_steps = max(30, int(self.budget / r.seconds_per_step))
        return floor, fit.opt.lr > fit.lr  # no second chance fits the budget: the given rate from the start


def fit_copy(cap: Captioner, images: torch.Tensor, captions: torch.Tensor, steps: int, lr: float = 1e-3, seed: int = 0,
             stop_loss: float = 0.005, progress: bool = False, desc: str = "overfit", patience: int = 100,
             floor: Optional[float] = None, eval_stop: Optional[float] = None, time_budget: Optional[float] = None,
             start_lr: Optional[float] = None, min_batch: Optional[int] = None) -> FitResult:
    """Train a deep copy of ``cap`` with Adam on one fixed batch, at ``start_lr`` first when given, for at
    most ``steps`` steps. Stops when ``memorized`` (train loss below ``stop_loss``), ``hopeless`` (a
    plateau, or at the image-blind ``floor``), or, once the train loss is below ``eval_stop``, when the
    eval-mode loss (measured every 10 steps) is too. ``slow_start`` restarts at ``lr``; ``time_budget``
    (seconds) shrinks the batch to ``min_batch`` or cuts the steps (``_Clock``). Ctrl-C returns the
    partial result with ``interrupted=True``. The rules' measurements: ``docs/fitting.md``."""
    fit = _Fit(cap, images, captions, steps, lr, start_lr)
    r = fit.result
    if fit.opt is None:
        return r
    clock, bar = _Clock(steps, time_budget, min_batch), _progress_bar(progress, steps, desc)
    with seeded(seed):
        try:
            step = 0
            while step < r.budget_steps:
                step += 1
                floor, restart = clock.check(fit, step, floor)
                value = fit.step()
                if not math.isfinite(value):
                    r.diverged = True
                    break
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}")
                if memorized(value, stop_loss) or hopeless(r.losses, patience, floor):
                    break
                if restart or slow_start(r.losses, step, fit.opt.lr, lr):
                    fit.restart(step)
                    step = 0
                    continue
                if eval_stop is not None and value < eval_stop and step % 10 == 0:
                    r.eval_loss = eval_loss(fit.twin, fit.images, fit.captions, seed)
                    if r.eval_loss < eval_stop:
                        break
                    r.eval_loss = None  # training goes on: it no longer describes the copy
        except KeyboardInterrupt:
            r.interrupted = True
        finally:
            if bar is not None:
                bar.close()
    r.time_limited = r.budget_steps < steps and r.steps >= r.budget_steps
    r.lr = fit.opt.lr
    return r


def _progress_bar(progress: bool, steps: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True)

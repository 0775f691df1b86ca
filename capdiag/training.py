"""Training a *copy* of the user's captioner (the caller's weights are never touched).

Used by the overfit check and by checks that need a model which has learned something
(image ablation, attention, attribution on an untrained model).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .captioner import Captioner
from .data import empirical_blind_floor
from .optim import Adam
from .state import in_mode, seeded


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


def fit_copy(
    cap: Captioner,
    images: torch.Tensor,
    captions: torch.Tensor,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    stop_loss: float = 0.005,
    progress: bool = False,
    desc: str = "overfit",
    patience: int = 100,
    floor: Optional[float] = None,
    eval_stop: Optional[float] = None,
    time_budget: Optional[float] = None,
    start_lr: Optional[float] = None,
    min_batch: Optional[int] = None,
) -> FitResult:
    """Train a deep copy with Adam on one fixed batch; stop early at ``stop_loss``, or on a
    plateau: no 2 % improvement of the best loss within ``patience`` steps (a model that
    cannot see the image sits at its floor; more steps only cost time). With the batch's
    image-blind ``floor`` given, ``patience // 2`` consecutive steps within 5 % of it also stop:
    a model that reads the image passes through that level in a few steps.

    ``eval_stop``: once the train-mode loss is below it, the eval-mode loss is measured every 10
    steps, and the loop stops as soon as that is below it too: memorized, the verdict is certain.
    ``time_budget``: seconds the loop may take; after 3 steps the step budget shrinks to what fits
    (at least 30 steps), so a large model on CPU gets an answer in minutes and says which budget.
    ``min_batch``: before cutting the step budget, a batch larger than this is cut to its first
    ``min_batch`` samples (``result.images``/``captions``): half the batch buys twice the steps, and
    memorizing 8 captions says as much about the model as memorizing 16.
    ``start_lr``: a larger rate to begin with. A slow stretch within the first ``START_WINDOW``
    steps (the best loss of 10 steps above ``SLOW`` times the best before them) restarts training
    from the model's weights at ``lr``; a rate that passes the window is kept. A model too slow for
    its step budget restarts at ``lr`` at once (no second run fits its budget), and ``fit_recipe``
    trains again at ``lr`` when a kept start rate did not memorize in train mode: no verdict rests on the larger
    rate, which can also kill an image path (dual_transfer on 8 captions: dead at 3e-3, memorized
    in 60 steps at 1e-3). CNN and small
    recurrent captioners memorize 1.5-3x faster at 3e-3 than at 1e-3, while GPT-2-style decoders
    stall at 3e-3 within 40 steps (and continuing from there at 1e-3 is 2-4x slower than a restart).

    Ctrl-C stops the loop and returns the partial result with ``interrupted=True``.
    """
    import time

    twin = copy_captioner(cap)
    params = [p for p in twin.model.parameters() if p.requires_grad]
    result = FitResult(twin, lr=lr, budget_steps=steps)  # lr: the rate the copy ends with
    if not params:
        return result
    opt = Adam(params, lr=start_lr or lr)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    twin.model.train()  # our own copy: its BatchNorm statistics must keep what training taught them
    started = time.perf_counter()
    measure_at = 4  # steps 1-3 are timed; again after the batch shrinks
    restart = False  # set when the start rate is given up for the given one
    with seeded(seed):
        try:
            step = 0
            while step < result.budget_steps:
                step += 1
                if step == measure_at and not result.abandoned_steps:
                    now = time.perf_counter()
                    result.seconds_per_step = (now - started) / 3
                    if time_budget is not None and result.seconds_per_step * steps > time_budget:
                        if min_batch and images.shape[0] > min_batch:
                            images, captions = result.images, result.captions = images[:min_batch], captions[:min_batch]
                            if floor is not None:
                                floor = empirical_blind_floor(captions.cpu(), twin.target_mask(captions).cpu())
                            measure_at, started = step + 3, now
                        else:
                            result.budget_steps = max(30, int(time_budget / result.seconds_per_step))
                            if opt.lr > lr:  # no second chance fits the budget: the given rate from the start
                                restart = True
                opt.zero_grad()
                loss = twin.loss(images, captions)
                value = float(loss.detach())
                result.losses.append(value)
                if not math.isfinite(value):
                    result.diverged = True
                    break
                loss.backward()
                opt.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}")
                if value < stop_loss or _plateaued(result.losses, patience, floor) or _at_floor(result.losses, floor, patience // 2):
                    break
                if restart or (opt.lr > lr and 20 <= step <= START_WINDOW and step % 10 == 0 and
                               min(result.losses[-10:]) > SLOW * min(result.losses[:-10])):
                    restart = False
                    # Slow at the larger rate: start again from the model's weights at the given rate
                    # (continuing from where the large steps led trains GPT-2 decoders 2-4x slower).
                    result.abandoned_steps += step
                    result.budget_steps = max(30, result.budget_steps - step)  # the same total budget
                    twin = result.captioner = copy_captioner(cap)
                    params = [p for p in twin.model.parameters() if p.requires_grad]
                    opt = Adam(params, lr=lr)
                    twin.model.train()
                    result.losses.clear()
                    step = 0
                    continue
                if eval_stop is not None and value < eval_stop and step % 10 == 0:
                    result.eval_loss = eval_loss(twin, images, captions, seed)
                    if result.eval_loss < eval_stop:
                        break
                    result.eval_loss = None  # training goes on: it no longer describes the copy
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            if bar is not None:
                bar.close()
    result.time_limited = result.budget_steps < steps and result.steps >= result.budget_steps
    result.lr = opt.lr
    return result


SLOW = 0.85  # a start rate that improves the best loss by less than 15 % in 10 steps is dropped
START_WINDOW = 40  # ... within its first steps; later plateaus (at the caption prior, before the image is
# used) are a normal phase of learning, and a rate that got that far is kept


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



def overfit_batch(s, batch_size: int = 16):
    """A balanced synthetic batch (captions share prefixes, differ only in what the image
    shows) when capdiag can make one for this vocabulary, else the subject's own batch."""
    if s.data is not None:
        images, captions = s.data.batch(batch_size, seed=s.seed + 100, balanced=True)
        return s.captioner.to_inputs(images, captions)
    return s.images, s.captions


@dataclass(frozen=True)
class Recipe:
    """How capdiag teaches a copy of an untrained model one batch (the single-batch overfit).

    Adam at ``lr`` for at most ``steps`` steps on ``overfit_batch(batch_size)`` in train mode,
    stopping at ``stop_loss`` or on a plateau (see ``fit_copy``). BatchNorm: when train mode
    memorized the batch (loss below ``pass_loss`` or a fifth of the image-blind floor) but eval
    mode did not, and the statistics matched the weights at the start (log variance ratio below
    ``bn_mismatch``), the copy's running statistics are re-estimated on the batch: they lagged the
    fast training, an artifact of the test. Statistics already off at the start are the model's
    problem and are left as they are.

    Budget: it stops as soon as the verdict is certain (eval-mode loss below ``pass_loss``,
    or stuck at the image-blind floor), and a model too slow for ``steps`` steps in
    ``time_budget`` seconds gets the steps that fit (``Fitted.fit.time_limited`` says so).
    """

    steps: int = 500
    lr: float = 1e-3
    start_lr: Optional[float] = 3e-3  # begun with while progress is fast (see fit_copy); None: lr throughout
    batch_size: int = 16
    min_batch: Optional[int] = 8  # a model too slow for the step budget trains on this many (None: never cut)
    pass_loss: float = 0.05
    bn_mismatch: float = 1.0
    time_budget: Optional[float] = 120.0  # seconds for the training loop (None: the step budget alone)

    @property
    def stop_loss(self) -> float:
        return self.pass_loss / 10

    def low(self, loss: float, floor: float) -> bool:
        """Memorized by the loss: near zero or, for big vocabularies that converge slowly, a fifth
        of the image-blind floor."""
        return math.isfinite(loss) and (loss < self.pass_loss or loss < 0.2 * floor)


RECIPE = Recipe()


@dataclass
class Fitted:
    """A copy trained by a ``Recipe`` on one batch, as every check that needs a learned model sees it."""

    fit: FitResult
    images: torch.Tensor
    captions: torch.Tensor
    floor: float  # the batch's image-blind floor (nats/token)
    final_loss: float  # eval-mode loss after training (and BatchNorm re-estimation, if any)
    bn_metrics: dict = field(default_factory=dict)
    bn_note: str = ""

    @property
    def captioner(self) -> Captioner:
        return self.fit.captioner


def _trained_on(fit: FitResult, images, captions, floor: float, cap: Captioner) -> tuple:
    """``(images, captions, floor)`` of the batch the loop trained on (it may have cut the batch)."""
    if fit.images is None:
        return images, captions, floor
    return fit.images, fit.captions, empirical_blind_floor(fit.captions.cpu(), cap.target_mask(fit.captions).cpu())


def fit_recipe(s, recipe: Recipe = RECIPE) -> Fitted:
    """Train a copy of ``s.captioner`` by ``recipe`` (uncached; ``Subject.fitted`` caches the default)."""
    from . import batchnorm

    cap = s.captioner
    images, captions = overfit_batch(s, recipe.batch_size)
    floor = empirical_blind_floor(captions.cpu(), cap.target_mask(captions).cpu())
    fit = fit_copy(cap, images, captions, recipe.steps, recipe.lr, s.seed, recipe.stop_loss, s.progress,
                   "overfit", floor=floor, eval_stop=recipe.pass_loss, time_budget=recipe.time_budget,
                   start_lr=recipe.start_lr, min_batch=recipe.min_batch)
    if fit.lr > recipe.lr and not fit.interrupted and \
            not recipe.low(fit.recent_loss, _trained_on(fit, images, captions, floor, cap)[2]):
        # The start rate was kept but even train mode did not memorize: a large rate can also kill an
        # image path (dead ReLUs in an adapter: the copy then sits at the caption prior). No verdict
        # rests on it: the copy is trained again, at the recipe's rate only, as capdiag always did.
        # (Train mode memorized but eval mode not is a mode problem the rate has nothing to do with.)
        again = fit_copy(cap, images, captions, recipe.steps, recipe.lr, s.seed, recipe.stop_loss, s.progress,
                         "overfit", floor=floor, eval_stop=recipe.pass_loss, time_budget=recipe.time_budget,
                         min_batch=recipe.min_batch)
        again.abandoned_steps += fit.steps + fit.abandoned_steps
        fit = again
    images, captions, floor = _trained_on(fit, images, captions, floor, cap)  # judge what the copy trained on
    if fit.diverged:
        final = float("nan")
    else:
        final = fit.eval_loss if fit.eval_loss is not None else eval_loss(fit.captioner, images, captions, s.seed)
    out = Fitted(fit, images, captions, floor, final)
    lagging = (not fit.diverged and not recipe.low(final, floor) and recipe.low(fit.recent_loss, floor)
               and batchnorm.tracking_batchnorms(fit.captioner.model))
    if not lagging:
        return out
    mismatch = batchnorm.stats_mismatch(cap, images, captions, s.seed)
    out.bn_metrics["eval_loss_stale_bn"] = final
    if mismatch is not None:
        out.bn_metrics["bn_log_var_mismatch_at_init"] = mismatch
        if mismatch > recipe.bn_mismatch:
            return out  # stale at init: the model's own problem (the overfit check diagnoses it)
    recal = copy_captioner(fit.captioner)
    batchnorm.recalibrate(recal, images, captions, s.seed)
    out.final_loss = out.bn_metrics["eval_loss_bn_recalibrated"] = eval_loss(recal, images, captions, s.seed)
    fit.captioner = recal
    out.bn_note = (f"; eval mode after re-estimating BatchNorm statistics on the batch (they lagged the "
                   f"fast single-batch training: eval loss {final:.3f} before)")
    return out


@dataclass
class Learned:
    """A captioner that has learned something, and the batch to judge it on."""

    captioner: Captioner
    images: torch.Tensor
    captions: torch.Tensor
    source: str  # said in summaries: which model the verdict is about
    decode: Any = None  # token ids -> words of this batch's vocabulary (for plots and summaries)
    loss: Optional[float] = None  # a fitted copy's eval-mode loss after training (None: the model as given)
    floor: Optional[float] = None  # the image-blind floor of the batch it trained on
    steps: int = 0  # the steps the copy trained
    train_loss: Optional[float] = None  # the copy's train-mode loss at the end of training

    def __iter__(self):  # cap, images, captions, source = s.learned()
        return iter((self.captioner, self.images, self.captions, self.source))

    @property
    def unlearned(self) -> bool:
        """A fitted copy that did not even learn the caption prior: its loss stayed above the image-blind
        floor by a quarter (or is not finite). What it does with the image says nothing about the model,
        so no check may rest a verdict on it (a slow learner, e.g. dropout 0.5, needs more steps)."""
        if self.loss is None or self.floor is None:
            return False
        # Learned in either mode: a copy that memorized in train mode but not in eval mode did learn; its
        # eval-mode gap is a finding of its own (overfit's train/eval diagnosis: the forum case).
        best = min(self.loss, self.train_loss) if self.train_loss is not None else self.loss
        return not math.isfinite(best) or best > UNLEARNED_OVER_FLOOR * self.floor

    def inconclusive(self) -> str:
        """The WARN summary of a check that will not judge an unlearned copy, with what would settle it."""
        steps = max(2000, 4 * self.steps)
        return (f"inconclusive: {self.source} reached only loss {self.loss:.3f} in {self.steps} steps, above the batch's "
                f"image-blind floor {self.floor:.3f}, so it has not learned enough to judge; run "
                f"`capdiag overfit --steps {steps}` to settle it")


UNLEARNED_OVER_FLOOR = 1.25  # overfit's "does not learn the caption prior" level, the same number


def is_trained(s) -> bool:
    """The model as given already predicts its batch well below chance (a trained checkpoint)."""
    return s.measured("is_trained", lambda: eval_loss(s.captioner, s.images, s.captions, s.seed)
                      < 0.5 * math.log(s.captioner.spec.vocab_size))

"""Training a *copy* of the user's captioner (the caller's weights are never touched).

Used by the overfit check and by checks that need a model which has learned something
(image ablation, attention, attribution on an untrained model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..captioner import Captioner
from ..intake.data import empirical_blind_floor
from .fitting import FitResult, copy_captioner, eval_loss, fit_copy



# used) are a normal phase of learning, and a rate that got that far is kept


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

    def __iter__(self):  # cap, images, captions, source = learned_of(s)
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


def fitted_of(s):
    """The copy of the subject's model trained on one batch by its ``recipe`` (trained on first use,
    then shared by every check of this subject through ``Subject.measured``). Never for a ``live``
    subject."""
    if s.live:
        raise RuntimeError("a live subject (a model in training) is judged as it is; it has no fitted copy")
    return s.measured("fitted", lambda: fit_recipe(s, s.recipe or RECIPE))


def learned_of(s) -> Learned:
    """What a check that needs a model which has learned something judges: the model as given when it
    is live or already trained (loss well below ln V), else ``fitted_of(s)``. Unpacks as ``cap, images,
    captions, source``."""
    if s.live:
        return Learned(s.captioner, s.images, s.captions, "the model in training", s.decode)
    if is_trained(s):
        return Learned(s.captioner, s.images, s.captions, "the model as given (already trained)", s.decode)
    f = fitted_of(s)
    batch = "one synthetic batch" if s.data is not None else "the given batch"  # see overfit_batch
    return Learned(f.captioner, f.images, f.captions, f"a copy overfit on {batch}", s.fitted_decode,
                   f.final_loss, f.floor, f.fit.steps + f.fit.abandoned_steps, f.fit.recent_loss)

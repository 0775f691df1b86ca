"""overfit: a correct captioner memorizes one small batch (Karpathy's first sanity check).

A copy of the model (never the caller's weights) trains on one fixed batch whose captions
share prefixes and differ only in what the image shows, so an image-blind model cannot fit
it: its loss plateaus at the batch's image-blind floor. Pass = loss near zero and greedy
decoding reproduces the captions. On a plateau, a short learning-rate sweep separates "the
learning rate is off" from "this model cannot fit", and the plateau is compared with the
floor to diagnose "cannot see the image".

BatchNorm: hard single-batch training moves a pretrained encoder's weights faster than its
running statistics follow (momentum 0.01-0.1), so eval mode can miss a batch that train mode
memorized in a perfectly correct model. When that happens and the statistics matched the weights
at the start (see ``capdiag.measure.batchnorm``), the copy's statistics are re-estimated on the batch and
eval mode is judged again. Statistics that were already off at the start (pretrained statistics
under overwritten weights: the forum case) are the model's problem and are reported as such.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from capdiag.measure.ablation import generated
from capdiag.measure.agreement import Agreement, agreement, sequence_logprob, subject_noise_floor
from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import where_image_dies, where_probabilities
from capdiag.measure.metrics import bleu4, exact_match
from capdiag.registry import register_check
from capdiag.measure.fitting import eval_loss, fit_copy
from capdiag.measure.training import RECIPE, fit_recipe, fitted_of


def reproduced(exact_match: float, n: int, min_exact_match: float) -> bool:
    """Greedy decoding reproduces the memorized captions: at least ``min_exact_match`` of them, or all
    but one of 8 or more. One caption off at a loss below the pass level is a near tie of greedy
    decoding, not a decoding bug (which misses most captions); with the 8 captions a slow model
    trains on, the 90 % bar alone would fail it for that one caption."""
    misses = round((1 - exact_match) * n)
    return exact_match >= min_exact_match or (misses == 1 and n >= 8)


@dataclass
class Misses:
    """Captions generate() did not reproduce at a low loss, each judged against the forward."""

    agreement: Any
    n_misses: int
    n_unexplained: int
    n_ties: int

    @property
    def explained(self) -> bool:
        return self.n_unexplained == 0

    @property
    def metrics(self) -> dict:
        return {"n_captions_missed": self.n_misses, "n_misses_unexplained": self.n_unexplained,
                "decoding_noise_floor": self.agreement.noise, "n_near_ties": self.n_ties}

    @property
    def note(self) -> str:
        if not self.n_misses:
            return ""
        return (f"; {self.n_misses} caption(s) differ where generate() follows the forward's own choice "
                f"({self.n_ties} near tie(s) within the noise floor {self.agreement.noise:.1g}): memorization is "
                "judged by the loss")


def misses_explained(s, cap, images, captions, ids, refs, hyps) -> Misses:
    """A caption missed at a low loss is a decoding problem only when generate() departs from the
    teacher-forced forward beyond the noise floor (``capdiag.measure.agreement``): at the first diverging step
    a greedy decoder that takes the forward's argmax, or one of two words within noise of each other,
    is right, and so is a search that finds a caption the forward scores at least as high as the
    reference. Otherwise a near tie, not a bug, would decide the verdict."""
    noise = subject_noise_floor(s, cap, images, captions)
    missed = [i for i, (r, h) in enumerate(zip(refs, hyps)) if r != h]
    if ids.shape[1] < 2:  # generate() returned nothing after BOS: every miss is its own
        empty = Agreement(0, 0, 0, noise, torch.zeros(len(refs), 0), torch.ones(len(refs), dtype=torch.bool))
        return Misses(empty, len(missed), len(missed), 0)
    agr = agreement(cap, images, ids, s.seed, noise)
    gen_lp = agr.total  # the forward's score of each generated caption, from the pass agreement() ran
    ref_lp = sequence_logprob(cap, images, captions, s.seed)
    unexplained = [i for i in missed if bool(agr.disagrees[i])
                   and float(gen_lp[i]) < float(ref_lp[i]) - noise * max(len(refs[i]), 1)]
    ties = int(((agr.margins > 0) & (agr.margins <= noise)).sum())
    return Misses(agr, len(missed), len(unexplained), ties)


def _restart_note(fit, recipe) -> str:
    """Says when the copy gave up its larger start rate and began again (see training.fit_copy)."""
    if not fit.abandoned_steps:
        return f" at lr {fit.lr:g}"
    return f" at lr {fit.lr:g} (after {fit.abandoned_steps} steps at {recipe.start_lr:g}, too slow, were given up)"


@register_check
@dataclass
class Overfit(Check):
    name = "overfit"
    catches = "a model that cannot memorize one batch (image-blind, broken wiring, bad learning rate)"
    cheap = False
    # None: the subject's recipe (training.RECIPE unless set). Given knobs train a copy of their own;
    # without them overfit judges the very copy every other check that needs a learned model judges.
    steps: Optional[int] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    min_exact_match: float = 0.9
    sweep_steps: int = 150

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be >= 1")

    def run(self, s: Subject):
        cap = s.captioner
        shared = s.recipe or RECIPE
        knobs = {k: v for k, v in (("steps", self.steps), ("lr", self.lr), ("batch_size", self.batch_size)) if v is not None}
        if self.lr is not None:
            knobs["start_lr"] = None  # a given rate is used as given
        recipe = dataclasses.replace(shared, **knobs)
        fitted = fitted_of(s) if recipe == shared else fit_recipe(s, recipe)
        fit, images, captions, floor, final = fitted.fit, fitted.images, fitted.captions, fitted.floor, fitted.final_loss
        refs = cap.strip(captions)
        ids = generated(s, fit.captioner, images, captions.shape[1] + 2)
        hyps = cap.strip(ids)
        em, bleu = exact_match(refs, hyps), bleu4(refs, hyps)
        metrics = {
            "final_loss": final, "blind_floor": floor, "steps_run": fit.steps + fit.abandoned_steps, "lr": fit.lr,
            "exact_match": em, "bleu4": bleu, "loss_over_floor": final / floor if floor > 0 else float("nan"),
            "interrupted": float(fit.interrupted), "step_budget": fit.budget_steps,
            "seconds_per_step": fit.seconds_per_step, **fitted.bn_metrics,
        }
        examples = [(s.fitted_decode(r), s.fitted_decode(h)) for r, h in zip(refs[:6], hyps[:6])]
        sweep_curves: dict = {}
        where = None  # set where the diagnosis is "cannot see the image" and a point on the image path shows it
        low = recipe.low(final, floor)
        passed = low and reproduced(em, len(refs), self.min_exact_match)
        decoding = None  # why captions differ when the loss is low: generate() against the forward
        if low and not passed and not fit.interrupted:
            decoding = misses_explained(s, fit.captioner, images, captions, ids, refs, hyps)
            metrics.update(decoding.metrics)
            passed = decoding.explained
        if fit.interrupted:
            status, summary, hint = Status.WARN, (
                f"interrupted after {fit.steps} steps: loss {final:.4f} (image-blind floor {floor:.3f}), "
                f"exact match {em:.0%}"), "Partial result; rerun with more patience for a verdict."
        elif passed:
            status, summary, hint = Status.PASS, (
                f"memorized {len(refs)} captions in {fit.steps} steps{_restart_note(fit, recipe)}: loss {final:.4f} "
                f"(floor {floor:.3f}), exact match {em:.0%}, BLEU-4 {bleu:.2f}{fitted.bn_note}"
                f"{decoding.note if decoding else ''}"), ""
        elif fit.time_limited and not low and not fit.diverged:
            status, summary, hint = Status.WARN, (
                f"no verdict within the time budget: {fit.steps} steps at {fit.seconds_per_step:.2f} s/step "
                f"(of {recipe.steps}) on {len(refs)} captions{' (cut from ' + str(recipe.batch_size) + ')' if fit.images is not None else ''} "
                f"took the loss to {final:.3f} (image-blind floor {floor:.3f})"), (
                f"The model is too slow here to memorize a batch in {recipe.time_budget:g} s. Rerun "
                f"`capdiag overfit --steps {recipe.steps}` (about {recipe.steps * fit.seconds_per_step / 60:.0f} min "
                "here) or on a GPU for the verdict.")
        elif low:
            status, summary, hint = Status.FAIL, (
                f"loss fell to {final:.4f} but generate() reproduces only {em:.0%} of the captions "
                f"(BLEU-4 {bleu:.2f}), and on {decoding.n_unexplained} of them it departs from the forward's own "
                f"choice: {decoding.agreement.describe_first()}"), (
                "Training and decoding disagree: generate() feeds the model differently than forward "
                "(missing image, wrong start token, state not carried, mask missing at inference).")
        else:
            status, summary, hint, sweep_curves, where = self._diagnose(s, cap, images, captions, fit, final, floor,
                                                                        metrics, recipe)
        if status is Status.FAIL and where is None:  # a measured cause of a loss that cannot fall
            where = where_probabilities(fit.captioner, images, captions, s.seed)
        artifacts = {"examples": examples, "losses": list(fit.losses), "blind_floor": floor,
                     "pass_loss": recipe.pass_loss, "sweep_curves": sweep_curves, "model_name": cap.name}
        return self.finding(status, summary, metrics, hint, artifacts, location=where)

    def _sweep(self, s, cap, images, captions, fit, final, floor, metrics, recipe) -> tuple:
        """Short fits at other learning rates: ``(best rate, best eval loss, loss curves)``. A diverging
        run asks whether a smaller step fits; a plateau whether a larger (or, for big models that
        oscillate, a smaller) one does."""
        best_lr, best = fit.lr, final if math.isfinite(final) else float("inf")
        curves = {}
        if fit.diverged or not math.isfinite(final):
            sweep = (fit.lr / 3, fit.lr / 10)
        elif recipe.low(fit.recent_loss, floor):
            sweep = ()  # train mode memorized at this rate: the rate is not the problem, eval mode is
        else:  # plus the usual Adam default when the given rate is far below it
            sweep = (fit.lr / 3, fit.lr * 3, fit.lr * 10) + ((1e-3,) if fit.lr * 10 < 1e-3 else ())
        for lr in sweep:
            trial = fit_copy(cap, images, captions, min(recipe.steps, self.sweep_steps), lr, s.seed, recipe.stop_loss,
                             False, patience=50, floor=floor)
            curves[lr] = trial.losses
            loss = eval_loss(trial.captioner, images, captions, s.seed) if not trial.diverged else float("inf")
            metrics[f"sweep_loss_lr_{lr:g}"] = loss
            if loss < best:
                best_lr, best = lr, loss
        metrics["best_lr"], metrics["best_loss"] = best_lr, best
        return best_lr, best, curves

    def _diagnose(self, s, cap, images, captions, fit, final, floor, metrics, recipe):
        best_lr, best, curves = self._sweep(s, cap, images, captions, fit, final, floor, metrics, recipe)
        # A rate that gets far below both the main run and the image-blind floor shows the model can fit.
        if best < recipe.pass_loss or (best < 0.5 * final and best < 0.5 * floor):
            return Status.WARN, (
                f"does not fit at lr {fit.lr:g} in {fit.steps} steps (loss {final:.3f}) but reaches {best:.4f} "
                f"within {self.sweep_steps} steps at lr {best_lr:g}: the learning rate is off, the model can fit"), (
                f"Train with a learning rate near {best_lr:g} (or add warm-up); rerun with --lr {best_lr:g}."), curves, None
        if not math.isfinite(best):
            return Status.FAIL, "the loss diverges to NaN/inf at every learning rate tried", (
                "Look for log/division of values near zero, missing gradient clipping, or an unstable custom "
                "layer; loss_at_init and gradient_reachability locate non-finite values."), curves, None
        train_tail = fit.recent_loss
        metrics["train_mode_loss"] = train_tail
        if train_tail < 0.5 * best and train_tail < floor:
            stale = metrics.get("bn_log_var_mismatch_at_init", 0.0)
            why = (f"; at init its BatchNorm running variances are e^{stale:.1f} off the variances the weights "
                   "produce" if stale > recipe.bn_mismatch else "")
            return Status.FAIL, (
                f"fits in train mode (loss {train_tail:.3f}) but not in eval mode (loss {best:.3f}, image-blind floor "
                f"{floor:.3f}): the model behaves differently at inference{why}"), (
                "Train and eval mode disagree. Usual cause: BatchNorm running statistics that do not match the "
                "weights (a pretrained encoder whose weights a custom init overwrote while its running statistics "
                "stayed pretrained: the forum case), or dropout/noise layers left on or off by mistake."), curves, None
        if best > 1.25 * floor:
            return Status.FAIL, (
                f"the loss stays at {best:.3f}, above even the image-blind floor {floor:.3f}, at every learning rate "
                "tried: the model does not learn the caption prior, let alone the image"), (
                "Training does not work at all: check that parameters are not frozen by mistake, that the optimizer "
                "gets model.parameters(), that targets are captions shifted by one, and that the loss is computed "
                "on logits."), curves, None
        if best > 0.8 * floor:
            return Status.FAIL, (
                f"loss plateaus at {best:.3f}, at the image-blind floor {floor:.3f} ({best / floor:.0%} of it), "
                "at every learning rate: the model cannot see the image"), (
                "The decoder learns only the caption prior. Usual causes: image features never reach the decoder "
                "(wrong variable passed, detached, multiplied by zero), a pretrained encoder clobbered by a custom "
                "init, a dead ReLU after the projection, or features scaled to nothing. Run image_ablation and "
                "gradient_flow."), curves, where_image_dies(fit.captioner, images, captions, s.seed)
        if best < 0.8 * floor:  # below the floor: it uses the image and learns, only slower than the budget
            steps = max(2000, 4 * (fit.steps + fit.abandoned_steps))
            return Status.WARN, (
                f"inconclusive: loss {best:.3f} is below the image-blind floor {floor:.3f} (the model uses the image) "
                f"but not memorized within {fit.steps} steps at any rate tried; run `capdiag overfit --steps {steps}` "
                "to settle it"), (
                "Slow learners (dropout 0.5, deep recurrent decoders) need more steps; a model that still plateaus "
                "there lacks capacity or has targets misaligned with its inputs."), curves, None
        return Status.FAIL, (
            f"cannot memorize one batch: loss plateaus at {best:.3f} (image-blind floor {floor:.3f}) at every "
            "learning rate tried"), (
            "It uses the image partly but cannot fit: check capacity (d_model, layers), that targets are "
            "captions shifted by one, that the loss ignores padding, and that nothing is frozen by mistake."), curves, None

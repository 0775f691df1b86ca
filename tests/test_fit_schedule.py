"""The fitted copy's start rate: a larger rate while progress is fast, a restart at the recipe's
rate when it is slow within the first steps (training.fit_copy's start_lr)."""
from __future__ import annotations

import torch
from torch import nn

import capdiag
from capdiag.testing import zoo
from capdiag.measure.fitting import START_WINDOW, fit_copy
from capdiag.measure.training import RECIPE, overfit_batch


def _fit(model, hints, start_lr, steps=200):
    s = capdiag.subject_for(model, **hints)
    images, captions = overfit_batch(s, 16)
    return fit_copy(s.captioner, images, captions, steps, RECIPE.lr, 0, 0.005, start_lr=start_lr, eval_stop=0.05), s


def test_a_fast_start_rate_is_kept_and_memorizes_in_fewer_steps():
    fast, _ = _fit(zoo.make("gru"), zoo.HINTS, 3e-3, steps=400)
    slow, _ = _fit(zoo.make("gru"), zoo.HINTS, None, steps=400)
    assert fast.lr == 3e-3 and fast.abandoned_steps == 0
    assert fast.steps < slow.steps  # 150 vs 390 steps measured


class Stalling(nn.Module):
    """Tokens through a sign-sensitive bottleneck: Adam's large early steps at 3e-3 stall it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(zoo.VOCAB, 8)
        self.img = nn.Linear(3, 8)
        self.out = nn.Linear(8, zoo.VOCAB)

    def forward(self, images, captions):
        h = self.emb(captions) + self.img(images.mean((2, 3)))[:, None]
        return self.out(torch.tanh(100 * h))  # saturates: large steps leave it stuck


def test_a_slow_start_restarts_from_the_weights_at_the_recipe_rate():
    hints = {k: v for k, v in zoo.HINTS.items() if k != "image_module"}
    fit, s = _fit(Stalling(), hints, 3e-3, steps=120)
    assert 20 <= fit.abandoned_steps <= START_WINDOW and fit.lr == RECIPE.lr
    assert len(fit.losses) + fit.abandoned_steps <= 120  # one budget for both
    # The restart began from the user's weights, not from where the large steps led.
    first = float(s.captioner.loss(*overfit_batch(s, 16)).detach())
    assert abs(fit.losses[0] - first) < 1e-4


def test_a_model_too_slow_for_the_budget_trains_on_half_the_batch():
    import dataclasses

    from capdiag.measure.training import fit_recipe

    s = capdiag.subject_for(zoo.make("gru"), **zoo.HINTS)
    recipe = dataclasses.replace(RECIPE, time_budget=1e-6, steps=40)  # every model is "too slow" for this
    fitted = fit_recipe(s, recipe)
    assert fitted.images.shape[0] == recipe.min_batch == fitted.captions.shape[0]
    assert fitted.fit.time_limited and fitted.fit.budget_steps == 30
    unlimited = fit_recipe(s, dataclasses.replace(recipe, min_batch=None))
    assert unlimited.images.shape[0] == recipe.batch_size


class SlowForward(nn.Module):
    """A zoo captioner whose forward takes 0.1 s per sample, as a 60M model's does on a CPU."""

    def __init__(self):
        super().__init__()
        self.inner = zoo.make("gru")

    def forward(self, images, captions):
        import time

        time.sleep(0.1 * images.shape[0])
        return self.inner(images, captions)


def test_a_slow_model_gets_a_smaller_probe_batch_and_says_so():
    from capdiag.intake.subject import SMALL_BATCH

    s = capdiag.subject_for(SlowForward(), **{**zoo.HINTS, "image_module": "inner.encoder"})
    assert s.images.shape[0] == SMALL_BATCH == s.captions.shape[0]
    assert any(a.startswith(f"probe batch of {SMALL_BATCH} images, not 8") for a in s.captioner.spec.assumptions)
    fast = capdiag.subject_for(zoo.make("gru"), **zoo.HINTS)
    assert fast.images.shape[0] == 8


def test_one_near_tie_among_eight_captions_still_counts_as_reproduced():
    from capdiag.checks.overfit import reproduced

    assert reproduced(7 / 8, 8, 0.9) and reproduced(15 / 16, 16, 0.9)
    assert not reproduced(6 / 8, 8, 0.9) and not reproduced(3 / 4, 4, 0.9) and not reproduced(0.0, 16, 0.9)

"""BatchNorm statistics vs weights, with the real EfficientNet-Lite0 weights: the forum case's
stale statistics are told apart from the lag of fast single-batch training (a false alarm on
correct fine-tuned encoders before)."""
from __future__ import annotations

import copy

import pytest
import torch

import capdiag
from capdiag.measure import batchnorm
from capdiag import get_check
from capdiag.finding import Status
from capdiag.models import show_attend_tell
from capdiag.models.recipe import xavier_init
from capdiag.runner import run_check
from capdiag.state import ModelSnapshot

pytest.importorskip("efficientnet_lite_pytorch")


def _subject(model):
    return capdiag.subject_for(model, **{**show_attend_tell.CAPDIAG, **model.capdiag_hints})


def test_stats_mismatch_separates_clobbered_from_intact_weights_and_changes_nothing():
    torch.manual_seed(0)
    model = show_attend_tell.build_model(encoder="efficientnet_lite0")
    s = _subject(model)
    before = ModelSnapshot.take(model)
    intact = batchnorm.stats_mismatch(s.captioner, s.images, s.captions)
    assert before.differences(ModelSnapshot.take(model)) == []
    model.encoder.apply(xavier_init)  # the forum case: weights overwritten, statistics stay
    clobbered = batchnorm.stats_mismatch(s.captioner, s.images, s.captions)
    assert intact < 0.5 < 1.5 < clobbered, (intact, clobbered)  # measured: 0.24 vs 1.97
    fresh = show_attend_tell.build_model(encoder="resnet18")  # untrained statistics: nothing to judge
    assert batchnorm.stats_mismatch(_subject(fresh).captioner, s.images, s.captions) is None


def test_recalibrate_matches_eval_mode_to_the_batch_and_restores_modes():
    torch.manual_seed(0)
    model = show_attend_tell.build_model(encoder="efficientnet_lite0")
    s = _subject(model)
    cap = s.captioner.with_model(copy.deepcopy(model))
    enc = cap.model.encoder
    enc.train()
    with torch.no_grad():
        enc(torch.randn(16, 3, 64, 64) * 5 + 3)  # statistics of other data
    bns = batchnorm.tracking_batchnorms(enc)
    momenta = [m.momentum for _, m in bns]
    batchnorm.recalibrate(cap, s.images, s.captions)
    assert [m.momentum for _, m in bns] == momenta and enc.training
    assert batchnorm.stats_mismatch(cap, s.images, s.captions) < 0.05  # statistics now those of this batch


def test_overfit_passes_a_correct_pretrained_encoder():
    torch.manual_seed(0)
    clean = run_check(_subject(show_attend_tell.build_model(encoder="efficientnet_lite0")), get_check("overfit"))
    assert clean.status is Status.PASS, clean.summary
    assert clean.metrics.get("bn_log_var_mismatch_at_init", 0) < 1.0

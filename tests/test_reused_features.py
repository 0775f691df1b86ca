"""capdiag.measure.probe.reused_image_features: caption-only probes compute the image features once, get the
same logits as without reuse, and leave the model as it was."""
from __future__ import annotations

import torch
from torch import nn

import capdiag
from capdiag import ModelSnapshot
from capdiag.testing import zoo
from capdiag.measure.probe import logits_in, reused_image_features
from capdiag.registry import get_check
from capdiag.runner import run_check


class InPlaceOnFeatures(nn.Module):
    """A captioner that edits its encoder's output in place: a reused output must be a copy."""

    def __init__(self):
        super().__init__()
        self.inner = zoo.make("transformer")
        self.encoder = self.inner.encoder

    def forward(self, images, captions):
        feats = self.encoder(images)
        feats.mul_(2.0)  # in place, on what the encoder returned
        regions = self.inner.proj(feats)
        return self.inner._transformer(regions, captions)


def _count_calls(module):
    calls = []
    return calls, module.register_forward_pre_hook(lambda m, a: calls.append(1))


def test_the_encoder_runs_once_for_caption_only_probes_and_logits_are_identical():
    s = capdiag.subject_for(InPlaceOnFeatures(), **zoo.HINTS)
    cap = s.captioner
    other = s.captions.clone()
    other[:, 2] = (other[:, 2] + 1 - 3) % (zoo.VOCAB - 3) + 3
    plain = [logits_in(cap, s.images, c, False, 0) for c in (s.captions, other, s.captions)]
    encoder_runs = []
    original = cap.model.encoder.net.forward
    cap.model.encoder.net.forward = lambda x: (encoder_runs.append(1), original(x))[1]  # counts real runs
    try:
        with reused_image_features(cap):
            reused = [logits_in(cap, s.images, c, False, 0) for c in (s.captions, other, s.captions)]
            train = [logits_in(cap, s.images, s.captions, True, 0) for _ in range(2)]  # no dropout in it: reused
            with torch.enable_grad():
                logits_in(cap, s.images, s.captions, False, 0)  # autograd on: always run
    finally:
        del cap.model.encoder.net.forward
    assert len(encoder_runs) == 2  # once in eval mode, once in train mode; logits_in runs under no_grad
    assert torch.equal(train[0], train[1])
    for a, b in zip(plain, reused):
        assert torch.equal(a, b)  # the in-place edit did not compound on a shared cached tensor


def test_an_encoder_that_draws_random_numbers_in_train_mode_is_not_reused():
    s = capdiag.subject_for(zoo.make("transformer"), **zoo.HINTS)
    cap = s.captioner
    cap.model.encoder.net.append(nn.Dropout(0.2))  # the encoder now consumes the RNG in train mode
    runs = []  # real runs of the encoder: its inner modules' hooks fire only then
    hook = cap.model.encoder.net[-1].register_forward_pre_hook(lambda m, a: runs.append(m.training))
    try:
        with reused_image_features(cap):
            first = logits_in(cap, s.images, s.captions, True, 0)
            again = logits_in(cap, s.images, s.captions, True, 0)
    finally:
        hook.remove()
    assert torch.equal(first, again) and len(runs) == 2


def test_caption_only_checks_leave_the_model_untouched_and_agree_with_no_reuse(monkeypatch):
    s = capdiag.subject_for(zoo.make("lstm"), **zoo.HINTS)
    before = ModelSnapshot.take(s.model)
    names = ("causal_leak", "caption_dependence", "padding_invariance")
    with_reuse = {n: run_check(s, get_check(n)) for n in names}
    assert before.differences(ModelSnapshot.take(s.model)) == []
    assert "forward" not in s.model.encoder.__dict__
    import contextlib

    import capdiag.checks.caption_dependence as cd
    import capdiag.checks.causal_leak as cl
    import capdiag.checks.padding_invariance as pi

    for mod in (cl, cd, pi):
        monkeypatch.setattr(mod, "reused_image_features", lambda cap: contextlib.nullcontext())
    s2 = capdiag.subject_for(zoo.make("lstm"), **zoo.HINTS)
    for n in names:
        f = run_check(s2, get_check(n))
        assert f.status == with_reuse[n].status
        assert {k: v for k, v in f.metrics.items() if k != "seconds"} == \
            {k: v for k, v in with_reuse[n].metrics.items() if k != "seconds"}

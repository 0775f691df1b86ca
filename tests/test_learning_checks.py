"""Checks that need a model which has learned (they train a copy): must pass on clean zoo
captioners and fail on the planted bug they target."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capdiag.testing import zoo
from capdiag import get_check
from capdiag.finding import Status
from capdiag.runner import run_check, run_checks
from capdiag.viz.findings import render

LEARNED_CASES = [(bug, arch, c) for bug, (archs, checks) in zoo.LEARNED_BUGS.items() for arch in archs for c in checks]


def test_overfit_passes_clean_and_writes_curve(zoo_subject, tmp_path):
    f = render(run_check(zoo_subject("transformer"), get_check("overfit")), tmp_path)
    assert f.status is Status.PASS, f.summary
    assert f.metrics["final_loss"] < 0.05 and f.metrics["exact_match"] >= 0.9 and f.metrics["bleu4"] > 0.9
    assert (tmp_path / "overfit_loss.png").stat().st_size > 10_000


def test_overfit_image_blind_fails_with_floor_diagnosis(zoo_subject):
    f = run_check(zoo_subject("gru", "image_blind"), get_check("overfit", steps=300))
    assert f.status is Status.FAIL
    assert "image-blind floor" in f.summary and "cannot see the image" in f.summary
    assert 0.8 < f.metrics["best_loss"] / f.metrics["blind_floor"] < 1.3


def test_overfit_learning_rate_too_low_is_told_apart(zoo_subject):
    f = run_check(zoo_subject("gru"), get_check("overfit", steps=300, lr=1e-5, sweep_steps=300))
    assert f.status is Status.WARN and "learning rate is off" in f.summary


@pytest.mark.parametrize("bug,arch,check", LEARNED_CASES, ids=[f"{b}-{a}-{c}" for b, a, c in LEARNED_CASES])
def test_learned_bug_fails(zoo_subject, bug, arch, check):
    f = run_check(zoo_subject(arch, bug), get_check(check))
    assert f.status is Status.FAIL, f.summary
    assert f.hint


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_learning_checks_pass_on_clean_models(zoo_subject, tmp_path, arch):
    names = ["image_ablation", "decoding_consistency", "attention_maps", "attribution"]
    report = run_checks(zoo_subject(arch), names)
    for f in report.findings:
        render(f, tmp_path)
    bad = {f.check: f.summary for f in report.findings if f.status is not Status.PASS}
    assert not bad, bad
    ablation = report.findings[0]
    assert ablation.metrics["image_reliance"] > 0.5
    for png in ("image_ablation.png", "attention_words.png", "attribution_pixels.png"):
        assert (tmp_path / png).stat().st_size > 5_000


def test_attention_skips_without_attention_modules(zoo_subject):
    f = run_check(zoo_subject("gru"), get_check("attention_maps"))
    assert f.status is Status.SKIP and "no attention modules" in f.summary


def test_decoding_consistency_skips_without_generate(zoo_subject):
    import capdiag

    class NoGen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = zoo.make("gru")

        def forward(self, images, captions):
            return self.m(images, captions)

    s = capdiag.subject_for(NoGen(), **{**zoo.HINTS, "image_module": "m.encoder"})
    assert run_check(s, get_check("decoding_consistency")).status is Status.SKIP


def test_gradient_flow_flags_starved_encoder_and_plots(zoo_subject, tmp_path):
    f = render(run_check(zoo_subject("transformer", "starved_image"), get_check("gradient_flow")), tmp_path)
    assert f.status is Status.FAIL and "starved" in f.summary
    assert f.metrics["image_over_text_grad"] < 1e-3
    assert (tmp_path / "gradient_flow.png").stat().st_size > 10_000
    clean = run_check(zoo_subject("transformer"), get_check("gradient_flow"))
    assert clean.status is Status.PASS, clean.summary
    detached = run_check(zoo_subject("gru", "detached_image"), get_check("gradient_flow"))
    assert detached.status is Status.FAIL and "no or all-zero gradient" in detached.summary
    # None gradients are shown (flagged), not dropped
    assert any(L["flag"] == "none" for L in detached.artifacts["layers"])


# ---- the recipe's own loss and metric ------------------------------------------------------
def good_loss(logits, captions):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), captions[:, 1:].reshape(-1), ignore_index=zoo.PAD)


def pad_counting_loss(logits, captions):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), captions[:, 1:].reshape(-1))


def sum_loss(logits, captions):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), captions[:, 1:].reshape(-1),
                           ignore_index=zoo.PAD, reduction="sum")


def softmax_twice_loss(logits, captions):
    return good_loss(torch.softmax(logits, -1), captions)


@pytest.mark.parametrize("fn,ok,needle", [
    (good_loss, True, ""), (pad_counting_loss, False, "padding counts"), (sum_loss, False, "not a mean"),
    (softmax_twice_loss, False, "softmax applied twice"),
])
def test_loss_sanity(zoo_subject, fn, ok, needle):
    f = run_check(zoo_subject("gru", loss_fn=fn), get_check("loss_sanity"))
    assert (f.status is Status.PASS) == ok, f.summary
    assert needle in f.summary


def test_loss_sanity_catches_eos_dropped_by_ignore_index_when_pad_is_eos(zoo_subject):
    """GPT-2 / CLIP recipes: pad == eos, so ignore_index=pad_id silently drops every EOS target."""
    from capdiag.models.recipe import caption_loss

    def ignore_pad(logits, captions):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), captions[:, 1:].reshape(-1),
                               ignore_index=zoo.EOS)

    def by_position(logits, captions):
        return caption_loss(logits, captions, zoo.EOS)

    bad = run_check(zoo_subject("gru", pad_id=zoo.EOS, loss_fn=ignore_pad), get_check("loss_sanity"))
    assert bad.status is Status.FAIL and "EOS is not a target" in bad.summary, bad.summary
    good = run_check(zoo_subject("gru", pad_id=zoo.EOS, loss_fn=by_position), get_check("loss_sanity"))
    assert good.status is Status.PASS, good.summary


def _bleu(keep_pads):
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    def clean(ids):
        ids = [t for t in ids if t not in (zoo.BOS, zoo.EOS)]
        return ids if keep_pads else [t for t in ids if t != zoo.PAD]

    def bleu(refs, hyps):
        return 100 * corpus_bleu([[clean(r)] for r in refs], [clean(h) for h in hyps],
                                 smoothing_function=SmoothingFunction().method1)
    return bleu


@pytest.mark.parametrize("keep_pads,ok", [(False, True), (True, False)])
def test_metric_sanity(zoo_subject, keep_pads, ok):
    f = run_check(zoo_subject("gru", bleu_fn=_bleu(keep_pads)), get_check("metric_sanity"))
    assert (f.status is Status.PASS) == ok, f.summary


def test_input_sanity_catches_raw_pixels_and_bad_captions(tmp_path):
    import capdiag

    model = zoo.make("gru")
    imgs = torch.rand(4, 3, 32, 32) * 255
    caps = torch.tensor([[1, 5, 6, 2, 0], [1, 5, 2, 0, 0], [1, 7, 8, 9, 2], [1, 5, 6, 2, 0]])
    f = run_check(capdiag.subject_for(model, batch=(imgs, caps), **zoo.HINTS), get_check("input_sanity"))
    assert f.status is Status.FAIL and "0-255" in f.summary
    bad_caps = caps.clone()
    bad_caps[0, 3] = 7  # no EOS in caption 0
    bad_caps[1, 4] = 9  # a token after EOS
    s = capdiag.subject_for(model, batch=(torch.randn(4, 3, 32, 32), bad_caps), **zoo.HINTS)
    f = render(run_check(s, get_check("input_sanity")), tmp_path)
    assert f.status is Status.FAIL and "no EOS" in f.summary and "follow EOS" in f.summary
    assert (tmp_path / "input_batch.png").exists()

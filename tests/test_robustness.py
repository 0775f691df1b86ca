"""capdiag never harms the model it inspects, and copes with odd but legal captioners."""
from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import capdiag
from capdiag import ModelSnapshot, run_checks
from capdiag.finding import Status
from capdiag.testing import zoo
from capdiag.registry import list_checks
from capdiag.measure.training import Recipe
import procs

ALL = [c.name for c in list_checks()]
QUICK = [c.name for c in list_checks() if c.cheap]


def lean(names):
    """The checks with their training budgets cut, to keep CI lean: what is tested here is that
    the model comes back untouched, not the verdicts (tested elsewhere)."""
    from capdiag import get_check

    knobs = {"overfit": dict(sweep_steps=10), "attribution": dict(n_steps=4)}
    return [get_check(n, **knobs.get(n, {})) for n in names]


LEAN_RECIPE = Recipe(steps=25)  # the one learned copy every full check shares, trained 25 steps


def _state_unchanged(subject, checks):
    subject.recipe = LEAN_RECIPE
    m = subject.model
    m.train()
    torch.manual_seed(5), random.seed(6), np.random.seed(7)
    before = ModelSnapshot.take(m)
    report = run_checks(subject, checks)
    assert before.differences(ModelSnapshot.take(m)) == []
    return report


@pytest.mark.parametrize("name", ["show_attend_tell", "cnn_transformer", "clip_decoder", "clipcap", "dual_transfer"])
def test_every_check_leaves_every_reference_model_untouched(name):
    import importlib

    if name in ("clip_decoder", "clipcap", "dual_transfer"):
        pytest.importorskip("transformers")
    if name == "dual_transfer":
        pytest.importorskip("efficientnet_lite_pytorch")
    mod = importlib.import_module(f"capdiag.models.{name}")
    model = mod.build_model()
    hints = {**mod.CAPDIAG, **model.capdiag_hints}
    subject = capdiag.subject_for(model, loss_fn=getattr(model, "loss_fn", None), bleu_fn=getattr(model, "bleu_fn", None), **hints)
    report = _state_unchanged(subject, lean(ALL))
    assert not [f for f in report.findings if f.status is Status.ERROR], [(f.check, f.summary) for f in report.findings]


@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_every_check_leaves_zoo_models_untouched(arch):
    _state_unchanged(capdiag.subject_for(zoo.make(arch), **zoo.HINTS), lean(ALL))


def test_ablation_maps_every_per_sample_tensor_of_a_dict_output_and_keeps_its_type():
    from collections import OrderedDict

    from capdiag.hooks import _map_output

    class Out(OrderedDict):  # the shape of a Hugging Face ModelOutput: keys and attributes
        def __init__(self, **kw):
            super().__init__(**kw)
            self.__dict__.update(kw)

        def to_tuple(self):
            return tuple(self.values())

    feats, pooled, table = torch.ones(4, 3, 8), torch.ones(4, 8), torch.ones(3, 8)
    out = _map_output(Out(last_hidden_state=feats, pooler_output=pooled, pos=table), torch.zeros_like)
    assert isinstance(out, Out) and out.pooler_output.abs().sum() == 0 and out["last_hidden_state"].abs().sum() == 0
    assert torch.equal(out.pos, table)  # no batch dimension: not the image, left alone
    plain = _map_output({"a": feats, "b": pooled}, lambda t: t.roll(1, 0))
    assert set(plain) == {"a", "b"}


def test_state_restored_even_when_the_model_raises():
    class Flaky(nn.Module):
        calls = [0]  # on the class: capdiag restores instance attributes after each call, not this

        def __init__(self):
            super().__init__()
            self.inner = zoo.make("gru")

        def forward(self, images, captions):
            Flaky.calls[0] += 1
            if Flaky.calls[0] > 3:
                raise RuntimeError("flaky forward")
            return self.inner(images, captions)

    m = Flaky()
    s = capdiag.subject_for(m, **{**zoo.HINTS, "image_module": "inner.encoder"})
    m.train()
    before = ModelSnapshot.take(m)
    report = run_checks(s, QUICK)
    # The model raised: a failing finding that names the call and the user's line, not a capdiag error.
    raised = [f for f in report.findings if "flaky forward" in f.summary]
    # Reported once: the first check that hit it fails, the later ones are blocked by it (SKIP).
    assert raised and raised[0].status is Status.FAIL and all(f.status is Status.SKIP for f in raised[1:])
    assert all(f.summary.startswith(f"blocked by {raised[0].check}") for f in raised[1:])
    assert "forward() raised RuntimeError" in raised[0].summary and "test_robustness.py" in raised[0].summary
    assert not [f for f in report.findings if f.status is Status.ERROR]
    assert before.differences(ModelSnapshot.take(m)) == []


# ---- odd but legal models ------------------------------------------------------------------------
class Odd(nn.Module):
    """A GRU captioner with switches for the odd-but-legal variations users write."""

    def __init__(self, output="tensor", length="T", keyword=False, tie=False, bn_decoder=False, checkpoint=False,
                 vocab=24):
        super().__init__()
        self.output, self.length, self.keyword, self.checkpoint = output, length, keyword, checkpoint
        self.encoder = zoo.TinyEncoder(32)
        self.embed = nn.Embedding(vocab, 32)
        self.rnn = nn.GRU(32, 32, batch_first=True)
        self.bn = nn.BatchNorm1d(32) if bn_decoder else None
        self.out = nn.Linear(32, vocab)
        if tie:
            nn.init.normal_(self.embed.weight, std=0.02)  # as tied LMs do: N(0, 1) rows would give huge logits
            self.out.weight = self.embed.weight  # weight tying

    def body(self, images, captions):
        h0 = self.encoder(images).mean(1)[None].contiguous()
        x = self.embed(captions)
        if self.checkpoint:  # reentrant activation checkpointing of the recurrent block
            from torch.utils.checkpoint import checkpoint

            x = checkpoint(lambda a, b: self.rnn(a, b)[0], x, h0, use_reentrant=True)
        else:
            x, _ = self.rnn(x, h0)
        if self.bn is not None:
            x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.out(x)

    def forward(self, images, captions=None, *, tokens=None):
        captions = tokens if self.keyword else captions
        logits = self.body(images, captions)
        if self.length == "T-1":
            logits = logits[:, :-1]
        if self.output == "tuple":
            return logits, None
        if self.output == "dict":
            return {"logits": logits, "aux": 1}
        if self.output == "modeloutput":
            from transformers.modeling_outputs import CausalLMOutput

            return CausalLMOutput(logits=logits)
        return logits


ODD = {
    "tuple output": (dict(output="tuple"), {}),
    "dict output": (dict(output="dict"), {}),
    "ModelOutput": (dict(output="modeloutput"), {}),
    "logits of length T-1": (dict(length="T-1"), {}),
    "captions as keyword": (dict(keyword=True), {"captions_keyword": "tokens"}),
    "weight tying": (dict(tie=True), {}),
    "BatchNorm in the decoder": (dict(bn_decoder=True), {}),
    "reentrant checkpointing": (dict(checkpoint=True), {}),
    "pad == bos == eos (GPT-2)": ({}, {"pad_id": 3, "bos_id": 3, "eos_id": 3}),
    "eos == pad (CLIP)": ({}, {"pad_id": 0, "bos_id": 1, "eos_id": 0}),
    "BOS id 0": ({}, {"pad_id": 2, "bos_id": 0, "eos_id": 1}),
}


@pytest.mark.parametrize("case", sorted(ODD))
def test_odd_but_legal_models_pass_quick_checks(case):
    if case == "ModelOutput":
        pytest.importorskip("transformers")
    kwargs, hints = ODD[case]
    torch.manual_seed(0)
    model = Odd(**kwargs)
    subject = capdiag.subject_for(model, **{**zoo.HINTS, **hints})
    report = _state_unchanged(subject, QUICK)
    allowed = {Status.PASS, Status.SKIP}
    if case == "BatchNorm in the decoder":  # a real, weak train-time leak through batch statistics: a warning
        assert report.findings[QUICK.index("causal_leak")].status is Status.WARN
        allowed.add(Status.WARN)
    bad = {f.check: f.summary for f in report.findings if f.status not in allowed}
    assert not bad, bad


def test_batch_size_one_and_other_image_sizes():
    model = zoo.make("gru")
    from capdiag.captioner import IMAGENET_MEAN, IMAGENET_STD

    data = capdiag.SyntheticCaptions(zoo.VOCAB, image_size=48, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    images, captions = data.batch(1, seed=3)
    report = run_checks(capdiag.subject_for(model, batch=(images, captions), **{**zoo.HINTS, "image_size": 48}), QUICK)
    assert not [f for f in report.findings if f.status.failed], [(f.check, f.summary) for f in report.findings]


def test_half_precision_model():
    model = zoo.make("transformer").to(torch.bfloat16)
    report = run_checks(capdiag.subject_for(model, **zoo.HINTS), ["causal_leak", "caption_dependence", "padding_invariance",
                                                                      "batch_independence", "gradient_reachability"])
    assert all(f.status is Status.PASS for f in report.findings), [(f.check, f.summary) for f in report.findings]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_already_on_cuda():
    model = zoo.make("transformer").cuda()
    report = _state_unchanged(capdiag.subject_for(model, **zoo.HINTS), QUICK)
    assert not [f for f in report.findings if f.status.failed]


# ---- Ctrl-C and SIGTERM -----------------------------------------------------------------------------
MINIMAL = str(Path(__file__).resolve().parents[1] / "examples/minimal_model.py")  # small: the test is about signals
OVERFIT_FOREVER = [sys.executable, "-m", "capdiag", "overfit", MINIMAL, "--steps", "100000", "--lr", "1e-6"]


def _ignore_sigint():  # what a background job of a non-interactive shell hands its children
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig, code, inherited", [
    (signal.SIGINT, 130, procs._default_signals),
    (signal.SIGTERM, 143, procs._default_signals),
    (signal.SIGINT, 130, _ignore_sigint),  # capdiag reinstalls its own handler
], ids=["sigint", "sigterm", "sigint-inherited-ignored"])
def test_signal_during_overfit_prints_partial_result(tmp_path, sig, code, inherited):
    r = procs.signal_when_ready(OVERFIT_FOREVER, "step", sig, cwd=tmp_path, preexec_fn=inherited)
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "interrupted after" in r.stdout and "partial" in r.stderr
    assert "Traceback" not in r.stderr


def test_signal_helper_fails_instead_of_hanging_on_a_child_that_ignores_sigint(tmp_path):
    # The old Ctrl-C test blocked forever here; the helper must give up within its bounds.
    child = [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
             "print('step', file=sys.stderr, flush=True); time.sleep(600)"]
    start = time.perf_counter()
    r = procs.signal_when_ready(child, "step", signal.SIGINT, start_timeout=30, stop_timeout=2)
    assert r.returncode is None
    assert time.perf_counter() - start < 30

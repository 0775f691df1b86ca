"""Localization: a failing check names the module and the user's line where its problem starts
(capdiag/measure/localize.py), judged against capdiag/testing/planted_sites.py; clean models get no location, and
localizing changes nothing of the model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import capdiag
from capdiag import ModelSnapshot
from capdiag.finding import CALLED, ORIGIN
from capdiag.measure.localize import dependence_dies, localize_pair, where_image_dies
from capdiag.models import registry
from capdiag.testing import unusual, zoo
from capdiag.testing.planted_sites import SITES, judge
from capdiag.registry import get_check
from capdiag.runner import run_check
from capdiag.testing import held_out
from capdiag.measure.trace import trace_pair
from capdiag.measure.violations import at_position, causal_prefix


def zoo_subject(arch, bug=None):
    s = capdiag.subject_for(zoo.make(arch, bug), **zoo.HINTS)
    s.rebuild = lambda: zoo.make(arch, bug)  # as the CLI's model-file loader sets it
    return s


STRUCTURAL = [(a, bug, check) for bug, (archs, check) in zoo.BUGS.items() for a in archs]


@pytest.mark.parametrize("arch,bug,check", STRUCTURAL, ids=[f"{a}-{b}" for a, b, _ in STRUCTURAL])
def test_failing_structural_check_names_the_planted_module_and_line(arch, bug, check):
    s = zoo_subject(arch, bug)
    f = run_check(s, get_check(check))
    assert f.status.failed, f.summary
    module_ok, line_ok = judge(SITES[f"zoo/{bug}"], f.location, type(s.model).__name__)
    assert module_ok and line_ok, f"{check} on {bug}: {f.location}"
    assert f.location.file.endswith("zoo.py") and f.location.line > 0 and f.location.evidence


@pytest.mark.parametrize("bug", ["positional_along_batch", "frozen_bn_drifts"])
def test_unusual_twins_are_localized(bug):
    pattern, check = unusual.BUGS[bug]
    m = unusual.build(pattern, bug)
    s = capdiag.subject_for(m, **m.capdiag_hints)
    f = run_check(s, get_check(check))
    assert f.status.failed
    assert judge(SITES[f"unusual/{bug}"], f.location, type(m).__name__) == (True, True), f.location


def test_pretrained_guard_names_the_apply_line_that_overwrote_the_weights():
    pytest.importorskip("transformers")
    s = registry.subject("clip_decoder", "xavier_init_clobbers_encoder")
    f = run_check(s, get_check("pretrained_guard"))
    assert f.status.failed
    assert f.location.module == "clip" and "self.apply(xavier_init)" in f.location.code
    assert "xavier_uniform_" in f.location.evidence  # the init line inside the function apply() called


def test_learned_image_blindness_is_localized_to_the_line_that_drops_the_features():
    s = zoo_subject("gru", "image_blind")
    f = run_check(s, get_check("image_ablation"))
    assert f.status.failed
    assert "torch.zeros_like(regions)" in f.location.code


@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_clean_models_get_no_location_and_the_engine_invents_none(arch):
    """Adversarial: on clean models the engine itself must find nothing, even when asked directly
    (transient differences a causal loop or an attention mask undoes must not become an origin)."""
    s = zoo_subject(arch)
    report = capdiag.run_checks(s, [c.name for c in capdiag.list_checks() if c.cheap])
    assert not report.failed and all(f.location is None for f in report.findings)
    T = s.captions.shape[1]
    caps = s.captions.clone()
    caps[:, 3:-1] = (caps[:, 3:-1] + 1) % zoo.VOCAB  # future tokens changed (specials may appear: still causal)
    assert localize_pair(s.captioner, (s.images, s.captions), (s.images, caps), causal_prefix(2, T, 1e-4), "x") is None
    assert where_image_dies(s.captioner, s.images, s.captions) is None
    for t in (1, 2, 3):  # a per-step loop carries token t into later steps only weakly: weak is not dead
        where = torch.zeros_like(s.captions, dtype=torch.bool)
        where[:, t] = True
        other = s.captions.clone()
        other[where] = (other[where] + 1 - 3) % (zoo.VOCAB - 3) + 3  # another word, no special id
        a, b = trace_pair(s.captioner, (s.images, s.captions), (s.images, other))
        assert dependence_dies(a, b, at_position(t, T, 1e-6), moved=at_position(t, T, 0.0)) == (None, "unknown")


@pytest.mark.parametrize("pattern", ["sorted_tutorial_lstm", "packed_lstm_bos0", "frozen_nograd_encoder", "prefix_lm",
                                     "model_output", "beam_search", "gru_96px"])
def test_clean_models_written_differently_get_no_image_death(pattern):
    """Length-sorted tutorial decoders write logits with x[i] = v, packed sequences sort with
    uninitialized buffers, output objects carry .logits, beam search goes through Python lists: none of
    that may read as the image being dropped."""
    m = unusual.build(pattern, None, seed=1)
    s = capdiag.subject_for(m, seed=1, **m.capdiag_hints)
    assert where_image_dies(s.captioner, s.images, s.captions) is None
    if s.captioner.has_generate:
        assert where_image_dies(s.captioner, s.images, s.captions, generate=True) is None


def test_localizing_leaves_the_model_untouched():
    s = zoo_subject("transformer", "no_causal_mask")
    s.model.train()  # a mode the check does not use: it must come back
    before = ModelSnapshot.take(s.model)
    for check in ("causal_leak", "padding_invariance", "loss_at_init", "gradient_reachability"):
        run_check(s, get_check(check))
    assert before.differences(ModelSnapshot.take(s.model)) == []


def test_localizing_survives_a_model_that_raises_on_the_traced_call():
    from torch import nn

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = zoo.make("transformer", "no_causal_mask")

        def forward(self, images, captions):
            return self.model(images, captions)

    m = Wrapper()
    s = capdiag.subject_for(m, **{k: v for k, v in zoo.HINTS.items() if k != "image_module"})
    before = ModelSnapshot.take(m)
    with pytest.raises(RuntimeError):
        from capdiag.measure.trace import trace_call

        def boom(*a):
            raise RuntimeError("boom")

        m.model.decoder.register_forward_hook(boom)
        try:
            trace_call(s.captioner, s.images, s.captions)
        finally:
            m.model.decoder._forward_hooks.clear()
    assert before.differences(ModelSnapshot.take(m)) == []


def test_cli_prints_and_writes_the_location(tmp_path):
    model = tmp_path / "model.py"
    model.write_text("from capdiag.testing import zoo\nCAPDIAG = dict(zoo.HINTS)\n"
                     "def build_model():\n    return zoo.make('transformer', 'no_causal_mask')\n")
    out = tmp_path / "f.json"
    r = subprocess.run([sys.executable, "-m", "capdiag", "check", str(model), "--only", "causal_leak,padding_invariance",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "at:   decoder.layers.0.self_attn (zoo.py:" in r.stdout
    checks = {c["check"]: c for c in json.loads(out.read_text())["checks"]}
    loc = checks["causal_leak"]["location"]
    assert loc["module"] == "decoder.layers.0.self_attn" and loc["file"].endswith("zoo.py") and loc["line"] > 0
    assert "tgt_mask=mask" in loc["code"]


# ---- held-out twins: the classes localization missed on code it had never seen ----------------------

HELD_OUT = sorted(held_out.BUGS)


def held_out_subject(pattern, bug=None, seed=0):
    m = held_out.build(pattern, bug, seed=seed)
    s = capdiag.subject_for(m, seed=seed, **m.capdiag_hints)
    s.rebuild = lambda: held_out.build(pattern, bug, seed=seed)
    return s


@pytest.mark.parametrize("bug", HELD_OUT)
def test_held_out_twins_fail_with_the_origin_line(bug):
    if bug == "strict_false_load":
        pytest.importorskip("efficientnet_lite_pytorch")
    pattern, check = held_out.BUGS[bug]
    s = held_out_subject(pattern, bug)
    f = run_check(s, get_check(check))
    assert f.status is capdiag.Status.FAIL, f.summary
    assert judge(SITES[f"held_out/{bug}"], f.location, type(s.model).__name__) == (True, True), f.location
    assert f.location.kind == ORIGIN and f.location.file.endswith("held_out.py")
    assert f.location.said().startswith("origin: ")


@pytest.mark.parametrize("check", sorted({c for _, c in held_out.BUGS.values() if c != "pretrained_guard"}))
def test_the_clean_held_out_model_passes_what_its_twins_fail(check):
    f = run_check(held_out_subject("grid"), get_check(check))
    assert f.status is capdiag.Status.PASS, f.summary


def test_strict_false_load_names_both_key_groups():
    pytest.importorskip("efficientnet_lite_pytorch")
    f = run_check(held_out_subject("loaded_encoder", "strict_false_load"), get_check("pretrained_guard"))
    assert "matched 0 of the" in f.location.evidence and "module._conv_stem.weight" in f.location.evidence
    clean = run_check(held_out_subject("loaded_encoder"), get_check("pretrained_guard"))
    assert clean.status is capdiag.Status.PASS, clean.summary


def test_a_mode_switch_is_named_only_when_it_changes_the_mode_capdiag_called_in():
    """In train mode ``self.encoder.train()`` changes nothing: batch_independence's train-mode verdict
    does not involve it, and the eval-mode location names the switch."""
    from capdiag.measure.origins import mode_switch
    from capdiag.measure.trace import first_op, trace_call

    s = held_out_subject("grid", "encoder_train_in_forward")
    for train in (False, True):
        t = trace_call(s.captioner, s.images, s.captions, train=train)
        bn = first_op(t, lambda op: op.func == "batch_norm")
        loc = mode_switch(t, bn, s.model, "x")
        assert (loc is not None) == (not train)
    assert "self.encoder.train()" in loc.code if loc else True


def test_every_failure_carries_a_location_with_its_kind():
    """Checks that trace nothing of their own (caption_collapse, word_grounding, ...) still point at the
    user's method they called: the runner's "called from" location."""
    s = held_out_subject("grid", "generate_no_image")
    report = capdiag.run_checks(s, ["caption_collapse", "decoding_consistency", "image_ablation", "input_sanity"])
    failed = [f for f in report.findings if f.status is capdiag.Status.FAIL]
    assert failed
    for f in failed:
        assert f.location is not None and f.location.kind in (ORIGIN, CALLED, "first symptom"), f
        assert f.location.file.endswith("held_out.py") and f.location.line > 0


def test_called_from_points_at_generates_loop():
    from capdiag.measure.origins import called_location

    s = held_out_subject("grid")
    loc = called_location(s.captioner, s.images, "generate", "caption_collapse failed on its results")
    assert loc.kind == CALLED and "self.block(x, past, memory)" in loc.code
    loc = called_location(s.captioner, s.images, "forward", "x")
    assert loc.kind == CALLED and loc.code.startswith("def forward")


def test_origin_tracers_stay_silent_on_clean_models():
    """The benchmark's --clean sweep asks every origin question of every clean family; here a sample."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import localization as bench
    finally:
        sys.path.pop(0)
    from capdiag.testing import decoding, strangers
    for mod, pattern in ((held_out, "grid"), (decoding, "kv_cache"), (decoding, "beam_lstm"),
                         (strangers, "scheduled_sampling"), (strangers, "detr_backbone")):
        s = bench.family_subject(mod, pattern)
        assert bench.origins_asked(s) == [], pattern


def test_recording_restores_torch():
    """The mode-switch and state-store recorders patch nn.Module for the traced call only, also when the
    model raises."""
    from capdiag.measure.trace import traced

    train, setattr_, load = torch.nn.Module.train, torch.nn.Module.__setattr__, torch.nn.Module.load_state_dict
    m = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError):
        with traced(m, {}):
            raise ValueError("boom")
    assert (torch.nn.Module.train, torch.nn.Module.__setattr__, torch.nn.Module.load_state_dict) == (train, setattr_, load)

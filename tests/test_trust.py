"""No false alarms on clean captioners written the way people write them, and the bug classes
capdiag used to miss (issue: trust first). Each test names the class of model that used to be
misjudged; ``capdiag.testing.unusual`` holds the clean family and its bug twins."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import capdiag
from capdiag import ModelSnapshot, get_check, run_checks
from capdiag.finding import Status
from capdiag.testing import unusual, zoo
from capdiag.registry import list_checks, select_checks
from capdiag.runner import run_check

QUICK = select_checks(quick=True)
ALL = [c.name for c in list_checks()]


def subject(name, bug=None, seed=0, **kw):
    m = unusual.build(name, bug, seed=seed)
    return capdiag.subject_for(m, seed=seed, **{**m.capdiag_hints, **kw})


def quiet_run(s, checks):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_checks(s, checks)


def failed(report):
    return {f.check: f.summary for f in report.findings if f.status.failed}


class Wrapped(nn.Module):
    """A zoo captioner inside a user's module; subclasses change one thing."""

    def __init__(self, arch="gru"):
        super().__init__()
        self.inner = zoo.make(arch)

    def forward(self, images, captions):
        return self.inner(images, captions)


def wrapped_subject(model):
    return capdiag.subject_for(model, **{**zoo.HINTS, "image_module": "inner.encoder"})


# ---- the clean family ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(unusual.PATTERNS))
def test_clean_unusual_captioner_passes_every_quick_check(name):
    s = subject(name)
    before = ModelSnapshot.take(s.model)
    report = quiet_run(s, QUICK)
    assert not failed(report), failed(report)
    assert before.differences(ModelSnapshot.take(s.model)) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", list(unusual.PATTERNS))
def test_clean_unusual_captioner_passes_the_full_suite(name):
    report = quiet_run(subject(name), ALL)
    assert not failed(report), failed(report)


def test_family_covers_the_patterns_and_architectures():
    assert len(unusual.PATTERNS) >= 15
    assert {p.arch for p in unusual.PATTERNS.values()} == {"lstm", "gru", "transformer"}


@pytest.mark.parametrize("bug", list(unusual.BUGS))
def test_bug_twin_fails_exactly_the_check_that_names_it(bug):
    pattern, check = unusual.BUGS[bug]
    s = subject(pattern, bug)
    before = ModelSnapshot.take(s.model)
    report = quiet_run(s, QUICK)
    assert set(failed(report)) == {check}, failed(report)
    assert before.differences(ModelSnapshot.take(s.model)) == []  # not even the twin's cache stays behind


# ---- 1. pixel statistics only on pixel tensors ---------------------------------------------------
def test_input_sanity_judges_the_first_convolution_not_a_projection_image_module():
    s = subject("projection_image_module")  # image_module "proj" sees ReLU features in [0, 0.x]
    f = run_check(s, get_check("input_sanity"))
    assert f.status is Status.PASS, f.summary
    assert "cnn.features.0.0" in f.summary and f.metrics["image_min"] < 0  # normalized pixels, not features


def test_input_sanity_passes_normalization_and_divide_by_255_inside_forward():
    for name in ("normalize_inside", "divide_255_inside"):
        f = run_check(subject(name), get_check("input_sanity"))
        assert f.status is Status.PASS, (name, f.summary)
    s = subject("divide_255_inside")
    assert float(s.images.max()) > 200  # capdiag fed what pixel_scale=255 declares


def test_input_sanity_never_blames_the_user_for_capdiags_own_batch():
    # A model that normalizes inside forward, without hints: capdiag assumed ImageNet-normalized
    # inputs, so the double normalization is its own doing: a warning that names the hint to set.
    m = unusual.build("normalize_inside")
    m.capdiag_hints = {k: v for k, v in m.capdiag_hints.items() if k not in ("image_mean", "image_std")}
    f = run_check(capdiag.subject_for(m, **m.capdiag_hints), get_check("input_sanity"))
    assert f.status is Status.WARN and "synthetic batch" in f.summary and "image_mean" in f.hint
    # With declared hints that contradict the model it fails (the zoo twin normalizes again).
    f = run_check(capdiag.subject_for(zoo.make("gru", "normalizes_again"), **zoo.HINTS), get_check("input_sanity"))
    assert f.status is Status.FAIL and "twice" in f.summary


# ---- 2. attribution without a pixel gradient ------------------------------------------------------
def test_attribution_attributes_at_image_module_when_the_encoder_runs_under_no_grad():
    s = subject("frozen_nograd_encoder")
    f = run_check(s, get_check("attribution"))
    assert f.status is Status.PASS, f.summary
    assert "output of 'encoder'" in f.summary and f.metrics["image_share"] > 0.05


def test_gradient_reachability_warns_on_an_encoder_frozen_only_by_no_grad():
    class NoGradOnly(Wrapped):  # requires_grad left True, encoder run under no_grad
        def forward(self, images, captions):
            with torch.no_grad():
                regions = self.inner.encoder(images)
            return self.inner._gru(self.inner.proj(regions), captions)

    f = run_check(wrapped_subject(NoGradOnly()), get_check("gradient_reachability"))
    assert f.status is Status.WARN and "torch.no_grad()" in f.summary
    f = run_check(capdiag.subject_for(zoo.make("gru", "detached_image"), **zoo.HINTS), get_check("gradient_reachability"))
    assert f.status is Status.FAIL  # a .detach() is still a cut path


# ---- 3, 4. length-sorted decoders, dropout with sorting -------------------------------------------
@pytest.mark.parametrize("name", ["sorted_tutorial_lstm", "dropout_sorted_lstm", "packed_lstm_bos0"])
def test_length_sorted_decoders_pass_the_structural_checks(name):
    s = subject(name)
    for check in ("causal_leak", "caption_dependence", "padding_invariance", "batch_independence"):
        f = run_check(s, get_check(check))
        assert f.status is Status.PASS, (check, f.summary)
    f = run_check(s, get_check("caption_dependence"))
    assert f.metrics["fraction_dependent_eval"] == 1.0


def test_causal_leak_still_fails_a_missing_mask_in_both_modes(zoo_subject):
    f = run_check(zoo_subject("transformer", "no_causal_mask"), get_check("causal_leak"))
    assert f.status is Status.FAIL and f.metrics["train_mode_judged"] == 1.0


# ---- 5. in-place edits are reported once ----------------------------------------------------------
def test_a_forward_that_edits_captions_in_place_fails_input_mutation_only():
    class EditsCaptions(Wrapped):
        def forward(self, images, captions):
            captions[captions == zoo.EOS] = zoo.PAD  # "strip EOS from the inputs", on the caller's tensor
            return self.inner(images, captions)

    report = quiet_run(wrapped_subject(EditsCaptions("transformer")), QUICK)
    assert set(failed(report)) == {"input_mutation"}, failed(report)


# ---- 6. reentrant checkpointing: backward in the forward's mode -----------------------------------
def test_reentrant_checkpointing_with_batchnorm_is_batch_independent():
    f = run_check(subject("reentrant_checkpoint"), get_check("batch_independence"))
    assert f.status is Status.PASS, f.summary
    assert f.metrics["grad_other_samples_over_own"] == 0.0


# ---- 7. the user's exception is a finding, capdiag's own an error ---------------------------------
class GenerateRaises(Wrapped):
    def generate(self, images, max_len=12):
        ids = torch.zeros(images.shape[0], 1)  # float ids: the bug
        return self.inner.embed.weight[ids]  # IndexError: tensors used as indices must be long


def test_a_model_that_raises_fails_the_check_naming_the_call_and_the_users_line():
    s = wrapped_subject(GenerateRaises())
    f = run_check(s, get_check("eval_determinism"))
    assert f.status is Status.FAIL, f.summary
    assert "generate() raised IndexError" in f.summary and "test_trust.py" in f.summary


def test_capdiags_own_crash_stays_an_error(zoo_subject):
    from capdiag.check import Check

    class Broken(Check):
        name = "broken"

        def run(self, s):
            return s.captioner.logits(s.images, s.captions)[:, :, 10_000]  # capdiag's own indexing bug

    f = run_check(zoo_subject(), Broken())
    assert f.status is Status.ERROR


# ---- 8. attribution finds the embedding the forward calls -----------------------------------------
def test_token_embedding_is_the_one_called_with_the_caption_ids():
    from capdiag.checks.attribution import token_embedding

    class Decoy(nn.Module):  # the decoy comes first in named_modules(), where the old lookup stopped
        def __init__(self):
            super().__init__()
            self.old_vocab = nn.Embedding(zoo.VOCAB, 8).requires_grad_(False)  # kept from an earlier run, unused
            self.inner = zoo.make("gru")

        def forward(self, images, captions):
            return self.inner(images, captions)

    s = wrapped_subject(Decoy())
    name, _ = token_embedding(s.captioner, s.images, s.captions)
    assert name == "inner.embed"


# ---- 9-11 on the references: no false alarm from the new probes ----------------------------------
@pytest.mark.parametrize("family", ["cnn_transformer", "show_attend_tell"])
def test_new_probes_pass_the_reference_models(family):
    from capdiag.intake.discover import load_model_file
    from capdiag.intake.subject import make_subject

    s = make_subject(load_model_file(f"capdiag.models.{family}"))
    for check in ("batch_independence", "eval_determinism", "frozen_drift"):
        f = run_check(s, get_check(check))
        assert not f.status.failed, (check, f.summary)


def test_generate_returning_ragged_lists_is_padded_not_truncated_to_its_first_caption():
    from capdiag.captioner import generated_ids

    ids = generated_ids([[1, 5, 2], [1, 2]], 2, 0, "cpu")  # one list per image, as beam searches return
    assert ids.tolist() == [[1, 5, 2], [1, 2, 0]]
    assert generated_ids((torch.ones(2, 3), torch.zeros(2, 3, 4)), 2, 0, "cpu").shape == (2, 3)  # (ids, alphas)

    class RaggedGenerate(Wrapped):
        def generate(self, images, max_len=12):
            return [[int(t) for t in row if t != zoo.PAD] for row in self.inner.generate(images, max_len)]

    report = quiet_run(wrapped_subject(RaggedGenerate()),
                       ["batch_independence", "eval_determinism", "input_mutation"])
    assert not failed(report), failed(report)

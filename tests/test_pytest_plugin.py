"""The pytest plugin, driven with pytest's own pytester."""
from __future__ import annotations

import sys

import pytest
import procs

MODEL = """
from capdiag.testing import zoo
CAPDIAG = dict(zoo.HINTS)
def build_model(bug=None):
    return zoo.make("gru", bug)
"""


def test_quick_checks_pass_on_clean_model(pytester):
    pytester.makepyfile(model=MODEL)
    result = pytester.runpytest("--capdiag", "model.py", "--capdiag-quick", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=10, skipped=4)  # loss/metric sanity, pretrained_guard, frozen_drift: nothing to judge
    result.stdout.no_fnmatch_line("*overfit*PASSED*")


def test_bug_twin_fails_with_readable_message_and_junit(pytester):
    pytester.makepyfile(model=MODEL)
    result = pytester.runpytest("--capdiag", "model.py", "--capdiag-quick", "--capdiag-arg", "bug=detached_image",
                                "--junitxml=out.xml", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] >= 1
    result.stdout.fnmatch_lines(["*capdiag gradient_reachability: FAIL: * get no gradient from the caption loss*",
                                 "*fix: These parameters are cut off from the loss*"])
    assert "Traceback" not in result.stdout.str()
    xml = (pytester.path / "out.xml").read_text()
    assert 'name="gradient_reachability"' in xml and "<failure" in xml


def test_k_selection_and_markers(pytester):
    pytester.makepyfile(model=MODEL)
    result = pytester.runpytest("--capdiag", "model.py", "-k", "causal_leak or padding", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result = pytester.runpytest("--capdiag", "model.py", "-m", "capdiag_quick and not gradient", "--co", "-q")
    assert "overfit" not in result.stdout.str() and "causal_leak" in result.stdout.str()


def test_full_set_includes_training_checks(pytester):
    pytester.makepyfile(model=MODEL)
    result = pytester.runpytest("--capdiag", "model.py", "-k", "overfit or image_ablation", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_loading_error_fails_items_with_one_line(pytester):
    pytester.makepyfile(model="def build_model():\n    raise ValueError('no config')\n")
    result = pytester.runpytest("--capdiag", "model.py", "-k", "causal_leak", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*could not load model.py: build_model() raised ValueError: no config*"])


def test_fixtures_and_check_functions(pytester):
    pytester.makepyfile(test_user="""
        from capdiag.testing import zoo
        from capdiag.testing import assert_passes, assert_fails, check_causal_leak, check_batch_independence

        def test_mine(capdiag_subject, capdiag_batch):
            images, captions = capdiag_batch(zoo.VOCAB, n=4, image_size=32)
            assert images.shape == (4, 3, 32, 32)
            subject = capdiag_subject(zoo.make("transformer"), **zoo.HINTS)
            assert_passes(check_causal_leak(subject))
            assert_fails(check_causal_leak(capdiag_subject(zoo.make("transformer", "no_causal_mask"), **zoo.HINTS)))
            assert_passes(check_batch_independence(subject))
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_plugin_costs_nothing_when_unused():
    code = ("import sys, capdiag.pytest_plugin; "
            "print([m for m in ('torch', 'matplotlib', 'captum', 'tensorboard') if m in sys.modules])")
    out = procs.run([sys.executable, "-c", code], timeout=120, check=True).stdout.strip()
    assert out == "[]"


def test_reference_model_by_module_name_clean_and_twin(pytester):
    clean = pytester.runpytest("--capdiag", "capdiag.models.cnn_transformer", "--capdiag-quick", "-p", "no:cacheprovider")
    outcomes = clean.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes["passed"] >= 11
    twin = pytester.runpytest("--capdiag", "capdiag.models.cnn_transformer", "--capdiag-quick",
                              "--capdiag-arg", "bug=no_causal_mask", "-p", "no:cacheprovider")
    twin.assert_outcomes(passed=outcomes["passed"] - 1, failed=1, skipped=outcomes.get("skipped", 0))
    twin.stdout.fnmatch_lines(["*capdiag causal_leak: FAIL: logits at position * change when tokens after position *",
                               "*fix: Pass a causal mask to the decoder*"])


def test_the_plugin_takes_the_clis_model_and_check_options(pytester):
    """One option table (capdiag/options.py): every CLI model and check option is --capdiag-NAME here."""
    import torch

    from capdiag.options import MODEL as MODEL_OPTIONS, SELECT
    from capdiag.testing import zoo

    pytester.makepyfile(model=MODEL)
    torch.save({"state_dict": {f"module.{k}": v for k, v in zoo.make("gru").state_dict().items()}}, pytester.path / "w.ckpt")
    result = pytester.runpytest("--capdiag", "model.py", "--capdiag-only", "causal_leak,input_mutation",
                                "--capdiag-skip", "input_mutation", "--capdiag-weights", "w.ckpt", "--capdiag-seed", "3",
                                "--capdiag-precision", "float32", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*causal_leak PASSED*"])
    bad = pytester.runpytest("--capdiag", "model.py", "--capdiag-only", "causal_leek", "-p", "no:cacheprovider")
    assert bad.ret != 0 and "did you mean causal_leak" in bad.stderr.str() + bad.stdout.str()
    helptext = pytester.runpytest("--help").stdout.str()
    for o in MODEL_OPTIONS + SELECT:
        assert f"--capdiag-{o.name}" in helptext

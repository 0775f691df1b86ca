"""decoding_consistency on decoders whose generate() does more than greedy decoding, and on their
decoding-only twins (``capdiag.testing.decoding``): clean beam searches, a KV cache and a batched loop
with a per-sample done mask pass; the twins fail, localized to generate()'s loop."""
from __future__ import annotations

import warnings

import pytest

import capdiag
from capdiag.finding import Status
from capdiag.testing import decoding

# The two beam-search twins are caught only on some seeds (their captions on a confident copy match a
# correct search's): listed in the README as not reliably named yet.
NAMED = ["stop_on_any_eos", "encoder_cached_in_generate", "image_only_at_step0", "kv_positions_stuck"]


def check(model, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = capdiag.subject_for(model, seed=seed, **model.capdiag_hints)
        return capdiag.run_checks(s, ["decoding_consistency"]).findings[0]


@pytest.mark.parametrize("name", list(decoding.PATTERNS))
def test_clean_decoders_pass(name):
    f = check(decoding.build(name))
    assert f.status is Status.PASS, f.summary


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", list(decoding.PATTERNS))
def test_clean_decoders_pass_at_more_seeds(name, seed):
    f = check(decoding.build(name, seed=seed), seed)
    assert f.status is Status.PASS, f.summary


@pytest.mark.parametrize("bug", NAMED)
def test_decoding_twins_fail_at_generates_loop(bug):
    pattern, _ = decoding.BUGS[bug]
    f = check(decoding.build(pattern, bug))
    assert f.status is Status.FAIL, f.summary
    assert f.location is not None and f.location.file.endswith("decoding.py") and f.location.line
    assert "generate()'s loop" in f.location.evidence


def test_batched_stop_is_named_as_alone_vs_batch():
    f = check(decoding.build("batched_greedy", "stop_on_any_eos"))
    assert "decoded alone get another caption" in f.summary


def test_cached_encoder_in_generate_is_carried_state():
    f = check(decoding.build("batched_greedy", "encoder_cached_in_generate"))
    assert "state is carried between calls" in f.summary and f.metrics["captions_changed_by_earlier_call"] > 0


def test_kv_positions_stuck_departs_from_the_forward():
    f = check(decoding.build("kv_cache", "kv_positions_stuck"))
    assert "scores lower than its own greedy and beam-3" in f.summary
    assert "first symptom" in f.location.evidence and "decoding step" in f.location.evidence

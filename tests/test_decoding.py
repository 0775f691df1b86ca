"""decoding_consistency on decoders whose generate() does more than greedy decoding, and on their
decoding-only twins (``capdiag.testing.decoding``): clean beam searches, a KV cache and a batched loop
with a per-sample done mask pass; the twins fail, localized to generate()'s loop."""
from __future__ import annotations

import warnings

import pytest

import capdiag
from capdiag.finding import Status
from capdiag.testing import decoding

NAMED = list(decoding.BUGS)  # at seed 0; the LSTM beam that keeps its state by slot is named at 2 of 3 seeds


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


# Twins whose cause is traced to its line (state stored on self, position ids that do not advance);
# the others are located at the line of generate()'s loop that runs the decoder ("called from").
TRACED = {"encoder_cached_in_generate": "self._memory = self.encode(images)", "kv_positions_stuck": "self.pos.weight[pos]"}


@pytest.mark.parametrize("bug", NAMED)
def test_decoding_twins_fail_at_their_origin_or_generates_loop(bug):
    pattern, _ = decoding.BUGS[bug]
    f = check(decoding.build(pattern, bug))
    assert f.status is Status.FAIL, f.summary
    assert f.location is not None and f.location.file.endswith("decoding.py") and f.location.line
    if bug in TRACED:
        assert f.location.kind == "origin" and TRACED[bug] in f.location.code, f.location
    else:
        assert f.location.kind == "called from" and "generate()'s loop" in f.location.evidence


def test_batched_stop_is_named_as_alone_vs_batch():
    f = check(decoding.build("batched_greedy", "stop_on_any_eos"))
    assert "decoded alone get another caption" in f.summary


def test_cached_encoder_in_generate_is_carried_state():
    f = check(decoding.build("batched_greedy", "encoder_cached_in_generate"))
    assert "state is carried between calls" in f.summary and f.metrics["captions_changed_by_earlier_call"] > 0


def test_kv_positions_stuck_departs_from_the_forward():
    f = check(decoding.build("kv_cache", "kv_positions_stuck"))
    assert "scores lower than its own greedy and beam-3" in f.summary
    assert "the position index does not advance with the step" in f.location.evidence


def test_beam_without_causal_mask_is_seen_in_the_step_logits():
    f = check(decoding.build("beam_transformer", "beam_without_causal_mask"))
    assert "differ from the forward's at the same prefix" in f.summary
    assert f.metrics["max_step_logprob_gap"] > 100 * f.metrics["noise_floor"]
    clean = check(decoding.build("beam_transformer"))
    assert clean.metrics["max_step_logprob_gap"] < clean.metrics["noise_floor"]


def test_a_beam_that_keeps_its_state_by_slot_returns_captions_it_never_scored():
    f = check(decoding.build("beam_lstm", "beam_state_not_reordered"))
    assert "not sequences whose steps generate() computed" in f.summary and f.metrics["stray_captions"] >= 2
    assert check(decoding.build("beam_lstm")).metrics["stray_captions"] == 0

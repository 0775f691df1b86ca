"""A user's own test file: capdiag checks on their captioner, in plain pytest.

    pytest examples/pytest/test_my_captioner.py
"""
import pytest

from capdiag.testing import zoo
from capdiag.testing import assert_passes, check_batch_independence, check_causal_leak, check_overfit

HINTS = dict(vocab_size=zoo.VOCAB, pad_id=zoo.PAD, bos_id=zoo.BOS, eos_id=zoo.EOS, image_size=32, image_module="encoder")


@pytest.fixture
def subject(capdiag_subject):
    return capdiag_subject(zoo.make("transformer"), **HINTS)  # replace with your own model


def test_decoder_is_causal(subject):
    assert_passes(check_causal_leak(subject))


def test_samples_do_not_mix(subject):
    assert_passes(check_batch_independence(subject))


def test_memorizes_one_batch(subject):
    finding = assert_passes(check_overfit(subject, steps=300))
    assert finding.metrics["exact_match"] >= 0.9

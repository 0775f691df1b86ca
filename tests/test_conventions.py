"""The convention matrix: every check, on generated combinations of the contract's conventions
(``capdiag.testing.conventions``), returns a Finding whose status is never ERROR, and clean
combinations never FAIL. A sample runs by default; the full matrix is a slow test."""
from __future__ import annotations

import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import capdiag
from capdiag.finding import Status
from capdiag.registry import list_checks
from capdiag.testing import conventions as cv

ALL = [c.name for c in list_checks()]

CONVENTIONS = st.builds(
    cv.Conventions,
    image_out=st.sampled_from(cv.IMAGE_OUT), out=st.sampled_from(cv.OUT), shorter=st.booleans(),
    generate=st.sampled_from(cv.GENERATE), frozen=st.sampled_from(cv.FROZEN), grad_images=st.booleans(),
    zero_ids=st.booleans(), bn_head=st.booleans(), autocast=st.booleans(), dropout=st.sampled_from((0.0, 0.5)),
)


def judge(c: cv.Conventions, seed: int = 0) -> None:
    model = cv.build(c, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = capdiag.run_checks(capdiag.subject_for(model, seed=seed, **model.capdiag_hints), ALL)
    errors = [f"{f.check}: {f.summary}" for f in report.findings if f.status is Status.ERROR]
    assert not errors, f"check errors on {cv.describe(c)}: {errors}"
    if c.clean:
        fails = [f"{f.check}: {f.summary}" for f in report.findings if f.status is Status.FAIL]
        assert not fails, f"false alarms on the clean combination {cv.describe(c)}: {fails}"
    else:  # generate() raises: reported once, by the first check that calls it; the others are blocked
        raised = [f for f in report.findings if f.status is Status.FAIL]
        assert len(raised) == 1 and "raised RuntimeError: generate() is broken" in raised[0].summary, \
            [f"{f.check}: {f.status.value}: {f.summary}" for f in report.findings if f.status.failed]
        assert raised[0].location is not None and raised[0].location.line
        assert any(f.summary.startswith(f"blocked by {raised[0].check}") for f in report.findings)


# Combinations the trust issue named, always in the default run.
NAMED = [
    cv.Conventions(image_out="tuple", out="tuple", generate="none", frozen="requires_grad"),
    cv.Conventions(out="logprobs", generate="ragged", grad_images=False, image_out="dict"),
    cv.Conventions(zero_ids=True, bn_head=True, frozen="no_grad", shorter=True),
    cv.Conventions(autocast=True, dropout=0.5, image_out="output", out="output", frozen="frozen_bn"),
    cv.Conventions(generate="raises", frozen="train_override", out="dict"),
]


@pytest.mark.parametrize("c", NAMED, ids=cv.describe)
def test_named_combinations(c):
    judge(c)


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(CONVENTIONS)
def test_convention_matrix_sample(c):
    judge(c)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(CONVENTIONS, st.integers(0, 2))
def test_convention_matrix_full(c, seed):
    judge(c, seed)

"""Property-based: random small captioners from a family, with and without each planted bug;
capdiag's verdicts must match the planted truth."""
from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import capdiag
from capdiag.finding import Status
from capdiag.testing import zoo
from capdiag.registry import list_checks

STRUCTURAL = ["loss_at_init", "input_mutation", "causal_leak", "caption_dependence", "batch_independence",
              "padding_invariance", "gradient_reachability", "eval_determinism", "input_sanity"]


@st.composite
def captioners(draw):
    arch = draw(st.sampled_from(zoo.ARCHS))
    bugs = [None] + [b for b, (archs, _) in zoo.BUGS.items() if arch in archs]
    bug = draw(st.sampled_from(bugs))
    width = draw(st.sampled_from([16, 32, 48]))
    seed = draw(st.integers(0, 10_000))
    return arch, bug, width, seed


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(captioners())
def test_verdicts_match_planted_truth(spec):
    arch, bug, width, seed = spec
    torch.manual_seed(seed)
    model = zoo.ZooCaptioner(arch, bug, d=width)
    subject = capdiag.subject_for(model, seed=seed % 97, **zoo.HINTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = capdiag.run_checks(subject, STRUCTURAL)
    status = {f.check: f.status for f in report.findings}
    assert Status.ERROR not in status.values(), [(f.check, f.summary) for f in report.findings]
    if bug is None:
        assert all(s is Status.PASS for s in status.values()), [(f.check, f.summary) for f in report.findings]
    else:
        target = zoo.BUGS[bug][1]
        assert status[target] is Status.FAIL, (bug, arch, width, [(f.check, f.summary) for f in report.findings])

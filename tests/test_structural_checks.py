"""Every structural check passes on clean zoo captioners and fails on its planted bug."""
from __future__ import annotations

import pytest

from capdiag.testing import zoo
from capdiag import ModelSnapshot, run_checks
from capdiag.finding import Status
from capdiag.registry import list_checks
from capdiag.runner import run_check

STRUCTURAL = [c.name for c in list_checks() if c.cheap]
BUG_CASES = [(bug, arch, check) for bug, (archs, check) in zoo.BUGS.items() for arch in archs]


@pytest.mark.parametrize("arch", zoo.ARCHS)
def test_clean_models_pass_every_structural_check(zoo_subject, arch):
    report = run_checks(zoo_subject(arch), STRUCTURAL)
    bad = {f.check: f.summary for f in report.findings if f.status not in (Status.PASS, Status.SKIP)}
    assert not bad, bad


@pytest.mark.parametrize("bug,arch,check", BUG_CASES, ids=[f"{b}-{a}" for b, a, _ in BUG_CASES])
def test_planted_bug_fails_its_check(zoo_subject, bug, arch, check):
    from capdiag import get_check

    finding = run_check(zoo_subject(arch, bug), get_check(check))
    assert finding.status is Status.FAIL, finding.summary
    assert finding.hint, "a failing finding must explain the likely cause"


def test_failure_messages_name_the_cause(zoo_subject):
    from capdiag import get_check

    f = run_check(zoo_subject("transformer", "detached_image"), get_check("gradient_reachability"))
    assert "encoder" in f.summary and f.metrics["n_no_grad"] >= 8
    f = run_check(zoo_subject("transformer", "unused_module"), get_check("gradient_reachability"))
    assert "aux_head" in f.summary and f.metrics["n_no_grad"] == 2
    f = run_check(zoo_subject("lstm", "eval_free_running"), get_check("caption_dependence"))
    assert "eval mode" in f.summary and f.metrics["fraction_dependent_train"] == 1.0
    f = run_check(zoo_subject("transformer", "huge_init"), get_check("loss_at_init"))
    assert f.metrics["excess_over_ln_vocab"] > 2.0
    f = run_check(zoo_subject("gru", "nan_logits"), get_check("loss_at_init"))
    assert "non-finite" in f.summary and "nan" in f.summary


def test_nonfinite_logits_fail_other_checks_with_location(zoo_subject):
    from capdiag import get_check

    f = run_check(zoo_subject("transformer", "nan_logits"), get_check("causal_leak"))
    assert f.status is Status.FAIL and "non-finite logits" in f.summary


def test_inplace_model_cannot_corrupt_batch_shared_by_other_checks(zoo_subject):
    s = zoo_subject("gru", "inplace_normalize")
    before = s.images.clone()
    report = run_checks(s, STRUCTURAL)
    assert (s.images == before).all()
    failed = [f.check for f in report.findings if f.status.failed]
    assert failed == ["input_mutation"]


@pytest.mark.parametrize("arch,bug", [("transformer", None), ("lstm", "eval_dropout"), ("gru", "nan_logits")])
def test_checks_leave_model_and_rng_untouched(zoo_subject, arch, bug):
    import random

    import numpy as np
    import torch

    s = zoo_subject(arch, bug)
    s.model.train()  # a mode the checks switch away from
    s.model.encoder.net[1].eval()  # and a mixed one that must come back exactly
    torch.manual_seed(123), random.seed(1), np.random.seed(2)
    before = ModelSnapshot.take(s.model)
    run_checks(s, STRUCTURAL)
    after = ModelSnapshot.take(s.model)
    assert before.differences(after) == []


def test_crashing_check_becomes_error_and_others_still_run(zoo_subject):
    from capdiag.check import Check

    class Boom(Check):
        name = "boom"

        def run(self, subject):
            raise RuntimeError("kaboom")

    report = run_checks(zoo_subject(), [Boom(), "loss_at_init"])
    assert [f.status for f in report.findings] == [Status.ERROR, Status.PASS]
    assert "kaboom" in report.findings[0].summary

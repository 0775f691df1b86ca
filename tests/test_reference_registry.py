"""Every reference family through the registry: the clean model (in each variant a bug is planted
in) passes the check that names the bug, and the twin, which differs only by that bug, fails it."""
from __future__ import annotations

import pytest

from capdiag import get_check, list_checks
from capdiag.finding import Status
from capdiag.models import registry
from capdiag.runner import run_checks

QUICK = [c.name for c in list_checks() if c.cheap]
CASES = [pytest.param(*case, id=f"{case[0]}-{case[1]}",
                      marks=[] if get_check(case[2]).cheap else [pytest.mark.slow])
         for case in registry.planted()]


def _available(name: str, variant: str) -> None:
    missing = registry.get(name).missing(variant)
    if missing:
        pytest.skip(f"{name} ({variant}) needs {', '.join(missing)}")


@pytest.fixture(scope="module")
def clean_quick():
    cache = {}

    def get(name, variant):
        if (name, variant) not in cache:
            cache[name, variant] = {f.check: f for f in run_checks(registry.subject(name, variant=variant), QUICK).findings}
        return cache[name, variant]

    return get


@pytest.mark.parametrize("name", registry.list_models())
def test_clean_reference_passes_every_quick_check(name, clean_quick):
    _available(name, "tiny")
    bad = {n: f.summary for n, f in clean_quick(name, "tiny").items() if f.status not in (Status.PASS, Status.SKIP)}
    assert not bad


@pytest.mark.parametrize("name,bug,check,variant", CASES)
def test_twin_fails_the_check_that_names_its_bug(name, bug, check, variant, clean_quick):
    _available(name, variant)
    clean = clean_quick(name, variant)[check] if check in QUICK else \
        run_checks(registry.subject(name, variant=variant), [check]).findings[0]
    assert clean.status in (Status.PASS, Status.SKIP), clean.summary
    twin = run_checks(registry.subject(name, bug), [check]).findings[0]
    assert twin.status is Status.FAIL, twin.summary
    assert twin.hint


def test_a_twin_differs_from_its_clean_model_only_by_the_bug():
    """Same variant, same architecture: the xavier twin no longer swaps its encoder."""
    for name, bug, _, variant in registry.planted():
        if registry.get(name).missing(variant):
            continue
        clean, twin = registry.create(name, variant=variant), registry.create(name, bug)
        assert [(n, type(m).__name__) for n, m in clean.named_modules()] == \
            [(n, type(m).__name__) for n, m in twin.named_modules()], (name, bug)


def test_unknown_reference_names_are_refused_with_the_registered_ones():
    with pytest.raises(KeyError, match="registered: .*cnn_transformer"):
        registry.create("resnet_lstm")

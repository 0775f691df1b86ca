"""Plain-pytest helpers: importable check functions that return findings, and assertions.

    from capdiag.testing import assert_passes, check_causal_leak
    def test_my_captioner_is_causal(capdiag_subject):
        assert_passes(check_causal_leak(capdiag_subject(MyCaptioner(), vocab_size=1000)))

``check_<name>(subject, **options)`` exists for every registered check.

The package also holds the fixtures capdiag's own tests and benchmarks use, each a family with
``build(name, bug=None, seed=0)``, ``PATTERNS`` (clean members) and ``BUGS`` (twins -> the check that
must name them): ``zoo`` (tiny one-bug captioners), ``unusual`` (20 clean patterns), ``strangers``
(15 clean captioners in other people's styles), ``decoding`` (decoders and their decoding twins),
``held_out`` (the localization classes once missed), ``vlm`` (tiny vision-language captioner folders
and collators), ``conventions`` (the convention matrix) and
``planted_sites`` (where each planted bug lives, for judging locations).
"""
from __future__ import annotations

from ..finding import Finding, Status


class CheckFailed(AssertionError):
    """A finding that should have passed; the message is the finding's summary and fix."""


def run(name: str, subject, **options) -> Finding:
    from ..registry import get_check
    from ..runner import run_check

    return run_check(subject, get_check(name, **options))


def explain(f: Finding) -> str:
    text = f"capdiag {f.check}: {f.status.value.upper()}: {f.summary}"
    if f.location is not None:
        text += f"\n  at: {f.location.where()}: {f.location.said()}"
    if f.hint:
        text += f"\n  fix: {f.hint}"
    return text


def assert_passes(finding: Finding, allow_warn: bool = True, allow_skip: bool = False) -> Finding:
    """Raise ``CheckFailed`` (an AssertionError) with the explanation unless the finding passed."""
    ok = {Status.PASS} | ({Status.WARN} if allow_warn else set()) | ({Status.SKIP} if allow_skip else set())
    if finding.status not in ok:
        raise CheckFailed(explain(finding))
    return finding


def assert_fails(finding: Finding) -> Finding:
    if finding.status is not Status.FAIL:
        raise CheckFailed(f"expected {finding.check} to fail, got {finding.status.value}: {finding.summary}")
    return finding


def __getattr__(name: str):
    if name.startswith("check_"):
        check = name[len("check_"):]

        def fn(subject, **options) -> Finding:
            return run(check, subject, **options)

        fn.__name__ = name
        fn.__doc__ = f"Run capdiag's {check} check on a Subject and return its Finding."
        return fn
    raise AttributeError(name)

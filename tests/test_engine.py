"""One engine: verdicts do not depend on which checks run or in what order, and the engine
(capdiag/) depends on no check."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from capdiag import get_check, list_checks
from capdiag.runner import run_check, run_checks
from capdiag.measure.training import Recipe

ROOT = Path(__file__).resolve().parents[1]


def _metrics(f) -> dict:
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in f.metrics.items() if k not in ("seconds", "seconds_per_step")}


def test_every_full_check_agrees_alone_and_inside_the_whole_suite(zoo_subject):
    """The learned copy is one property of the subject (training.RECIPE), not whatever overfit left
    behind: ``--only image_ablation`` and the full run judge the same copy."""
    def subject():
        s = zoo_subject("lstm")
        s.recipe = Recipe(steps=120)  # the property does not depend on the budget; CI time does
        return s

    suite = {f.check: f for f in run_checks(subject(), [c.name for c in list_checks()]).findings}
    full = [c.name for c in list_checks() if not c.cheap]
    assert {"overfit", "image_ablation", "attention_maps", "attribution", "decoding_consistency"} <= set(full)
    for name in full:
        alone = run_check(subject(), get_check(name))
        assert alone.status == suite[name].status, (name, alone.summary, suite[name].summary)
        assert _metrics(alone) == _metrics(suite[name]), name


def test_the_engine_imports_no_check():
    pattern = re.compile(r"^\s*(from\s+(capdiag\.checks|checks)\b|import\s+(capdiag\.checks|checks)\b)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "capdiag").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_a_json_only_run_draws_nothing(tmp_path):
    """Checks compute; only a front end that asks for pictures renders them (and imports matplotlib)."""
    import sys

    import procs

    code = ("import sys, capdiag\n"
            "from capdiag.cli import main\n"
            f"rc = main(['check', {str(ROOT / 'examples/minimal_model.py')!r}, '--only', 'gradient_flow,image_ablation', "
            f"'--json', {str(tmp_path / 'f.json')!r}])\n"
            "print('matplotlib' in sys.modules, rc)\n")
    out = procs.run([sys.executable, "-c", code], timeout=300, cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "False 0", out.stdout + out.stderr
    assert not list(tmp_path.glob("**/*.png"))


def test_one_user_code_rule_with_installed_packages_as_a_parameter():
    import transformers

    from capdiag import usercode

    installed = transformers.__file__
    assert not usercode.is_user(installed) and usercode.is_user(installed, installed=True)
    assert not usercode.is_user(usercode.__file__) and not usercode.is_user(torch.__file__)
    from capdiag.models import cnn_transformer
    from capdiag.testing import zoo

    assert usercode.is_user(cnn_transformer.__file__) and usercode.is_user(zoo.__file__)  # stand-ins for model files
    assert usercode.is_user("/home/me/project/model.py") and not usercode.is_user("<string>")


def test_one_prefix_stripper_finds_wrapper_prefixes_of_any_depth():
    from capdiag.intake.checkpoints import strip_prefix

    own = {"a.weight": 1, "b.0.bias": 2}
    assert strip_prefix({"module.a.weight": 1, "module.b.0.bias": 2}, own) == ({"a.weight": 1, "b.0.bias": 2}, "module.")
    assert strip_prefix({"model.net.a.weight": 1, "model.net.b.0.bias": 2}, own)[1] == "model.net."
    assert strip_prefix(own, own) == (own, "")

"""The README stays true: its check table matches the registry, its example model passes."""
from __future__ import annotations

import re
from pathlib import Path

from capdiag.cli import checks_markdown, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_check_table_matches_registry():
    block = re.search(r"<!-- checks-table.*?-->\n(.*?)\n<!-- end checks-table -->", README, re.S).group(1)
    assert block.strip() == checks_markdown().strip()


def test_readme_example_is_the_example_file_and_passes(capsys):
    src = (ROOT / "examples/minimal_model.py").read_text()
    body = src.split('"""', 2)[2].strip()
    assert body in README
    assert main(["check", str(ROOT / "examples/minimal_model.py"), "--quick"]) == 0


def test_readme_first_commands_and_ci_agree():
    first = README.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [l.split("#")[0].strip() for l in first] == ["./dev demo", "./dev test"]
    ci = (ROOT / ".ci/run").read_text()
    assert "./dev test" in ci


def test_bad_input_table_matches_the_tested_cases():
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from bad_inputs import CASES

    block = re.search(r"<!-- bad-input-table.*?-->\n(.*?)\n<!-- end bad-input-table -->", README, re.S).group(1)
    rows = block.strip().splitlines()[2:]
    assert rows == [f"| {what} | `...{exp}...` |" for _, what, _, _, exp in CASES]

"""The CLI: exit codes, one-line errors for bad model files, JSON output, ./model.py default."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from capdiag.cli import main

TESTS = Path(__file__).parent
GOOD = """
from capdiag.models import zoo
CAPDIAG = dict(zoo.HINTS)
def build_model(bug=None, arch="transformer"):
    return zoo.make(arch, bug)
"""


def write(tmp_path: Path, body: str, name: str = "model.py") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return str(p)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_clean_model_exits_0_and_json_has_every_check(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    js = tmp_path / "f.json"
    code, out, _ = run_cli(capsys, "check", path, "--quick", "--json", str(js))
    assert code == 0, out
    data = json.loads(js.read_text())
    assert {c["check"] for c in data["checks"]} >= {"causal_leak", "loss_at_init", "padding_invariance"}
    assert all({"check", "status", "summary", "metrics"} <= set(c) for c in data["checks"])
    assert "PASS" in out and "checks:" in out


def test_check_buggy_model_exits_1_and_names_check(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    code, out, _ = run_cli(capsys, "check", path, "--quick", "--arg", "bug=no_causal_mask")
    assert code == 1
    assert "FAIL  causal_leak" in out and "fix:" in out


def test_only_and_skip(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    code, out, _ = run_cli(capsys, "check", path, "--only", "causal_leak,eval_determinism", "--skip", "eval_determinism")
    assert code == 0 and "causal_leak" in out and "eval_determinism" not in out and "1 checks" in out


def test_default_model_file_is_dot_model_py(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "check", "--quick")
    assert code == 2 and "./model.py does not exist" in err
    write(tmp_path, GOOD)
    code, out, _ = run_cli(capsys, "check", "--only", "causal_leak")
    assert code == 0 and "model.py" in out


BAD_FILES = {
    "syntax": ("def build_model(:\n    pass\n", "syntax error"),
    "import": ("import definitely_not_a_module_xyz\n", "No module named 'definitely_not_a_module_xyz'"),
    "no_factory": ("def make():\n    pass\n", "defines no build_model()"),
    "factory_raises": ("def build_model():\n    raise ValueError('bad config')\n", "build_model() raised ValueError: bad config"),
    "not_module": ("def build_model():\n    return 3\n", "expected a torch.nn.Module"),
    "forward_raises": (
        "import torch\nclass M(torch.nn.Module):\n    def forward(self, images, captions):\n"
        "        raise RuntimeError('oops in forward')\ndef build_model():\n    return M()\n",
        "forward raised RuntimeError: oops in forward",
    ),
    "wrong_shape": (
        "import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.l = torch.nn.Linear(3, 30)\n    def forward(self, images, captions):\n"
        "        return self.l(images.mean((2, 3)))\ndef build_model():\n    return M()\n",
        "expected (B, T, V)",
    ),
    "wrong_vocab": (
        GOOD + "CAPDIAG['vocab_size'] = 99\n", "CAPDIAG['vocab_size'] is 99",
    ),
    "bad_hint_module": (GOOD + "CAPDIAG['image_module'] = 'encodr'\n", "did you mean encoder"),
    "unknown_hint": (GOOD + "CAPDIAG['vocab'] = 3\n", "unknown keys ['vocab']"),
    "bad_sample_batch": (
        GOOD + "import torch\ndef sample_batch():\n    return torch.zeros(2, 3, 32, 32), torch.zeros(2, 7)\n",
        "captions are torch.float32 (2, 7); expected a long tensor",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_model_files_exit_2_with_one_line(tmp_path, capsys, case):
    body, expected = BAD_FILES[case]
    path = write(tmp_path, body)
    code, out, err = run_cli(capsys, "check", path, "--quick")
    assert code == 2, (out, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("capdiag: error:"), err
    assert expected in lines[0], lines[0]


def test_forward_error_shows_users_frame(tmp_path, capsys):
    path = write(tmp_path, BAD_FILES["forward_raises"][0])
    _, _, err = run_cli(capsys, "check", path)
    assert f"{path}:4 in forward" in err


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["check", "missing_file.py"], "not found"),
        (["check", "{GOOD}", "--only", "causal_leek"], "did you mean causal_leak"),
        (["check", "{GOOD}", "--arg", "nonsense"], "must look like NAME=VALUE"),
        (["overfit", "{GOOD}", "--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, argv, expected):
    good = write(tmp_path, GOOD)
    argv = [a.replace("{GOOD}", good) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and expected in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_cpu_machine_is_usage_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "check", write(tmp_path, GOOD), "--device", "cuda")
    assert code == 2 and "no usable CUDA GPU" in err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    path = write(tmp_path, BAD_FILES["syntax"][0])
    r = subprocess.run([sys.executable, "-m", "capdiag", "check", path], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "syntax error" in r.stderr
    r = subprocess.run([sys.executable, "-m", "capdiag", "check", path, "--debug"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_list_names_every_check(capsys):
    from capdiag.registry import list_checks

    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for c in list_checks():
        assert c.name in out

"""The CLI: exit codes, one-line errors for bad model files, JSON output, ./model.py default."""
from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from bad_inputs import CASES, EVIL_WEIGHTS, FORWARD_RAISES, GOOD
from capdiag.cli import main
import procs

TESTS = Path(__file__).parent
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


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    cid, _, body, argv, expected = case
    model = tmp_path / "model.py"
    if body is not None:
        model.write_text(textwrap.dedent(body))
    if cid in ("pickle_weights", "pickle_checkpoint"):
        import torch

        ns: dict = {}
        exec(EVIL_WEIGHTS, ns)
        torch.save(ns["Evil"](), tmp_path / "evil.pt")
    if cid == "data_no_tokenizer":
        from capdiag.intake.data import write_coco_folder

        write_coco_folder(tmp_path / "coco", 4, image_size=32)
    if cid == "hf_unknown":
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    argv = [a.replace("{model}", str(model)).replace("{dir}", str(tmp_path)) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("capdiag: error:"), err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "pwned").exists()  # nothing in a weights file ever runs


def test_forward_error_shows_users_frame(tmp_path, capsys):
    path = write(tmp_path, FORWARD_RAISES)
    _, _, err = run_cli(capsys, "check", path)
    assert f"{path}:4 in forward" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_cpu_machine_is_usage_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "check", write(tmp_path, GOOD), "--device", "cuda")
    assert code == 2 and "no usable CUDA GPU" in err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    path = write(tmp_path, "def build_model(:\n    pass\n")
    r = procs.run([sys.executable, "-m", "capdiag", "check", path])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "syntax error" in r.stderr
    r = procs.run([sys.executable, "-m", "capdiag", "check", path, "--debug"])
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_list_names_every_check(capsys):
    from capdiag.registry import list_checks

    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for c in list_checks():
        assert c.name in out


def test_overfit_command_passes_clean_and_diagnoses_blind_twin(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace('arch="transformer"', 'arch="gru"'))
    code, out, _ = run_cli(capsys, "overfit", path, "--steps", "500", "--out", str(tmp_path / "plots"))
    assert code == 0 and "PASS  overfit" in out and "memorized 16 captions" in out
    assert (tmp_path / "plots" / "overfit_loss.png").exists()
    code, out, _ = run_cli(capsys, "overfit", path, "--steps", "500", "--arg", "bug=image_blind")
    assert code == 1 and "image-blind floor" in out and "cannot see the image" in out


def test_overfit_names_device_precision_weights_and_data_as_check_does(tmp_path, capsys):
    import torch

    from capdiag.testing import zoo

    path = write(tmp_path, GOOD.replace('arch="transformer"', 'arch="gru"'))
    torch.save(zoo.make("gru").state_dict(), tmp_path / "w.pt")
    for command in (["overfit", path, "--steps", "2"], ["check", path, "--only", "causal_leak"]):
        code, out, _ = run_cli(capsys, *command, "--weights", str(tmp_path / "w.pt"), "--precision", "float32",
                               "--json", str(tmp_path / "f.json"))
        assert f"capdiag {command[0]} {path} on cpu in float32 (seed 0), weights {tmp_path / 'w.pt'}" in out
        data = json.loads((tmp_path / "f.json").read_text())
        assert data["device"] == "cpu" and data["precision"] == "float32" and str(tmp_path / "w.pt") in data["weights"]
        assert "data" in data


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA"))])
def test_precision_bfloat16_runs_the_checks_in_bf16_and_says_so(tmp_path, capsys, device):
    out = tmp_path / "f.json"
    code = main(["check", str(Path(__file__).resolve().parents[1] / "examples/minimal_model.py"), "--precision", "bfloat16",
                 "--device", device, "--only", "causal_leak,batch_independence,padding_invariance", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"on {device}" in printed and "in bfloat16" in printed  # the header says what precision the checks ran in
    data = json.loads(out.read_text())
    assert data["precision"] == "bfloat16" and data["device"].startswith(device)

"""The examples run, small, and tell the story they claim."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import procs

ROOT = Path(__file__).resolve().parents[1]


def _run_main(path: Path, argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


@pytest.mark.slow  # ~60 s; the flag itself is covered by test_monitor, the forum model by the next test
def test_forum_case_is_flagged_during_training_and_fixed_version_is_not(capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    flags = _run_main(ROOT / "examples/forum_case/train.py", ["--steps", "200"])
    out = capsys.readouterr().out
    assert [k for _, k, _ in flags] == ["image_ignored"]
    real, zeroed = [float(x.rstrip(",")) for x in out.split("probe loss with the images ")[1].split()[::4][:2]]
    assert abs(real - zeroed) < 1e-3  # zeroing the image changes nothing: the author's own test
    flags = _run_main(ROOT / "examples/forum_case/train.py", ["--steps", "200", "--fixed"])
    assert flags == []


def test_forum_case_capdiag_check_names_the_clobbered_encoder(capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    from capdiag.cli import main

    assert main(["check", str(ROOT / "examples/forum_case/model.py"), "--quick"]) == 1
    assert "FAIL  pretrained_guard" in capsys.readouterr().out
    assert main(["check", str(ROOT / "examples/forum_case/model.py"), "--quick", "--arg", "fixed=True"]) == 0


def test_lightning_example(tmp_path):
    pytest.importorskip("lightning")
    flags = _run_main(ROOT / "examples/lightning/train_sat.py", ["--steps", "30", "--root", str(tmp_path)])
    assert flags == []


def test_pytest_example_passes():
    r = procs.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "examples/pytest")],
                  cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "3 passed" in r.stdout


@pytest.mark.slow  # ~50 s; the script itself runs in the default set through the COCO-folder test below
def test_train_reference_reads_the_image_and_blind_twin_stays_at_floor(capsys):
    from capdiag.intake.data import BLIND_FLOOR

    good = _run_main(ROOT / "examples/train_reference.py", ["--model", "cnn_transformer", "--steps", "150",
                                                             "--val-every", "150", "--batch", "16"])
    assert good["val_loss"] < 0.7 * BLIND_FLOOR and good["bleu4"] > 0.25  # 150 steps: well below the floor
    blind = _run_main(ROOT / "examples/train_reference.py", ["--model", "cnn_transformer", "--bug", "image_not_fed",
                                                              "--steps", "80", "--val-every", "80", "--batch", "16"])
    assert blind["val_loss"] > 0.9 * BLIND_FLOOR and blind["bleu4"] < 0.2
    assert "greedy:" in capsys.readouterr().out


def test_train_reference_reads_a_coco_folder_with_gpt2_style_ids(tmp_path, capsys):
    """COCO-format input keeps the model's special ids where it expects them (GPT-2: one id)."""
    pytest.importorskip("transformers")
    import json

    from PIL import Image

    names = []
    for i, colour in enumerate(["red", "green", "blue", "red"]):
        rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230)}[colour]
        Image.new("RGB", (40, 40), rgb).save(tmp_path / f"{i}.png")
        names.append((i, colour))
    ann = {"images": [{"id": i, "file_name": f"{i}.png"} for i, _ in names],
           "annotations": [{"image_id": i, "caption": f"A {c} square."} for i, c in names]}
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    res = _run_main(ROOT / "examples/train_reference.py", ["--model", "clipcap", "--coco", str(tmp_path), "--ann",
                                                            str(tmp_path / "captions.json"), "--steps", "2",
                                                            "--batch", "2", "--val-every", "2"])
    assert res["step"] == 2 and res["val_loss"] > 0
    out = capsys.readouterr().out
    assert "ref: a red square" in out or "ref: a green square" in out or "ref: a blue square" in out

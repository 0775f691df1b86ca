"""The README's walk-through as a test: train a reference captioner with examples/train_reference.py
on a COCO-format folder, save it, and diagnose the checkpoint on that data; its image-blind twin,
trained the same way, fails with the caption-collapse and reliance numbers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from capdiag.cli import main
from capdiag.intake.data import write_coco_folder

pytest.importorskip("transformers")  # clip_decoder's vision tower
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def train(argv):
    spec = importlib.util.spec_from_file_location("train_reference", ROOT / "examples" / "train_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    ann = write_coco_folder(root / "data", 400, seed=0)
    out = {}
    for name, bug in (("clean", None), ("blind", "image_not_fed")):
        argv = ["--model", "clip_decoder", "--coco", str(root / "data"), "--ann", str(ann), "--steps", "300",
                "--val-every", "300", "--save", str(root / name)] + (["--bug", bug] if bug else [])
        out[name] = (train(argv), root / name)
    out["data"] = root / "data"
    return out


def check(runs, name, tmp_path, capsys, *extra):
    _, folder = runs[name]
    js = tmp_path / f"{name}.json"
    code = main(["check", "capdiag.models.clip_decoder", *extra, "--weights", str(folder / "model.pt"),
                 "--data", str(runs["data"]), "--tokenizer", str(folder / "wordmap.json"), "--json", str(js)])
    return code, capsys.readouterr().out, {c["check"]: c for c in json.loads(js.read_text())["checks"]}


def test_trained_reference_passes_on_its_data(runs, tmp_path, capsys):
    results, _ = runs["clean"]
    assert results["val_loss"] < 0.8  # it learned (the image-blind floor of one phrasing is 0.956)
    code, out, checks = check(runs, "clean", tmp_path, capsys)
    assert code == 0, out
    assert {c["status"] for c in checks.values()} <= {"pass", "skip"}, out
    assert checks["caption_collapse"]["status"] == "pass" and checks["word_grounding"]["status"] == "pass"
    assert checks["image_ablation"]["summary"].endswith("(the model as given (already trained))")


def test_image_blind_twin_trained_the_same_way_collapses(runs, tmp_path, capsys):
    code, out, checks = check(runs, "blind", tmp_path, capsys, "--arg", "bug=image_not_fed")
    assert code == 1
    collapse = checks["caption_collapse"]
    assert collapse["status"] == "fail"
    n = int(collapse["metrics"]["top_caption_count"])
    assert n >= 58 and f"{n} of 64 images get the caption" in collapse["summary"]
    assert collapse["metrics"]["image_reliance"] < 0.05
    assert checks["word_grounding"]["status"] == "fail" and checks["image_ablation"]["status"] == "fail"

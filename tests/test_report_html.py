"""The HTML report: self-contained, every section and plot present, rendered by a real browser."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from capdiag.cli import main
import procs

MODEL = """
from capdiag.testing import zoo
CAPDIAG = dict(zoo.HINTS)
def build_model(bug=None):
    return zoo.make("lstm", bug)
"""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "model.py").write_text(MODEL)
    code = main(["check", str(tmp / "model.py"), "--arg", "bug=att_softmax_wrong_dim", "--report", str(tmp / "html"),
                 "--out", str(tmp / "plots")])
    assert code == 1  # the planted bug fails attention_maps
    return tmp / "html" / "report.html"


def test_report_is_self_contained_with_every_section(report):
    from capdiag.registry import list_checks

    text = report.read_text()
    for c in list_checks():
        if "captioner" in c.subjects:  # the vision-language checks (label_sanity, ...) judge prompted captioners
            assert f'id="{c.name}"' in text, c.name
    assert "src=\"http" not in text and "<link" not in text  # nothing fetched from anywhere
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', text)
    assert {"overfit_loss", "gradient_flow", "image_ablation", "attention_words", "attribution_pixels",
            "input_batch"} <= set(imgs)
    assert "Likely cause and fix" in text and "softmax runs over the wrong dimension" in text
    # where it starts: the softmax line of the zoo's attention, shown in the failing section only
    assert text.count("Where it starts.") >= 1 and "alpha = torch.softmax(scores, dim=0)" in text
    assert "on cpu &middot; float32" in text  # what was judged, under the title


def test_report_header_names_the_weights_and_the_data(tmp_path):
    import torch

    from capdiag.intake.data import write_coco_folder
    from capdiag.testing import zoo

    (tmp_path / "model.py").write_text(MODEL)
    torch.save(zoo.make("lstm").state_dict(), tmp_path / "w.pt")
    write_coco_folder(tmp_path / "coco", 8, image_size=32)
    wm = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}
    (tmp_path / "wm.json").write_text(__import__("json").dumps(wm))
    main(["check", str(tmp_path / "model.py"), "--quick", "--only", "causal_leak", "--weights", str(tmp_path / "w.pt"),
          "--data", str(tmp_path / "coco"), "--tokenizer", str(tmp_path / "wm.json"), "--report", str(tmp_path / "html")])
    text = (tmp_path / "html" / "report.html").read_text()
    assert "weights " in text and "w.pt" in text and "data: COCO captions JSON" in text and "8 images, 24 captions" in text


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,2600",
           f"--screenshot={shot}", report.as_uri()]
    procs.run(cmd, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 50_000
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # a rendered page, not a blank one
    Path("capdiag-out").mkdir(exist_ok=True)
    shutil.copy(shot, Path("capdiag-out") / "report_screenshot.png")  # for a human to look at

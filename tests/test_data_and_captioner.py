"""Synthetic data and the captioner adapter's caption bookkeeping."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from capdiag.captioner import Captioner, CaptionSpec
from capdiag.intake.data import BLIND_FLOOR, SyntheticCaptions, empirical_blind_floor
import procs


def test_blind_floor_matches_large_sample():
    data = SyntheticCaptions(32)
    _, caps = data.batch(4000, seed=1)
    cap = Captioner(torch.nn.Identity(), CaptionSpec(32))
    # With thousands of captions, the empirical prefix-only optimum converges to the analytic floor.
    assert empirical_blind_floor(caps, cap.target_mask(caps)) == pytest.approx(BLIND_FLOOR, abs=0.02)
    assert BLIND_FLOOR == pytest.approx((math.log(2) + math.log(6) + 2 * math.log(4)) / 5.5)


def test_captions_are_determined_by_images():
    data = SyntheticCaptions(32, image_size=32)
    imgs, caps = data.batch(64, seed=3)
    # Same caption -> similar mean colour; different colour words -> different mean colour.
    colour_pos = [1 if data.id_to_word[int(c[1])] != "two" else 2 for c in caps]
    colours = [data.id_to_word[int(c[p])] for c, p in zip(caps, colour_pos)]
    img01 = data.denormalize(imgs)
    for col in set(colours):
        idx = [i for i, c in enumerate(colours) if c == col]
        sat = img01[idx].amax(1) - img01[idx].amin(1)  # saturated pixels = the shape
        assert (sat > 0.5).float().mean() > 0.01
    assert len({tuple(c.tolist()) for c in caps}) > 30


def test_word_ids_avoid_special_ids_and_check_vocab():
    data = SyntheticCaptions(50257, pad_id=50256, bos_id=50256, eos_id=50256)
    assert 50256 not in data.word_to_id.values()
    data = SyntheticCaptions(40, pad_id=0, bos_id=0, eos_id=1)
    assert not {0, 1} & set(data.word_to_id.values())
    from capdiag.errors import UsageError

    with pytest.raises(UsageError, match="too small"):
        SyntheticCaptions(10)


@pytest.mark.parametrize(
    "pad,bos,eos",
    [(0, 1, 2), (9, 9, 9), (0, 1, 0), (0, 0, 1)],  # distinct, GPT-2 (all equal), CLIP (eos == pad), BOS id 0
)
def test_lengths_with_coinciding_special_ids(pad, bos, eos):
    cap = Captioner(torch.nn.Identity(), CaptionSpec(20, pad_id=pad, bos_id=bos, eos_id=eos))
    caps = torch.tensor([
        [bos, 5, 6, eos, pad, pad],
        [bos, 5, 6, 7, 8, eos],
        [bos, 5, eos, pad, pad, pad],
    ])
    assert cap.lengths(caps).tolist() == [4, 6, 3]
    assert cap.target_mask(caps).sum().item() == 3 + 5 + 2


def test_loss_ignores_padding_and_bos():
    cap = Captioner(torch.nn.Identity(), CaptionSpec(10, pad_id=0, bos_id=1, eos_id=2))
    caps = torch.tensor([[1, 5, 2, 0, 0]])
    logits = torch.zeros(1, 4, 10)
    logits[0, 0, 5] = logits[0, 1, 2] = 50.0  # perfect on real tokens
    logits[0, 2:, 7] = 50.0  # confidently wrong on padding: must not count
    assert cap.loss_from_logits(logits, caps).item() < 1e-6


def test_output_forms_are_accepted():
    from capdiag.captioner import align_logits, extract_logits

    caps = torch.zeros(2, 5, dtype=torch.long)
    t = torch.randn(2, 5, 7)
    for out in (t, (t, "att"), {"logits": t}, type("O", (), {"logits": t})()):
        assert align_logits(extract_logits(out), caps).shape == (2, 4, 7)
    assert align_logits(t[:, :4], caps).shape == (2, 4, 7)


def test_importing_capdiag_stays_light():
    code = (
        "import sys, capdiag, capdiag.cli; capdiag.Status; "
        "heavy = [m for m in ('matplotlib', 'tensorboard', 'lightning', 'transformers', 'captum', 'torch') if m in sys.modules]; "
        "print(heavy)"
    )
    out = procs.run([sys.executable, "-c", code], timeout=120, check=True).stdout.strip()
    assert out == "[]"


def test_list_and_quick_check_import_only_what_they_use(tmp_path):
    """``capdiag list`` and ``capdiag check --quick`` load no plotting, TensorBoard, attribution or
    framework package: their start-up is torch and capdiag alone."""
    heavy = ("matplotlib", "tensorboard", "lightning", "transformers", "captum")
    minimal = str(Path(__file__).resolve().parents[1] / "examples/minimal_model.py")
    code = ("import sys; from capdiag.cli import main; "
            f"main(['list']); main(['check', {minimal!r}, '--quick', '--json', {str(tmp_path / 'f.json')!r}]); "
            f"print('HEAVY', [m for m in {heavy!r} if m in sys.modules])")
    out = procs.run([sys.executable, "-c", code], timeout=300, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"

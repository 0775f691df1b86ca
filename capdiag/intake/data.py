"""Synthetic captioning data whose captions truly depend on the image.

Each image shows one or two shapes of one colour in one quadrant of a noisy grey canvas;
its caption is ``<bos> [two] <colour> <shape> on <quadrant> <eos>``. Count, colour, shape
and quadrant are drawn independently and uniformly, so a model that cannot see the image
can do no better than the caption prior. Its loss floor is known exactly:

    floor = H(caption) / E[#target tokens] = (ln 2 + ln 6 + ln 4 + ln 4) / 5.5  ~= 0.956 nats

(the deterministic tokens "on" and <eos> cost nothing once the prefix is known). A model
that reaches a loss well below the floor must be reading the image.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

COLORS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.20, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")
WORDS = ("two",) + tuple(COLORS) + SHAPES + ("on",) + QUADRANTS
MAX_CAPTION_LEN = 7  # bos two colour shape on quadrant eos
BLIND_FLOOR = (math.log(2) + math.log(len(COLORS)) + math.log(len(SHAPES)) + math.log(len(QUADRANTS))) / 5.5


def _word_ids(vocab_size: int, specials: set) -> dict:
    ids, i = {}, 0
    for w in WORDS:
        while i in specials:
            i += 1
        ids[w] = i
        i += 1
    if i > vocab_size:
        from ..errors import UsageError

        raise UsageError(
            f"vocab_size {vocab_size} is too small for capdiag's synthetic captions (needs {i}); "
            "give the model file a sample_batch() returning real (images, captions)"
        )
    return ids


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy**2 + dx**2 <= r**2
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "triangle":  # apex up
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if kind == "cross":
        w = r * 0.35
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(kind)


@dataclass(frozen=True)
class Sample:
    count: int
    color: str
    shape: str
    quadrant: str

    def words(self) -> list:
        return (["two"] if self.count == 2 else []) + [self.color, self.shape, "on", self.quadrant]


class SyntheticCaptions:
    """Generator of (images, captions) batches mapped onto a model's vocabulary.

    Args:
        vocab_size, pad_id, bos_id, eos_id: the model's vocabulary facts.
        image_size: side of the square images.
        mean, std: per-channel normalization applied to the scaled images (the model's own).
        pixel_scale: [0, 1] pixels are multiplied by it first (255 for a model that divides by 255
            itself); mean and std are in the same units.
    """

    def __init__(self, vocab_size, pad_id=0, bos_id=1, eos_id=2, image_size=64, mean=None, std=None,
                 pixel_scale=1.0):
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.image_size = int(image_size)
        self.word_to_id = _word_ids(vocab_size, {pad_id, bos_id, eos_id})
        self.id_to_word = {v: k for k, v in self.word_to_id.items()}
        self.mean = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0)).view(3, 1, 1)
        self.std = torch.tensor(std if std is not None else (1.0, 1.0, 1.0)).view(3, 1, 1)
        self.pixel_scale = float(pixel_scale)
        self.blind_floor = BLIND_FLOOR

    @classmethod
    def for_spec(cls, spec) -> "SyntheticCaptions":
        return cls(spec.vocab_size, spec.pad_id, spec.bos_id, spec.eos_id, spec.image_size, spec.image_mean, spec.image_std,
                   spec.pixel_scale)

    # ---- sampling ---------------------------------------------------------------------
    def samples(self, n: int, seed: int = 0, balanced: bool = False) -> list:
        rng = np.random.default_rng(seed)
        if balanced:
            # Cycle through every value of every factor so a small batch covers them all,
            # which is what makes it impossible to fit blind (captions share prefixes).
            cols, shapes, quads = list(COLORS), list(SHAPES), list(QUADRANTS)
            out = []
            for i in range(n):
                out.append(Sample(1 + (i // 2) % 2, cols[i % 6], shapes[(i * 7 // 3) % 4], quads[(i * 5 // 2 + i // 4) % 4]))
            return out
        return [
            Sample(int(rng.integers(1, 3)), list(COLORS)[rng.integers(6)], SHAPES[rng.integers(4)], QUADRANTS[rng.integers(4)])
            for _ in range(n)
        ]

    def render(self, s: Sample, rng: np.random.Generator) -> np.ndarray:
        S = self.image_size
        img = 0.5 + 0.05 * rng.standard_normal((S, S, 3))
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
        qy, qx = (0 if s.quadrant.startswith("top") else 1), (0 if s.quadrant.endswith("left") else 1)
        cy, cx = (qy + 0.5) * S / 2, (qx + 0.5) * S / 2
        jitter = rng.uniform(-0.06, 0.06, size=2) * S
        if s.count == 1:
            centers, r = [(cy + jitter[0], cx + jitter[1])], S * 0.15
        else:
            centers, r = [(cy + jitter[0], cx - S * 0.11), (cy + jitter[0], cx + S * 0.11)], S * 0.09
        for (y, x) in centers:
            img[_shape_mask(s.shape, yy, xx, y, x, r)] = COLORS[s.color]
        return np.clip(img, 0, 1)

    def encode(self, s: Sample) -> list:
        return [self.bos_id] + [self.word_to_id[w] for w in s.words()] + [self.eos_id]

    def batch(self, n: int, seed: int = 0, balanced: bool = False):
        """Returns ``images (n, 3, S, S)`` normalized, ``captions (n, 7)`` right-padded with pad_id."""
        samples = self.samples(n, seed, balanced)
        rng = np.random.default_rng(seed + 1)
        imgs = torch.from_numpy(np.stack([self.render(s, rng) for s in samples])).permute(0, 3, 1, 2).float()
        imgs = (imgs * self.pixel_scale - self.mean) / self.std
        caps = torch.full((n, MAX_CAPTION_LEN), self.pad_id, dtype=torch.long)
        for i, s in enumerate(samples):
            ids = self.encode(s)
            caps[i, : len(ids)] = torch.tensor(ids)
        return imgs, caps

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.detach().float().cpu() * self.std + self.mean) / self.pixel_scale).clamp(0, 1)

    def decode(self, ids) -> str:
        return " ".join(self.id_to_word.get(int(t), f"<{int(t)}>") for t in ids)


def empirical_blind_floor(captions: torch.Tensor, target_mask: torch.Tensor) -> float:
    """Best possible mean token loss on *this* batch for a model that never sees the image.

    The optimal image-blind predictor outputs, at each position, the empirical distribution
    of next tokens among the batch's captions sharing the same prefix; its loss is the
    conditional entropy of that distribution, averaged over real target tokens.
    """
    caps = captions.tolist()
    mask = target_mask.tolist()
    counts: dict = defaultdict(Counter)
    for row, m in zip(caps, mask):
        for t, real in enumerate(m):
            if real:
                counts[tuple(row[: t + 1])][row[t + 1]] += 1
    total, n = 0.0, 0
    for row, m in zip(caps, mask):
        for t, real in enumerate(m):
            if real:
                c = counts[tuple(row[: t + 1])]
                total -= math.log(c[row[t + 1]] / sum(c.values()))
                n += 1
    return total / max(n, 1)


def caption_texts(s: Sample) -> list:
    """Three differently worded reference captions of one synthetic image, as people write them."""
    where = s.quadrant.replace("_", " ")
    shape = s.shape + ("s" if s.count == 2 and s.shape != "cross" else "es" if s.count == 2 else "")
    return [f"{'two' if s.count == 2 else 'one'} {s.color} {shape} on {where}",
            f"{'two' if s.count == 2 else 'a'} {s.color} {shape} in the {where}",
            f"{s.color} {shape} at the {where}"]


def write_coco_folder(folder, n_images: int, seed: int = 0, image_size: int = 64, split: str = "train") -> "Path":
    """A COCO-format captions folder of synthetic images: ``folder/images/*.png`` and
    ``folder/captions_<split>.json`` with three reference captions per image. Returns the JSON's path.

    The images are capdiag's synthetic shapes (the captions depend on them); the folder is what a
    user's COCO-style dataset looks like, for tests and the README's walk-through."""
    import json
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    gen = SyntheticCaptions(len(WORDS) + 3, image_size=image_size)
    rng = np.random.default_rng(seed + 1)
    images, annotations = [], []
    for i, s in enumerate(gen.samples(n_images, seed=seed)):
        name = f"{split}_{i:06d}.png"
        Image.fromarray((gen.render(s, rng) * 255).round().astype(np.uint8)).save(folder / "images" / name)
        images.append({"id": i, "file_name": name, "height": image_size, "width": image_size})
        for text in caption_texts(s):
            annotations.append({"id": len(annotations), "image_id": i, "caption": text})
    path = folder / f"captions_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path

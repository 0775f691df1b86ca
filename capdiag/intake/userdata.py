"""The user's own captions and images (``--data``): COCO JSON, Flickr captions file, CSV.

``read_captions(path)`` groups every caption by its image and finds the image files; the
formats are told apart by their content, not their names:

- COCO: a JSON with ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``,
  ``caption``), or a folder holding one. A plain reader, not ``pycocotools``: captions need only
  these two lists, and pycocotools is a C extension that brings nothing more here.
- Flickr8k/30k: ``name.jpg#0<TAB>caption`` lines (``Flickr8k.token.txt``), the pipe-separated
  ``results.csv`` of Flickr30k (``image_name| comment_number| comment``), or Kaggle's
  ``captions.txt`` (``image,caption``).
- A folder of images with a CSV whose header names an image column (image, file_name, ...) and a
  caption column (caption, text, ...).

Image files are looked up by relative path under the data folder, then by file name anywhere
below it, so the usual ``images/``, ``train2017/`` or ``Flicker8k_Dataset/`` layouts all work.
``CaptionData.batch`` turns a seeded draw of images into model inputs: the model's preprocessing
(``Preprocess``) and the user's tokenizer (``capdiag.intake.tokenizers``).
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "image_name", "file_name", "filename", "file", "path", "image_path", "img")
CAPTION_COLUMNS = ("caption", "comment", "text", "sentence", "captions", "description")


@dataclass
class Item:
    image: Path
    captions: list  # every reference caption of the image (strings)


@dataclass
class Preprocess:
    """How the model wants its pixels: square ``size``, [0, 1] pixels times ``scale``, then
    ``(x - mean) / std``. ``crop``: resize the shorter side then center-crop (torchvision's
    Resize+CenterCrop recipe, CLIP's processor); False: squash to size x size (ViT's and BLIP's
    image processors)."""

    size: int
    mean: tuple
    std: tuple
    scale: float = 1.0
    crop: bool = True

    def __call__(self, path: Path) -> torch.Tensor:
        from PIL import Image

        try:
            img = Image.open(path).convert("RGB")
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read image {path}: {e}; remove it from the captions file or fix it") from None
        S = self.size
        if self.crop:
            w, h = img.size
            k = S / min(w, h)
            img = img.resize((max(S, round(w * k)), max(S, round(h * k))), Image.BICUBIC)
            w, h = img.size
            left, top = (w - S) // 2, (h - S) // 2
            img = img.crop((left, top, left + S, top + S))
        else:
            img = img.resize((S, S), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) * self.scale
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)


@dataclass
class CaptionData:
    """Captions grouped by image, as read from ``--data``.

    Attributes:
        items: one ``Item`` per image whose file was found.
        kind: the format, in words ("COCO captions JSON", ...).
        source: the file the captions came from.
        missing: image names the captions list but no file was found for (left out).
        tokenizer, preprocess: set by the front end before batches are drawn.
    """

    items: list
    kind: str
    source: Path
    missing: list = field(default_factory=list)
    tokenizer: object = None
    preprocess: Optional[Preprocess] = None
    crop: bool = True  # how the model's images are resized (see Preprocess); the model file decides

    def describe(self) -> str:
        n_caps = sum(len(i.captions) for i in self.items)
        gone = f", {len(self.missing)} listed images not found and left out" if self.missing else ""
        tok = f", tokenizer: {self.tokenizer.name}" if self.tokenizer is not None else ""
        return f"{self.kind} {self.source} ({len(self.items)} images, {n_caps} captions{gone}){tok}"

    def draw(self, n: int, seed: int) -> list:
        """``n`` distinct items (all of them when fewer), the same ones for the same seed."""
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(self.items))[: min(n, len(self.items))]
        return [self.items[i] for i in sorted(idx)]

    def batch(self, n: int, seed: int, max_len: Optional[int] = None):
        """``(images (n, 3, S, S), captions (n, T), references)``: ``n`` images drawn with ``seed``,
        each with one of its captions (also drawn with ``seed``) tokenized; ``references``: all the
        captions of each image, as strings, for metrics."""
        if self.tokenizer is None or self.preprocess is None:
            raise RuntimeError("CaptionData.batch needs tokenizer and preprocess set")
        items = self.draw(n, seed)
        rng = np.random.default_rng(seed + 1)
        texts = [it.captions[int(rng.integers(len(it.captions)))] for it in items]
        images = torch.stack([self.preprocess(it.image) for it in items])
        captions = self.tokenizer.encode(texts, max_len)
        return images, captions, [list(it.captions) for it in items]


def read_captions(path: str, images: Optional[str] = None) -> CaptionData:
    """Read ``--data``: a COCO JSON, a Flickr captions file, a CSV, or a folder holding one. The
    image files are looked for under ``images`` when given, else beside the captions file.

    Raises:
        DataError: nothing readable there, or none of the listed images exists.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"--data {path!r} does not exist; give a COCO captions JSON, a Flickr captions file, "
                        "a CSV, or the folder holding one and the images")
    source, text = (p, None) if p.is_file() else _find_captions_file(p)
    root = Path(images) if images else (p if p.is_dir() else p.parent)
    if text is None:
        text = source.read_text(encoding="utf-8", errors="replace")
    if source.suffix.lower() == ".json":
        kind, pairs = "COCO captions JSON", _coco(text, source)
    else:
        kind, pairs = _text_captions(text, source)
    if not pairs:
        raise DataError(f"{source} holds no captions; expected one of: COCO JSON, 'name.jpg#0<TAB>caption' lines, "
                        "or a CSV with image and caption columns")
    grouped: dict = {}
    for name, caption in pairs:
        caption = " ".join(str(caption).split())
        if caption:
            grouped.setdefault(name, []).append(caption)
    index = _image_index(root)
    items, missing = [], []
    for name, caps in grouped.items():
        f = _resolve(root, name, index)
        (items.append(Item(f, caps)) if f is not None else missing.append(name))
    if not items:
        raise DataError(f"none of the {len(grouped)} images named in {source} is under {root} "
                        f"(first: {next(iter(grouped))!r}); put the images there or pass the folder holding them")
    return CaptionData(items, kind, source, missing)


def _find_captions_file(folder: Path) -> tuple:
    """``(path, its text when already read, else None)`` of the captions file in ``folder``: a COCO
    JSON's text is read once, here, not again by the caller (a COCO train JSON is ~90 MB)."""
    candidates = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in (".json", ".txt", ".csv", ".tsv", ".token"))
    for f in candidates:  # a COCO JSON first: it is unambiguous
        if f.suffix.lower() == ".json":
            text = f.read_text(encoding="utf-8", errors="replace")
            if '"annotations"' in text:
                return f, text
    for f in candidates:
        if f.suffix.lower() != ".json":
            return f, None
    raise DataError(f"no captions file in {folder}: expected a COCO captions JSON, a Flickr captions .txt "
                    "or a CSV with image and caption columns")


def _coco(text: str, source: Path) -> list:
    try:
        data = json.loads(text)
        files = {im["id"]: im["file_name"] for im in data["images"]}
        return [(files[a["image_id"]], a["caption"]) for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{source} is not a COCO captions JSON ({type(e).__name__}: {e}); it needs 'images' with id "
                        "and file_name, and 'annotations' with image_id and caption") from None


def _text_captions(text: str, source: Path) -> tuple:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "captions file", []
    first = lines[0]
    if "\t" in first and "#" in first.split("\t", 1)[0]:  # Flickr8k.token.txt
        return "Flickr captions file", [(ln.split("\t", 1)[0].rsplit("#", 1)[0], ln.split("\t", 1)[1])
                                        for ln in lines if "\t" in ln]
    delimiter = "|" if "|" in first else ("\t" if "\t" in first else ",")
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
    header = [h.strip().lower() for h in rows[0]]
    img_col = next((header.index(c) for c in IMAGE_COLUMNS if c in header), None)
    cap_col = next((header.index(c) for c in CAPTION_COLUMNS if c in header), None)
    if img_col is None or cap_col is None:
        raise DataError(f"{source}: the header {rows[0]} names no image column ({', '.join(IMAGE_COLUMNS)}) or no "
                        f"caption column ({', '.join(CAPTION_COLUMNS)}); rename the columns")
    kind = "Flickr captions file" if source.suffix.lower() == ".txt" or delimiter == "|" else "captions CSV"
    pairs = [(r[img_col].strip(), delimiter.join(r[cap_col:]) if cap_col == len(header) - 1 else r[cap_col])
             for r in rows[1:] if len(r) > max(img_col, cap_col)]
    return kind, pairs


def _image_index(root: Path) -> dict:
    """File name -> path of every image below ``root``; symlinked folders are followed (datasets
    are often linked in from a shared disk)."""
    index: dict = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(name, Path(dirpath) / name)
    return index


def _resolve(root: Path, name: str, index: dict) -> Optional[Path]:
    direct = root / name
    if direct.is_file():
        return direct
    return index.get(Path(name).name)

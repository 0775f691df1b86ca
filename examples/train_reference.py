"""Train a reference captioner on capdiag's synthetic data (or a COCO-format captions folder).

    python examples/train_reference.py --model show_attend_tell --steps 600
    python examples/train_reference.py --model cnn_transformer --bug image_not_fed     # stays at the floor
    python examples/train_reference.py --model cnn_transformer --coco path/to/coco --ann captions_train2017.json

A plain PyTorch loop: AdamW, linear warm-up then cosine decay, gradient clipping, label
smoothing, bf16 autocast on GPU, validation loss and BLEU-4 (nltk, special tokens stripped)
every --val-every steps with greedy captions printed for a few images.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capdiag.captioner import Captioner, CaptionSpec
from capdiag.data import BLIND_FLOOR, SyntheticCaptions
from capdiag.metrics import bleu4


class CocoFolder(torch.utils.data.Dataset):
    """COCO-format captions (an annotations JSON + an image folder), tokenized by whitespace."""

    def __init__(self, root: str, ann: str, spec: CaptionSpec, max_len: int = 20):
        from PIL import Image  # noqa: F401  (pillow comes with matplotlib)

        data = json.loads(Path(ann).read_text())
        files = {im["id"]: im["file_name"] for im in data["images"]}
        self.items = [(Path(root) / files[a["image_id"]], a["caption"]) for a in data["annotations"]]
        words = Counter(w for _, c in self.items for w in self.tokenize(c))
        # The model's special ids stay where the model expects them (GPT-2: one id for all three).
        specials = {spec.pad_id: "<pad>", spec.bos_id: "<bos>", spec.eos_id: "<eos>"}
        free = [i for i in range(spec.vocab_size) if i not in specials]
        self.unk = free[0]
        self.itos = dict(specials)
        self.itos[self.unk] = "<unk>"
        self.itos.update(zip(free[1:], (w for w, _ in words.most_common(len(free) - 1))))
        self.stoi = {w: i for i, w in self.itos.items() if i not in specials}
        self.spec, self.size, self.max_len = spec, spec.image_size, max_len

    @staticmethod
    def tokenize(text: str) -> list:
        return re.findall(r"[a-z]+", text.lower())

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, caption = self.items[i]
        img = Image.open(path).convert("RGB").resize((self.size, self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255  # (3, S, S)
        x = (x - torch.tensor(self.spec.image_mean).view(3, 1, 1)) / torch.tensor(self.spec.image_std).view(3, 1, 1)
        words = [self.stoi.get(w, self.unk) for w in self.tokenize(caption)][: self.max_len - 2]
        ids = [self.spec.bos_id] + words + [self.spec.eos_id]
        caps = torch.full((self.max_len,), self.spec.pad_id, dtype=torch.long)
        caps[: len(ids)] = torch.tensor(ids)
        return x, caps

    def decode(self, ids) -> str:
        return " ".join(self.itos.get(i, "<unk>") for i in ids)


MODELS = ["show_attend_tell", "cnn_transformer", "clip_decoder", "clipcap", "dual_transfer"]


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="show_attend_tell", choices=MODELS)
    ap.add_argument("--bug", default=None)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--coco", default=None, help="image folder of a COCO-format dataset")
    ap.add_argument("--ann", default=None, help="its captions annotations JSON")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = importlib.import_module(f"capdiag.models.{args.model}")
    model = module.build_model(bug=args.bug).to(dev)
    hints = {**module.CAPDIAG, **model.capdiag_hints}
    spec = CaptionSpec(**{k: v for k, v in hints.items() if k in CaptionSpec.__dataclass_fields__})
    V = spec.vocab_size
    cap = Captioner(model, spec)
    if args.coco:
        ds = CocoFolder(args.coco, args.ann, spec)
        loader = iter(torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True))
        def train_batch(step):
            return next(loader)
        val = next(iter(torch.utils.data.DataLoader(ds, batch_size=64)))
        decode = ds.decode
    else:
        data = SyntheticCaptions.for_spec(spec)
        def train_batch(step):
            return data.batch(args.batch, seed=args.seed * 1_000_000 + step)
        val = data.batch(128, seed=987_654)  # held out: never a training seed
        decode = data.decode
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=0.01)
    val_images, val_caps = (t.to(dev) for t in val)
    results = {}
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, max(1, args.steps // 20), args.lr)
        images, captions = (t.to(dev) for t in train_batch(step))
        model.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = cap.logits(images, captions)
        targets, mask = captions[:, 1:], cap.target_mask(captions)
        ce = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), reduction="none",
                             label_smoothing=args.label_smoothing).view_as(targets)
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.val_every == 0 or step == args.steps - 1:
            model.eval()
            with torch.no_grad():
                val_loss = float(cap.loss(val_images, val_caps))
                hyps = cap.strip(cap.generate(val_images, max_len=val_caps.shape[1] + 2))
            refs = cap.strip(val_caps)
            results = {"step": step + 1, "train_loss": float(loss.detach()), "val_loss": val_loss, "bleu4": bleu4(refs, hyps)}
            print(f"step {step + 1:5d}  train {results['train_loss']:.3f}  val loss {val_loss:.3f} "
                  f"(image-blind floor {BLIND_FLOOR:.3f})  val BLEU-4 {results['bleu4']:.3f}", flush=True)
            for r, h in list(zip(refs, hyps))[:3]:
                print(f"    ref: {decode(r):<40} greedy: {decode(h)}")
    return results


if __name__ == "__main__":
    main()

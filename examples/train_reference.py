"""Train a reference captioner on capdiag's synthetic data (or a COCO-format captions folder).

    python examples/train_reference.py --model show_attend_tell --steps 600
    python examples/train_reference.py --model cnn_transformer --bug image_not_fed     # stays at the floor
    python examples/train_reference.py --model cnn_transformer --coco path/to/coco --ann captions_train2017.json
    python examples/train_reference.py --model clip_decoder --coco data/ --ann data/captions_train.json --save run/
        # run/model.pt (state_dict) and run/wordmap.json: capdiag check ... --weights run/model.pt
        #   --data data/ --tokenizer run/wordmap.json

A plain PyTorch loop: AdamW, linear warm-up then cosine decay, gradient clipping, label
smoothing, bf16 autocast on GPU, validation loss and BLEU-4 (nltk, special tokens stripped)
every --val-every steps with greedy captions printed for a few images.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capdiag.captioner import Captioner, CaptionSpec
from capdiag.intake.data import BLIND_FLOOR, SyntheticCaptions
from capdiag.measure.metrics import bleu4
from capdiag.intake.userdata import Preprocess, read_captions
from capdiag.intake.tokenizers import WORD, WordMap


class CocoFolder(torch.utils.data.Dataset):
    """COCO-format captions (an annotations JSON + an image folder), tokenized with a word map
    built from the captions (the tutorial's WORDMAP format, the same words capdiag's ``--tokenizer
    wordmap.json`` reads)."""

    def __init__(self, root: str, ann: str, spec: CaptionSpec, max_len: int = 20):
        data = read_captions(ann, images=root)  # capdiag's own reader: the same images --data finds
        self.items = [(it.image, c) for it in data.items for c in it.captions]
        words = Counter(w for _, c in self.items for w in WORD.findall(c.lower()))
        # The model's special ids stay where the model expects them (GPT-2: one id for all three).
        specials = {spec.pad_id: "<pad>", spec.bos_id: "<bos>", spec.eos_id: "<eos>"}
        free = [i for i in range(spec.vocab_size) if i not in specials]
        self.unk = free[0]
        self.itos = dict(specials)
        self.itos[self.unk] = "<unk>"
        self.itos.update(zip(free[1:], (w for w, _ in words.most_common(len(free) - 1))))
        self.word_map = {w: i for i, w in self.itos.items() if i not in specials}
        self.word_map.update({"<pad>": spec.pad_id, "<start>": spec.bos_id, "<end>": spec.eos_id})
        self.tokenizer = WordMap.from_dict(self.word_map)
        # The preprocessing capdiag's --data applies too (resize the shorter side, center crop).
        self.preprocess = Preprocess(spec.image_size, spec.image_mean, spec.image_std, spec.pixel_scale)
        self.spec, self.max_len = spec, max_len

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, caption = self.items[i]
        x = self.preprocess(path)
        ids = self.tokenizer.encode([caption], self.max_len)[0]
        caps = torch.full((self.max_len,), self.spec.pad_id, dtype=torch.long)
        caps[: len(ids)] = ids
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
    ap.add_argument("--save", default=None, help="folder for model.pt (the state_dict) and, with --coco, wordmap.json")
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
        def epochs():  # as many passes over the data as the steps need
            while True:
                yield from torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True)
        loader = epochs()

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
    if args.save:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "model.pt")
        if args.coco:
            (out / "wordmap.json").write_text(json.dumps(ds.word_map))
        print(f"saved {out / 'model.pt'}" + (f" and {out / 'wordmap.json'}" if args.coco else ""))
    return results


if __name__ == "__main__":
    main()

"""The convention matrix: one small captioner that can be written every way the model-file contract
allows, so that a generated family (``tests/test_conventions.py``, with hypothesis) proves that no
check crashes on any combination and that clean combinations never fail.

Axes (``Conventions`` fields):

- ``image_out``: the image module returns a tensor, a ``(features, positions)`` tuple, a dict, or a
  ``ModelOutput``-style object;
- ``out``: forward returns logits, log-probabilities, a ``(logits, attention)`` tuple, a dict or a
  ``ModelOutput``-style object, over T or T-1 positions;
- ``generate``: absent, returning ids, returning ragged per-image lists, or raising;
- ``frozen``: the encoder trains, or is frozen by ``requires_grad_(False)``, by ``torch.no_grad()`` (kept
  in eval), by ``FrozenBatchNorm2d``, or by a ``train()`` override;
- ``grad_images``: whether the forward accepts images that require grad (it ``copy_``s them into a view
  made under ``no_grad`` when it does not);
- ``zero_ids``: pad == bos == eos == 0;
- ``bn_head``: BatchNorm1d in the output head (a train-mode batch of 1 raises);
- ``autocast``: the decoder runs under bf16 autocast inside forward;
- ``dropout``: 0 or 0.5 (a slow learner).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_OUT = ("tensor", "tuple", "dict", "output")
OUT = ("logits", "logprobs", "tuple", "dict", "output")
GENERATE = ("none", "ids", "ragged", "raises")
FROZEN = ("none", "requires_grad", "no_grad", "frozen_bn", "train_override")


@dataclass(frozen=True)
class Conventions:
    image_out: str = "tensor"
    out: str = "logits"
    shorter: bool = False  # T-1 positions instead of T
    generate: str = "ids"
    frozen: str = "none"
    grad_images: bool = True
    zero_ids: bool = False
    bn_head: bool = False
    autocast: bool = False
    dropout: float = 0.0

    @property
    def clean(self) -> bool:
        """Every combination is a correct model except one whose generate() raises."""
        return self.generate != "raises"

    def hints(self) -> dict:
        ids = dict(pad_id=0, bos_id=0, eos_id=0) if self.zero_ids else dict(pad_id=0, bos_id=1, eos_id=2)
        return dict(vocab_size=24, image_size=32, image_module="encoder", attention_modules=[], **ids)


class _Out:
    """A ModelOutput-style object: read by attribute."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class Encoder(nn.Module):
    def __init__(self, c: Conventions, d: int):
        super().__init__()
        from torchvision.ops.misc import FrozenBatchNorm2d

        norm = FrozenBatchNorm2d if c.frozen == "frozen_bn" else nn.BatchNorm2d
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), norm(32), nn.ReLU(),
                                  nn.Conv2d(32, d, 3, 2, 1, bias=False), norm(d), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.kind = c.image_out

    def forward(self, x):
        f = self.body(x).flatten(2).transpose(1, 2)  # (B, 4, d)
        pos = torch.linspace(-1, 1, f.shape[1], device=f.device)[None, :, None].expand(f.shape[0], -1, 1)
        if self.kind == "tuple":
            return f, pos
        if self.kind == "dict":
            return {"features": f, "positions": pos}
        if self.kind == "output":
            return _Out(last_hidden_state=f, positions=pos)
        return f


def _features(o):
    if isinstance(o, tuple):
        return o[0] + 0.1 * o[1]
    if isinstance(o, dict):
        return o["features"] + 0.1 * o["positions"]
    if isinstance(o, _Out):
        return o.last_hidden_state + 0.1 * o.positions
    return o


class ConventionCaptioner(nn.Module):
    def __init__(self, c: Conventions, vocab: int = 24, d: int = 32):
        super().__init__()
        self.c = c
        ids = c.hints()
        self.pad, self.bos, self.eos = ids["pad_id"], ids["bos_id"], ids["eos_id"]
        self.encoder = Encoder(c, d)
        if c.frozen in ("requires_grad", "frozen_bn"):
            self.encoder.requires_grad_(False)
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(24, d))
        self.proj = nn.Linear(4 * d, d)  # all four regions: a frozen random encoder's mean says little
        self.gru = nn.GRU(2 * d, d, batch_first=True)
        self.drop = nn.Dropout(c.dropout)
        head = [nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU()] if c.bn_head else []
        self.head = nn.Sequential(*head, nn.Linear(d, vocab))

    def train(self, mode=True):
        super().train(mode)
        if self.c.frozen in ("no_grad", "train_override", "requires_grad"):
            self.encoder.eval()
        return self

    def image(self, images):
        if not self.c.grad_images:
            canvas = images.new_zeros(images.shape)
            with torch.no_grad():
                view = canvas[:]
            view.copy_(images)  # raises for images that require grad: legal, and capdiag must cope
            images = canvas
        if self.c.frozen == "no_grad":
            with torch.no_grad():
                return _features(self.encoder(images))
        return _features(self.encoder(images))

    def step_logits(self, feats, captions):
        T = captions.shape[1]
        ctx = self.proj(feats.flatten(1))[:, None]  # (B, 1, d)
        x = torch.cat([self.embed(captions) + self.pos[:T], ctx.expand(-1, T, -1)], -1)
        with torch.autocast(captions.device.type, dtype=torch.bfloat16, enabled=self.c.autocast):
            h, _ = self.gru(x)
            h = self.drop(h)
            B, T, D = h.shape
            logits = self.head(h.reshape(B * T, D)).view(B, T, -1)
        return logits.float()

    def forward(self, images, captions):
        logits = self.step_logits(self.image(images), captions)
        if self.c.shorter:
            logits = logits[:, :-1]
        if self.c.out == "logprobs":
            return F.log_softmax(logits, -1)
        if self.c.out == "tuple":
            return F.log_softmax(logits, -1), logits.new_zeros(logits.shape[0], 1)
        if self.c.out == "dict":
            return {"logits": logits}
        if self.c.out == "output":
            return _Out(logits=logits)
        return logits

    def _generate(self, images, max_len=16):
        feats = self.image(images)
        B = images.shape[0]
        seq = torch.full((B, 1), self.bos, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        for _ in range(max_len - 1):
            nxt = self.step_logits(feats, seq)[:, -1].argmax(-1).masked_fill(done, self.pad)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == self.eos
            if done.all():
                break
        return seq

    def __getattr__(self, name):
        if name == "generate":
            kind = self.__dict__.get("c", Conventions()).generate
            if kind == "none":
                raise AttributeError(name)
            return self._generate_as
        return super().__getattr__(name)

    @torch.no_grad()
    def _generate_as(self, images, max_len=16):
        if self.c.generate == "raises":
            raise RuntimeError("generate() is broken in this combination")
        seq = self._generate(images, max_len)
        if self.c.generate == "ragged":
            out = []
            for row in seq.tolist():
                end = next((i for i, t in enumerate(row) if i > 0 and t == self.eos), len(row) - 1)
                out.append(row[: end + 1])
            return out
        return seq


def build(c: Conventions, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ConventionCaptioner(c)
    model.capdiag_hints = c.hints()
    return model


def describe(c: Conventions) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(c).items() if v != getattr(Conventions(), k)) or "defaults"

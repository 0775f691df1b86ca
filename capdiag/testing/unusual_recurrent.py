"""The unusual family's LSTM and GRU decoders (see ``capdiag.testing.unusual``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from capdiag.models.show_attend_tell import Attention  # the paper's additive attention, written once

from .unusual_transformers import IMAGENET_MEAN, IMAGENET_STD, SmallCNN, next_greedy, regions_of


# ---- LSTM decoders ------------------------------------------------------------------------------
class SortedAttentionLSTM(nn.Module):
    """The most widely copied PyTorch captioning tutorial's decoder, under capdiag's contract.

    Caption lengths are computed from padding, the batch is sorted by length, and at step t only the
    ``batch_size_t`` captions still running are decoded, leaving exact zeros past each caption's end;
    the output is put back in the caller's order. ``dropout`` 0.5 as in the tutorial. ``normalize``
    puts ImageNet normalization inside forward (images arrive in [0, 1]); ``returns`` "dict" gives
    ``{"logits", "alphas"}``.
    """

    def __init__(self, vocab=24, pad=0, bos=1, eos=2, d=64, dropout=0.5, normalize=False, returns="tensor",
                 packed=False):
        super().__init__()
        self.vocab, self.pad, self.bos, self.eos = vocab, pad, bos, eos
        self.normalize, self.returns, self.packed = normalize, returns, packed
        self.encoder = SmallCNN(32)
        self.attention = Attention(32, d, d)
        self.embedding = nn.Embedding(vocab, d)
        self.init_h, self.init_c = nn.Linear(32, d), nn.Linear(32, d)
        self.f_beta = nn.Linear(d, 32)  # gating scalar
        self.decode_step = nn.LSTMCell(d + 32, d)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(d, vocab)
        if normalize:
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def features(self, images):
        if self.normalize:
            images = (images - self.mean) / self.std
        return regions_of(self.encoder(images))  # (B, 16, 32)

    def step(self, enc, emb_t, h, c):
        ctx, alpha = self.attention(enc, h)
        ctx = torch.sigmoid(self.f_beta(h)) * ctx
        h, c = self.decode_step(torch.cat([emb_t, ctx], 1), (h, c))
        return h, c, alpha

    def forward(self, images, captions):
        B, T = captions.shape
        enc = self.features(images)
        lengths = (captions != self.pad).sum(1)  # BOS .. EOS (pad never appears inside a caption)
        lengths, order = lengths.sort(descending=True)
        enc, caps = enc[order], captions[order]
        decode_lengths = (lengths - 1).tolist()
        mean = enc.mean(1)
        h, c = self.init_h(mean), self.init_c(mean)
        emb = self.embedding(caps)
        preds = torch.zeros(B, T - 1, self.vocab, device=captions.device)
        alphas = torch.zeros(B, T - 1, enc.shape[1], device=captions.device)
        for t in range(max(decode_lengths)):
            bt = sum(l > t for l in decode_lengths)
            h, c, alpha = self.step(enc[:bt], emb[:bt, t], h[:bt], c[:bt])
            preds[:bt, t] = self.fc(self.dropout(h))
            alphas[:bt, t] = alpha
        unsort = order.argsort()
        preds, alphas = preds[unsort], alphas[unsort]
        if self.returns == "dict":
            return {"logits": preds, "alphas": alphas}
        return preds  # (B, T-1, V)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        enc = self.features(images)
        B = enc.shape[0]
        mean = enc.mean(1)
        h, c = self.init_h(mean), self.init_c(mean)
        seq = torch.full((B, 1), self.bos, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        for _ in range(max_len - 1):
            h, c, _ = self.step(enc, self.embedding(seq[:, -1]), h, c)
            seq, done = next_greedy(seq, done, self.fc(h), self.pad, self.eos)
            if bool(done.all()):
                break
        return seq


class PackedLSTM(nn.Module):
    """Image vector as the first LSTM input, captions packed with ``pack_padded_sequence``
    (lengths from padding, sorted), unpacked with zeros past each end. BOS id 0 (eos 1, pad 2)."""

    def __init__(self, vocab=24, pad=2, bos=0, eos=1, d=64):
        super().__init__()
        self.vocab, self.pad, self.bos, self.eos = vocab, pad, bos, eos
        self.cnn = SmallCNN(32)
        self.img_fc = nn.Linear(32 * 4, d)
        self.embed = nn.Embedding(vocab, d, padding_idx=pad)
        self.lstm = nn.LSTM(d, d, num_layers=2, batch_first=True, dropout=0.3)
        self.linear = nn.Linear(d, vocab)

    def image_vector(self, images):
        fmap = F.adaptive_avg_pool2d(self.cnn(images), 2)  # keep the quadrants: (B, 32, 2, 2)
        return self.img_fc(fmap.flatten(1))  # (B, d)

    def forward(self, images, captions):
        T = captions.shape[1]
        feats = self.image_vector(images)
        lengths = (captions != self.pad).sum(1)
        x = torch.cat([feats[:, None], self.embed(captions[:, :-1])], 1)  # (B, T, d): image, BOS, w1, ...
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)  # zeros past the end
        return self.linear(out[:, 1:])  # (B, T-1, V): position t scores captions[:, t+1]

    @torch.no_grad()
    def generate(self, images, max_len=16):
        B = images.shape[0]
        _, state = self.lstm(self.image_vector(images)[:, None])
        seq = torch.full((B, 1), self.bos, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        for _ in range(max_len - 1):
            out, state = self.lstm(self.embed(seq[:, -1:]), state)
            seq, done = next_greedy(seq, done, self.linear(out[:, -1]), self.pad, self.eos)
            if bool(done.all()):
                break
        return seq


# ---- GRU decoders -------------------------------------------------------------------------------
@dataclass
class CaptionOutput:
    """A ModelOutput-style return: read by attribute."""

    logits: torch.Tensor
    image_embeds: Optional[torch.Tensor] = None


class GRUCaptioner(nn.Module):
    """CNN regions -> GRU with attention over regions (additive, per step) and the pooled image as
    initial state. Options: a frozen encoder run under ``torch.no_grad()`` and kept in eval mode,
    ``/ 255`` and normalization inside forward, CLIP ids (eos == pad), non-reentrant checkpointing,
    a ModelOutput-style return, 96 px input (three stages)."""

    def __init__(self, vocab=24, pad=0, bos=1, eos=2, d=64, frozen=False, keep_frozen_eval=True, raw_pixels=False,
                 ckpt=False, returns="tensor", stages=2):
        super().__init__()
        self.vocab, self.pad, self.bos, self.eos = vocab, pad, bos, eos
        self.frozen, self.keep_frozen_eval, self.raw_pixels = frozen, keep_frozen_eval, raw_pixels
        self.ckpt, self.returns = ckpt, returns
        self.encoder = SmallCNN(32, stages)
        if frozen:
            self.encoder.requires_grad_(False)
        self.key = nn.Linear(32, d)
        self.value = nn.Linear(32, d)
        self.init = nn.Linear(32, d)
        self.embed = nn.Embedding(vocab, d)
        self.gru = nn.GRU(2 * d, d, batch_first=True)
        self.query = nn.Linear(d, d)
        self.out = nn.Sequential(nn.Linear(2 * d, d), nn.Tanh(), nn.Dropout(0.2), nn.Linear(d, vocab))
        if raw_pixels:
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen and self.keep_frozen_eval:
            self.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics
        return self

    def regions(self, images):
        if self.raw_pixels:
            images = (images.float() / 255.0 - self.mean) / self.std
        if self.frozen:
            with torch.no_grad():
                fmap = self.encoder(images)
        else:
            fmap = self.encoder(images)
        return regions_of(fmap)  # (B, 16, 32)

    def run(self, regions, captions, h0=None):
        k, v = self.key(regions), self.value(regions)
        h = torch.tanh(self.init(regions.mean(1)))[None] if h0 is None else h0
        emb = self.embed(captions)
        outs = []
        for t in range(captions.shape[1]):  # attention from the previous state, as Bahdanau decoders do
            a = F.softmax((k @ self.query(h[-1])[:, :, None]).squeeze(2) / math.sqrt(k.shape[-1]), 1)  # (B, L)
            ctx = (a[..., None] * v).sum(1)
            o, h = self.gru(torch.cat([emb[:, t], ctx], -1)[:, None], h)
            outs.append(torch.cat([o[:, 0], ctx], -1))
        return self.out(torch.stack(outs, 1)), h

    def forward(self, images, captions):
        regions = self.regions(images)
        if self.ckpt:
            logits = checkpoint(lambda r, c: self.run(r, c)[0], regions, captions, use_reentrant=False)
        else:
            logits = self.run(regions, captions)[0]
        if self.returns == "output":
            return CaptionOutput(logits=logits, image_embeds=regions.mean(1))
        return logits

    @torch.no_grad()
    def generate(self, images, max_len=16):
        regions = self.regions(images)
        B = regions.shape[0]
        seq = torch.full((B, 1), self.bos, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        h = None
        for _ in range(max_len - 1):
            logits, h = self.run(regions, seq[:, -1:], h)  # carry the GRU state: one step at a time
            seq, done = next_greedy(seq, done, logits[:, -1], self.pad, self.eos)
            if bool(done.all()):
                break
        return seq

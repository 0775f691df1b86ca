"""Strangers: clean captioners written in styles the rest of this repository does not use.

Each one is correct and must pass every capdiag check at every seed; a FAIL or an ERROR on any of
them is a false alarm of capdiag's. They are written the way other people write captioners (the
conventions public repositories use, not the references' or ``capdiag.models.unusual``'s), and
cover the cases a first try of v0.2 on unseen code got wrong:

- image modules returning ``(features, positions)`` (DETR-style backbones) or a dict;
- forwards returning log-probabilities, or a ``(log_probs, attention)`` tuple, and models without
  ``generate``;
- a bf16 ``torch.autocast`` region inside ``forward``;
- slow learners: the up-down two-LSTM captioner (Anderson et al. 2018) with dropout 0.5;
- ``pack_padded_sequence(enforce_sorted=False)`` with dropout between LSTM layers and BatchNorm1d in
  the encoder head; BatchNorm1d in the output head;
- encoders frozen by ``requires_grad_(False)``, ``torch.no_grad()``, ``FrozenBatchNorm2d`` or a
  ``train()`` override; a forward that ``copy_``s its images into a canvas made under no_grad;
- a memory-augmented encoder (learned memory slots in the region attention, M2-style);
- scheduled sampling in train mode; fairseq-style incremental decoding with a per-layer cache;
- a hand-written GPT with an image prefix (SDPA, GPT-2 ids pad == bos == eos), pad == bos == eos == 0.

``build(name, bug=None, seed=0)`` builds one with its hints on ``capdiag_hints``; ``PATTERNS``
lists them; ``BUGS`` maps bug twins (one change of a clean stranger, each seen in public code) to
the check that must name them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .family import build_member

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _hints(**kw):
    return {**dict(vocab_size=24, pad_id=0, bos_id=1, eos_id=2, image_size=32, image_mean=MEAN, image_std=STD), **kw}


def _conv(cin, cout, norm=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), norm(cout), nn.ReLU())


def _greedy_steps(step_fn, images, bos, eos, pad, max_len):
    """The loop most repositories write: feed the argmax back, keep a per-sample ``finished`` mask."""
    B = images.shape[0]
    out = torch.full((B, 1), bos, dtype=torch.long, device=images.device)
    finished = torch.zeros(B, dtype=torch.bool, device=images.device)
    for _ in range(max_len - 1):
        word = step_fn(out).argmax(-1)
        word = word.masked_fill(finished, pad)
        out = torch.cat([out, word[:, None]], 1)
        finished = finished | (word == eos)
        if finished.all():
            break
    return out


# ---- 1. DETR-style backbone: the image module returns (features, positions) ---------------------
class Joiner(nn.Module):
    """Backbone + sine position embedding, returned side by side as DETR's Joiner does."""

    def __init__(self, d=64):
        super().__init__()
        self.body = nn.Sequential(_conv(3, 32), _conv(32, d))  # (B, d, 8, 8) at 32 px

    def forward(self, x):
        f = self.body(x)
        B, C, H, W = f.shape
        y = torch.arange(H, dtype=f.dtype, device=f.device)[:, None].expand(H, W) / H
        xx = torch.arange(W, dtype=f.dtype, device=f.device)[None, :].expand(H, W) / W
        freq = torch.arange(C // 4, dtype=f.dtype, device=f.device)
        freq = 100.0 ** (freq / (C // 4))
        pos = torch.cat([torch.sin(y[..., None] * freq), torch.cos(y[..., None] * freq),
                         torch.sin(xx[..., None] * freq), torch.cos(xx[..., None] * freq)], -1)  # (H, W, C)
        return f, pos.permute(2, 0, 1)[None].expand(B, -1, -1, -1)


class DetrCaptioner(nn.Module):
    def __init__(self, vocab=24, d=64):
        super().__init__()
        self.backbone = Joiner(d)
        self.query_embed = nn.Embedding(vocab, d)
        self.pos_embed = nn.Parameter(torch.randn(32, d) * 0.02)
        layer = nn.TransformerDecoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerDecoder(layer, 2)
        self.class_embed = nn.Linear(d, vocab)

    def forward(self, images, captions):
        src, pos = self.backbone(images)
        memory = (src + pos).flatten(2).permute(0, 2, 1)  # (B, HW, d)
        T = captions.size(1)
        tgt = self.query_embed(captions) + self.pos_embed[:T]
        mask = torch.triu(torch.full((T, T), float("-inf"), device=captions.device), 1)
        return self.class_embed(self.transformer(tgt, memory, tgt_mask=mask))

    @torch.no_grad()
    def generate(self, images, max_len=16):
        return _greedy_steps(lambda seq: self(images, seq)[:, -1], images, 1, 2, 0, max_len)


# ---- 2. Up-down two-LSTM attention, dropout 0.5 (a slow learner) --------------------------------
class UpDown(nn.Module):
    """Anderson et al. 2018: an attention LSTM reads (h_lang, mean feature, word); a language LSTM
    reads (attended feature, h_att). Dropout 0.5 before the output layer, as in the paper's code."""

    def __init__(self, vocab=24, d=64, drop=0.5):
        super().__init__()
        self.cnn = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(4))
        self.embed = nn.Embedding(vocab, d)
        self.att_lstm = nn.LSTMCell(3 * d, d)
        self.lang_lstm = nn.LSTMCell(2 * d, d)
        self.v_att, self.h_att, self.w_att = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 1)
        self.drop = nn.Dropout(drop)
        self.logit = nn.Linear(d, vocab)
        self.d = d

    def step(self, feats, mean_feat, word, state):
        (h1, c1), (h2, c2) = state
        h1, c1 = self.att_lstm(torch.cat([h2, mean_feat, self.embed(word)], 1), (h1, c1))
        a = self.w_att(torch.tanh(self.v_att(feats) + self.h_att(h1)[:, None]))  # (B, R, 1)
        ctx = (a.softmax(1) * feats).sum(1)
        h2, c2 = self.lang_lstm(torch.cat([ctx, h1], 1), (h2, c2))
        return self.logit(self.drop(h2)), ((h1, c1), (h2, c2))

    def init(self, images):
        feats = self.cnn(images).flatten(2).transpose(1, 2)  # (B, 16, d)
        z = feats.new_zeros(feats.size(0), self.d)
        return feats, feats.mean(1), ((z, z), (z, z))

    def forward(self, images, captions):
        feats, mean_feat, state = self.init(images)
        outs = []
        for t in range(captions.size(1)):
            logit, state = self.step(feats, mean_feat, captions[:, t], state)
            outs.append(logit)
        return torch.stack(outs, 1)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        feats, mean_feat, state = self.init(images)
        B = images.size(0)
        seq = [torch.full((B,), 1, dtype=torch.long, device=images.device)]
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        for _ in range(max_len - 1):
            logit, state = self.step(feats, mean_feat, seq[-1], state)
            w = logit.argmax(1).masked_fill(done, 0)
            seq.append(w)
            done |= w == 2
            if done.all():
                break
        return torch.stack(seq, 1)


# ---- 3. Packed LSTM, enforce_sorted=False, dropout between layers, BatchNorm1d in the encoder --
class PackedUnsorted(nn.Module):
    def __init__(self, vocab=24, d=64, pad=0):
        super().__init__()
        self.pad = pad
        self.cnn = nn.Sequential(_conv(3, 32), _conv(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(64, d), nn.BatchNorm1d(d, momentum=0.01))  # the tutorial's encoder head
        self.embed = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, d, num_layers=2, dropout=0.3, batch_first=True)
        self.out = nn.Linear(d, vocab)

    def forward(self, images, captions):
        feat = self.fc(self.cnn(images))[:, None]  # (B, 1, d): the image is the first input
        x = torch.cat([feat, self.embed(captions)], 1)  # (B, 1+T, d)
        lengths = (captions != self.pad).sum(1).clamp(min=1) + 1  # the image step + words up to EOS
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.lstm(packed)
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=x.size(1))
        return self.out(h[:, 1:])  # (B, T, V): position t reads the image and words 0..t

    @torch.no_grad()
    def generate(self, images, max_len=16):
        x = self.fc(self.cnn(images))[:, None]
        _, state = self.lstm(x)
        word = torch.full((images.size(0),), 1, dtype=torch.long, device=images.device)
        seq, done = [word], torch.zeros_like(word, dtype=torch.bool)
        for _ in range(max_len - 1):
            h, state = self.lstm(self.embed(word)[:, None], state)
            word = self.out(h[:, 0]).argmax(-1).masked_fill(done, 0)
            seq.append(word)
            done |= word == 2
            if done.all():
                break
        return torch.stack(seq, 1)


# ---- 4. bf16 autocast inside forward ---------------------------------------------------------------
class AutocastCaptioner(nn.Module):
    """A model that runs its decoder under ``torch.autocast(dtype=torch.bfloat16)`` inside forward,
    as mixed-precision recipes wrap only the heavy part; parameters stay float32."""

    def __init__(self, vocab=24, d=64):
        super().__init__()
        self.encoder = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(4), nn.Flatten(2))
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(32, d)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, 4, 2 * d, 0.1, batch_first=True), 2)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, images, captions):
        mem = self.encoder(images).transpose(1, 2)  # (B, 16, d)
        T = captions.size(1)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=captions.device)
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            x = self.tok(captions) + self.pos.weight[:T]
            h = self.dec(x, mem, tgt_mask=causal, tgt_is_causal=True)
            logits = self.lm_head(h)
        return logits.float()

    @torch.no_grad()
    def generate(self, images, max_len=16):
        return _greedy_steps(lambda seq: self(images, seq)[:, -1], images, 1, 2, 0, max_len)


# ---- 5. Log-probabilities in a tuple, no generate, whole encoder frozen -------------------------
class LogProbAttnNoGenerate(nn.Module):
    """Returns ``(log_probs, attention weights)`` like many attention repos, has no ``generate``,
    and freezes the whole (pretend-pretrained) encoder with ``requires_grad_(False)``."""

    def __init__(self, vocab=24, d=64):
        super().__init__()
        self.encoder = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(4))
        self.encoder.requires_grad_(False)
        self.embedding = nn.Embedding(vocab, d)
        self.gru = nn.GRU(2 * d, d, batch_first=True)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc = nn.Linear(2 * d, vocab)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # frozen, so its BatchNorm statistics stay as they are
        return self

    def forward(self, images, captions):
        regions = self.encoder(images).flatten(2).transpose(1, 2)
        emb = self.embedding(captions)
        h, _ = self.gru(torch.cat([emb, regions.mean(1, keepdim=True).expand_as(emb)], -1))
        ctx, weights = self.att(h, regions, regions)
        return F.log_softmax(self.fc(torch.cat([h, ctx], -1)), -1), weights


# ---- 6. Memory-augmented region encoder (M2-style memory slots) -----------------------------------
class MemoryAttention(nn.Module):
    """Region self-attention whose keys and values are extended by learned memory slots. A region
    padding mask marks regions that do not exist (``n_regions``): all 16 exist here."""

    def __init__(self, d=64, slots=8, heads=4, mask_from_zeros=False):
        super().__init__()
        self.mk = nn.Parameter(torch.randn(1, slots, d) / math.sqrt(d))
        self.mv = nn.Parameter(torch.randn(1, slots, d) / math.sqrt(slots))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.mask_from_zeros = mask_from_zeros

    def forward(self, x, n_regions):
        B, R, _ = x.shape
        x = self.norm(x)
        if self.mask_from_zeros:
            pad = x.sum(-1) == 0  # public code: a padded region "is all zeros": on a LayerNorm output it is float noise
        else:
            pad = torch.arange(R, device=x.device)[None] >= n_regions[:, None]
        k = torch.cat([x, self.mk.expand(B, -1, -1)], 1)
        v = torch.cat([x, self.mv.expand(B, -1, -1)], 1)
        mask = torch.cat([pad, pad.new_zeros(B, self.mk.size(1))], 1)
        out, _ = self.attn(x, k, v, key_padding_mask=mask)
        return x + out


class MemoryCaptioner(nn.Module):
    def __init__(self, vocab=24, d=64, bug=None):
        super().__init__()
        self.cnn = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(4))
        self.enc = nn.ModuleList([MemoryAttention(d, mask_from_zeros=bug == "region_mask_from_zeros") for _ in range(2)])
        self.word = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(32, d))
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, 4, 2 * d, 0.1, batch_first=True), 2)
        self.out = nn.Linear(d, vocab)

    def encode(self, images):
        x = self.cnn(images).flatten(2).transpose(1, 2)
        n = torch.full((x.size(0),), x.size(1), device=x.device)
        for layer in self.enc:
            x = layer(x, n)
        return x

    def forward(self, images, captions):
        mem, T = self.encode(images), captions.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=captions.device).triu(1)
        return self.out(self.dec(self.word(captions) + self.pos[:T], mem, tgt_mask=causal))

    @torch.no_grad()
    def generate(self, images, max_len=16):
        mem = self.encode(images)
        causal = lambda T: torch.ones(T, T, dtype=torch.bool, device=images.device).triu(1)  # noqa: E731
        return _greedy_steps(lambda s: self.out(self.dec(self.word(s) + self.pos[:s.size(1)], mem,
                                                         tgt_mask=causal(s.size(1))))[:, -1], images, 1, 2, 0, max_len)


# ---- 7. A pretrained-style trunk frozen by torch.no_grad() --------------------------------------
class NoGradTrunk(nn.Module):
    """The PyTorch tutorial pattern: a (pretend-pretrained) trunk run under ``torch.no_grad()``, its
    parameters left with ``requires_grad=True`` and kept out of training. Clean: the trunk is kept
    in eval mode by a ``train()`` override. Twin ``trunk_bn_drifts``: it is not, so its BatchNorm
    statistics drift every training step (seen in public code)."""

    def __init__(self, vocab=24, d=64, bug=None):
        super().__init__()
        self.trunk = nn.Sequential(_conv(3, 32), _conv(32, 64), _conv(64, 64), nn.AdaptiveAvgPool2d(2))
        self.bug = bug
        self.proj = nn.Linear(64 * 4, d)
        self.embed = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def train(self, mode=True):
        super().train(mode)
        if self.bug != "trunk_bn_drifts":
            self.trunk.eval()
        return self

    def features(self, images):
        with torch.no_grad():
            f = self.trunk(images).flatten(1)  # (B, 64 * 2 * 2)
        return self.proj(f)

    def forward(self, images, captions):
        v = self.features(images)
        h0 = torch.tanh(v)[None]
        out, _ = self.rnn(self.embed(captions), (h0, torch.zeros_like(h0)))
        return self.head(out)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        v = self.features(images)
        h0 = torch.tanh(v)[None]
        state = (h0, torch.zeros_like(h0))
        word = torch.full((images.size(0), 1), 1, dtype=torch.long, device=images.device)
        seq, done = [word], torch.zeros(images.size(0), 1, dtype=torch.bool, device=images.device)
        for _ in range(max_len - 1):
            o, state = self.rnn(self.embed(word), state)
            word = self.head(o).argmax(-1).masked_fill(done, 0)
            seq.append(word)
            done |= word == 2
            if done.all():
                break
        return torch.cat(seq, 1)


# ---- 8. Scheduled sampling in train mode ------------------------------------------------------------
class ScheduledSampling(nn.Module):
    """Bengio et al. 2015: in train mode, each step feeds the model's own prediction instead of the
    ground-truth word with probability ``p``; eval mode is teacher-forced."""

    def __init__(self, vocab=24, d=64, p=0.25):
        super().__init__()
        self.enc = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.emb = nn.Embedding(vocab, d)
        self.cell = nn.GRUCell(2 * d, d)
        self.out = nn.Linear(d, vocab)
        self.p = p

    def forward(self, images, captions):
        v = self.enc(images)
        h = torch.tanh(v)
        logits, prev = [], captions[:, 0]
        for t in range(captions.size(1)):
            h = self.cell(torch.cat([self.emb(prev), v], 1), h)
            logits.append(self.out(h))
            if t + 1 < captions.size(1):
                prev = captions[:, t + 1]
                if self.training and self.p > 0:
                    use_own = torch.rand(prev.shape, device=prev.device) < self.p
                    prev = torch.where(use_own, logits[-1].detach().argmax(-1), prev)
        return torch.stack(logits, 1)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        v = self.enc(images)
        h = torch.tanh(v)
        prev = torch.full((images.size(0),), 1, dtype=torch.long, device=images.device)
        seq, done = [prev], torch.zeros_like(prev, dtype=torch.bool)
        for _ in range(max_len - 1):
            h = self.cell(torch.cat([self.emb(prev), v], 1), h)
            prev = self.out(h).argmax(-1).masked_fill(done, 0)
            seq.append(prev)
            done |= prev == 2
            if done.all():
                break
        return torch.stack(seq, 1)


# ---- 9. fairseq-style incremental decoding ----------------------------------------------------------
class IncrementalLayer(nn.Module):
    """A decoder layer that caches its keys/values in ``incremental_state`` (a dict passed along),
    as fairseq's ``incremental_state`` does, so that generation runs one token at a time."""

    def __init__(self, d, heads=4):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.cross_q, self.cross_kv = nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.o1, self.o2 = nn.Linear(d, d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def _split(self, x):
        B, T, D = x.shape
        return x.view(B, T, self.h, D // self.h).transpose(1, 2)

    def forward(self, x, mem, incremental_state: Optional[dict] = None):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).chunk(3, -1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        if incremental_state is not None:
            if "k" in incremental_state:
                k = torch.cat([incremental_state["k"], k], 2)
                v = torch.cat([incremental_state["v"], v], 2)
            incremental_state["k"], incremental_state["v"] = k, v
            a = F.scaled_dot_product_attention(q, k, v)  # one new query sees every cached key
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o1(a.transpose(1, 2).reshape(B, T, D))
        mk, mv = self.cross_kv(mem).chunk(2, -1)
        c = F.scaled_dot_product_attention(self._split(self.cross_q(self.n2(x))), self._split(mk), self._split(mv))
        x = x + self.o2(c.transpose(1, 2).reshape(B, T, D))
        return x + self.ff(self.n3(x))


class FairseqStyle(nn.Module):
    def __init__(self, vocab=24, d=64):
        super().__init__()
        self.encoder = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(4), nn.Flatten(2))
        self.embed_tokens = nn.Embedding(vocab, d)
        self.embed_positions = nn.Embedding(32, d)
        self.layers = nn.ModuleList([IncrementalLayer(d) for _ in range(2)])
        self.output_projection = nn.Linear(d, vocab)

    def extract(self, prev_tokens, mem, incremental_state=None, start=0):
        pos = torch.arange(start, start + prev_tokens.size(1), device=prev_tokens.device)
        x = self.embed_tokens(prev_tokens) + self.embed_positions(pos)
        for i, layer in enumerate(self.layers):
            x = layer(x, mem, None if incremental_state is None else incremental_state.setdefault(i, {}))
        return self.output_projection(x)

    def forward(self, images, captions):
        return self.extract(captions, self.encoder(images).transpose(1, 2))

    @torch.no_grad()
    def generate(self, images, max_len=16):
        mem = self.encoder(images).transpose(1, 2)
        state: dict = {}
        B = images.size(0)
        tokens = torch.full((B, 1), 1, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        for t in range(max_len - 1):
            nxt = self.extract(tokens[:, -1:], mem, state, start=t)[:, -1].argmax(-1).masked_fill(done, 0)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            done |= nxt == 2
            if done.all():
                break
        return tokens


# ---- 10. Hand-written GPT with an image prefix (GPT-2 ids) ------------------------------------------
class Block(nn.Module):
    def __init__(self, d, heads=4):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.h = heads

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, 2)
        q, k, v = (t.view(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, D)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class ClipPrefixGPT(nn.Module):
    """nanoGPT-style blocks; a CLIP-like pooled image vector mapped to ``K`` prefix embeddings
    (ClipCap's MLP mapping network); ``<|endoftext|>`` is pad, BOS and EOS (id 23)."""

    def __init__(self, vocab=24, d=64, K=4, special=23):
        super().__init__()
        self.K, self.special = K, special
        self.visual = nn.Sequential(_conv(3, 32), _conv(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64))
        self.clip_project = nn.Sequential(nn.Linear(64, K * d // 2), nn.Tanh(), nn.Linear(K * d // 2, K * d))
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(48, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, std=0.02)  # GPT-2's init (N(0, 1) rows would give logits of size ~d)

    def forward(self, images, captions):
        B, T = captions.shape
        prefix = self.clip_project(self.visual(images)).view(B, self.K, -1)
        x = torch.cat([prefix, self.wte(captions)], 1)
        x = x + self.wpe(torch.arange(x.size(1), device=x.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))[:, self.K:]  # (B, T, V)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        s = self.special
        return _greedy_steps(lambda seq: self(images, seq)[:, -1], images, s, s, s, max_len)


# ---- 11. FrozenBatchNorm2d backbone, pad == bos == eos == 0, BatchNorm1d in the head ---------------
class FrozenBNZeroIds(nn.Module):
    def __init__(self, vocab=24, d=64):
        from torchvision.ops.misc import FrozenBatchNorm2d

        super().__init__()
        self.backbone = nn.Sequential(_conv(3, 32, FrozenBatchNorm2d), _conv(32, d, FrozenBatchNorm2d), nn.AdaptiveAvgPool2d(2))
        self.backbone.requires_grad_(False)  # detectron-style: the stem is frozen
        self.input_proj = nn.Linear(d, d)
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(2 * d, d, batch_first=True)
        self.head = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, vocab))

    def forward(self, images, captions):
        ctx = self.input_proj(self.backbone(images).flatten(2).mean(2))  # (B, d)
        e = self.emb(captions)
        h, _ = self.lstm(torch.cat([e, ctx[:, None].expand_as(e)], -1))
        B, T, D = h.shape
        return self.head(h.reshape(B * T, D)).view(B, T, -1)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        return _greedy_steps(lambda seq: self(images, seq)[:, -1], images, 0, 0, 0, max_len)


# ---- 12. A forward that copies its images into a canvas made under no_grad ---------------------
class CanvasCopy(nn.Module):
    """Pads images into a fixed canvas: the inner view is made under ``no_grad`` and ``copy_``'d into
    with grad on, so images that require grad make it raise. Image module returns a dict."""

    def __init__(self, vocab=24, d=64):
        super().__init__()
        self.vision = VisionDict(d)
        self.emb = nn.Embedding(vocab, d)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.cls = nn.Linear(2 * d, vocab)

    def forward(self, images, captions):
        B, C, H, W = images.shape
        canvas = images.new_zeros(B, C, H + 8, W + 8)
        with torch.no_grad():
            inner = canvas[:, :, 4:-4, 4:-4]
        inner.copy_(images)
        out = self.vision(canvas)
        h, _ = self.gru(self.emb(captions), out["pooled"][None].contiguous())
        att = torch.softmax(h @ out["tokens"].transpose(1, 2) / 8.0, -1) @ out["tokens"]
        return {"logits": self.cls(torch.cat([h, att], -1)), "hidden": h}

    @torch.no_grad()
    def generate(self, images, max_len=16):
        return _greedy_steps(lambda seq: self(images, seq)["logits"][:, -1], images, 1, 2, 0, max_len)


class VisionDict(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.body = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(4))

    def forward(self, x):
        t = self.body(x).flatten(2).transpose(1, 2)
        return {"tokens": t, "pooled": torch.tanh(t.mean(1))}


# ---- 13. A random deep BatchNorm CNN + the tutorial decoder (teacher-forced in both modes) ---------
class DeepRandomBN(nn.Module):
    """A deep BatchNorm ResNet trunk, randomly initialized and fine-tuned (a typical from-scratch
    tutorial run), with the show-attend-tell tutorial's teacher-forced LSTM decoder. In eval mode at
    init its BatchNorm statistics (mean 0, var 1) do not match what the weights produce."""

    def __init__(self, vocab=24, d=64):
        import torchvision

        super().__init__()
        r = torchvision.models.resnet18(weights=None)
        self.encoder = nn.Sequential(r.conv1, r.bn1, r.relu, r.layer1, r.layer2, r.layer3)  # (B, 256, 2, 2) at 32 px
        self.enc_proj = nn.Linear(256, d)
        self.embedding = nn.Embedding(vocab, d)
        self.init_h, self.init_c = nn.Linear(d, d), nn.Linear(d, d)
        self.decode_step = nn.LSTMCell(2 * d, d)
        self.fc = nn.Linear(d, vocab)

    def forward(self, images, captions):
        enc = self.enc_proj(self.encoder(images).flatten(2).transpose(1, 2))  # (B, R, d)
        mean = enc.mean(1)
        h, c = self.init_h(mean), self.init_c(mean)
        outs = []
        for t in range(captions.size(1)):
            h, c = self.decode_step(torch.cat([self.embedding(captions[:, t]), mean], 1), (h, c))
            outs.append(self.fc(h))
        return torch.stack(outs, 1)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        return _greedy_steps(lambda seq: self(images, seq)[:, -1], images, 1, 2, 0, max_len)


# ---- 14. A generate() that returns ragged per-image lists (a per-image beam search) -------------
class RaggedBeam(nn.Module):
    def __init__(self, vocab=24, d=64):
        super().__init__()
        self.enc = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(2), nn.Flatten(2))
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(32, d)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, 2, 2 * d, 0.0, batch_first=True), 1)
        self.head = nn.Linear(d, vocab)

    def forward(self, images, captions):
        mem = self.enc(images).transpose(1, 2)
        T = captions.size(1)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=captions.device)
        return self.head(self.dec(self.emb(captions) + self.pos.weight[:T], mem, tgt_mask=mask, tgt_is_causal=True))

    @torch.no_grad()
    def generate(self, images, max_len=16, k=3):
        out = []
        for i in range(images.size(0)):
            beams = [([1], 0.0)]
            finished = []
            for _ in range(max_len - 1):
                seqs = torch.tensor([b[0] for b in beams], device=images.device)
                lp = self(images[i:i + 1].expand(len(beams), -1, -1, -1), seqs)[:, -1].log_softmax(-1)
                cand = [(b[0] + [w], b[1] + float(lp[j, w])) for j, b in enumerate(beams) for w in lp[j].topk(k).indices.tolist()]
                cand.sort(key=lambda c: -c[1])
                beams = []
                for c in cand[:k]:
                    (finished if c[0][-1] == 2 else beams).append(c)
                if not beams:
                    break
            best = max(finished or beams, key=lambda c: c[1] / len(c[0]))
            out.append(best[0])
        return out


# ---- 15. Sequence-first (T, B) LSTM with a detached encoder ------------------------------------------
class SeqFirstDetached(nn.Module):
    """Old-style code: tensors are (T, B, d) throughout (``batch_first=False``), and the encoder is kept
    out of training by ``.detach()`` on its features (its ``requires_grad`` stays True) and in eval."""

    def __init__(self, vocab=24, d=64):
        super().__init__()
        self.cnn = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.img2h = nn.Linear(d, d)
        self.embed = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, d)  # (T, B, d)
        self.out = nn.Linear(d, vocab)

    def train(self, mode=True):
        super().train(mode)
        self.cnn.eval()
        return self

    def forward(self, images, captions):
        h0 = torch.tanh(self.img2h(self.cnn(images).detach()))[None]  # (1, B, d)
        x = self.embed(captions.t())  # (T, B, d)
        y, _ = self.lstm(x, (h0, torch.zeros_like(h0)))
        return self.out(y).transpose(0, 1)  # (B, T, V)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        return _greedy_steps(lambda seq: self(images, seq)[:, -1], images, 1, 2, 0, max_len)


# ---- the family ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stranger:
    make: Callable[..., nn.Module]
    hints: dict
    what: str


GPT2 = dict(pad_id=23, bos_id=23, eos_id=23)
PATTERNS = {
    "detr_backbone": Stranger(lambda bug=None: DetrCaptioner(), _hints(image_module="backbone", attention_modules=[]),
                              "image module returns (features, positions), DETR-style"),
    "updown_two_lstm": Stranger(lambda bug=None: UpDown(), _hints(image_module="cnn", attention_modules=[]),
                                "up-down two-LSTM attention, dropout 0.5: a slow learner"),
    "packed_unsorted_bn1d": Stranger(lambda bug=None: PackedUnsorted(), _hints(image_module="fc"),
                                     "pack_padded_sequence(enforce_sorted=False), LSTM dropout, BatchNorm1d encoder head"),
    "autocast_bf16": Stranger(lambda bug=None: AutocastCaptioner(), _hints(image_module="encoder", attention_modules=[]),
                              "bf16 torch.autocast inside forward"),
    "logprob_tuple_no_generate": Stranger(lambda bug=None: LogProbAttnNoGenerate(), _hints(image_module="encoder", attention_modules=[]),
                                          "(log_probs, attention) tuple, no generate, encoder frozen by requires_grad_(False)"),
    "memory_augmented": Stranger(lambda bug=None: MemoryCaptioner(bug=bug), _hints(image_module="cnn", attention_modules=[]),
                                 "memory slots in the region attention, region padding mask"),
    "nograd_trunk_eval": Stranger(lambda bug=None: NoGradTrunk(bug=bug), _hints(image_module="proj"),
                                  "trunk frozen by torch.no_grad() (requires_grad left True), kept in eval"),
    "scheduled_sampling": Stranger(lambda bug=None: ScheduledSampling(), _hints(image_module="enc"),
                                   "scheduled sampling in train mode"),
    "fairseq_incremental": Stranger(lambda bug=None: FairseqStyle(), _hints(image_module="encoder", attention_modules=[]),
                                    "fairseq-style incremental decoding with a per-layer cache"),
    "clip_prefix_gpt": Stranger(lambda bug=None: ClipPrefixGPT(), _hints(image_module="clip_project", attention_modules=[], **GPT2),
                                "hand-written GPT (SDPA) with a ClipCap prefix, pad == bos == eos"),
    "frozen_bn_zero_ids": Stranger(lambda bug=None: FrozenBNZeroIds(), _hints(image_module="backbone", pad_id=0, bos_id=0, eos_id=0),
                                   "FrozenBatchNorm2d backbone, pad == bos == eos == 0, BatchNorm1d head"),
    "canvas_copy_dict": Stranger(lambda bug=None: CanvasCopy(), _hints(image_module="vision", attention_modules=[]),
                                 "copy_ into a no_grad view of a canvas; image module returns a dict"),
    "deep_random_bn": Stranger(lambda bug=None: DeepRandomBN(), _hints(image_module="encoder"),
                               "random ResNet-18 trunk (BatchNorm) + teacher-forced tutorial LSTM"),
    "ragged_beam": Stranger(lambda bug=None: RaggedBeam(), _hints(image_module="enc", attention_modules=[]),
                            "per-image beam search returning ragged lists"),
    "seq_first_detached": Stranger(lambda bug=None: SeqFirstDetached(), _hints(image_module="img2h", attention_modules=[]),
                                   "(T, B, d) LSTM; encoder kept out of training by .detach() and eval"),
}

# bug -> (stranger it is planted in, check that must name it)
BUGS = {
    "region_mask_from_zeros": ("memory_augmented", "batch_independence"),
    "trunk_bn_drifts": ("nograd_trunk_eval", "frozen_drift"),
}


def build(name: str, bug: Optional[str] = None, seed: int = 0) -> nn.Module:
    """Build stranger ``name`` (with ``bug`` planted, see ``BUGS``); its hints are on ``capdiag_hints``."""
    return build_member(PATTERNS[name].make, PATTERNS[name].hints, BUGS, name, bug, seed)

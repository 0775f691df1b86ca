"""Strangers 1-8 (see ``capdiag.testing.strangers``): image modules, encoders and training modes written
the way public repositories write them."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .family import _conv, _greedy_steps


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

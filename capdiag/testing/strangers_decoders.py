"""Strangers 9-15 (see ``capdiag.testing.strangers``): decoders, ids and generate() written the way public
repositories write them."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .family import _conv, _greedy_steps


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

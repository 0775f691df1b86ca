"""The unusual family's shared parts and Transformer decoders (see ``capdiag.testing.unusual``)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from capdiag.models.decoding import greedy


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


RAW = dict(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))  # the model normalizes itself


def conv_bn(cin, cout, stride=2):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A few strided conv-BN-ReLU stages and a 4x4 adaptive pool: (B, 3, H, W) -> (B, C, 4, 4).
    ``stem_stride`` 4 keeps 224 px inputs cheap."""

    def __init__(self, width=32, stages=2, stem_stride=2):
        super().__init__()
        layers, c = [conv_bn(3, 16, stem_stride)], 16
        for _ in range(stages - 1):
            layers.append(conv_bn(c, width))
            c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.out_channels = c

    def forward(self, x):
        return self.pool(self.features(x))


def regions_of(fmap):
    return fmap.flatten(2).transpose(1, 2)  # (B, C, 4, 4) -> (B, 16, C)


def next_greedy(seq, done, logits, pad: int, eos: int):
    """Append the argmax of ``logits`` (B, V) to ``seq`` (rows already done get ``pad``)."""
    nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1))
    return torch.cat([seq, nxt[:, None]], 1), done | (nxt == eos)


class TutorialPositionalEncoding(nn.Module):
    """The PyTorch tutorial's sinusoidal encoding, written for (T, B, d) inputs."""

    def __init__(self, d, max_len=64, batch_axis_bug=False):
        super().__init__()
        pe = torch.zeros(max_len, d)
        pos = torch.arange(max_len).float()[:, None]
        div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe[:, None])  # (max_len, 1, d)
        self.batch_axis_bug = batch_axis_bug

    def forward(self, x):  # x: (B, T, d), batch first
        if self.batch_axis_bug:
            return x + self.pe[: x.size(0)]  # tutorial code kept for (T, B, d): adds pe[b] to sample b
        return x + self.pe[: x.size(1)].transpose(0, 1)  # (1, T, d)


# ---- Transformer decoders ----------------------------------------------------------------------
class TransformerCaptioner(nn.Module):
    """CNN regions -> Transformer decoder. Options cover several patterns:

    ``image_module`` "proj" (a projection after pooled, ReLU'd features), tied embeddings,
    reentrant checkpointing of the CNN's later stages and the decoder, a fine-tuned BatchNorm
    encoder, GPT-2 ids (pad == bos == eos), beam search, 224 px input.
    """

    def __init__(self, vocab=24, pad=0, bos=1, eos=2, d=64, tie=False, ckpt=None, beam=0, stem_stride=2,
                 stages=2, bug=None):
        super().__init__()
        self.vocab, self.pad, self.bos, self.eos, self.d = vocab, pad, bos, eos, d
        self.ckpt, self.beam, self.bug = ckpt, beam, bug
        self.cnn = SmallCNN(32, stages, stem_stride)
        self.proj = nn.Linear(self.cnn.out_channels, d)
        self.embed = nn.Embedding(vocab, d)
        self.pos = TutorialPositionalEncoding(d, batch_axis_bug=bug == "positional_along_batch")
        layer = nn.TransformerDecoderLayer(d, 4, 128, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(d, vocab, bias=not tie)
        if tie:
            nn.init.normal_(self.embed.weight, std=d ** -0.5)  # N(0, 1) rows would give logits of size ~d
            self.head.weight = self.embed.weight  # weight tying (Press & Wolf 2017)
        self._cache = None

    def encode(self, images):
        if self.bug == "cached_encoder" and self._cache is not None and self._cache.shape[0] == images.shape[0]:
            return self._cache  # "speed-up": reuse the features when the batch size matches
        if self.ckpt:
            x = self.cnn.features[0](images)  # the stem stays outside: its input needs no grad
            x = checkpoint(nn.Sequential(*self.cnn.features[1:]), x, use_reentrant=self.ckpt == "reentrant")
            fmap = self.cnn.pool(x)
        else:
            fmap = self.cnn(images)
        memory = self.proj(F.relu(regions_of(fmap)))  # (B, 16, d)
        if self.bug == "cached_encoder":
            self._cache = memory.detach()
        return memory

    def decode(self, memory, captions):
        T = captions.shape[1]
        x = self.pos(self.embed(captions) * math.sqrt(self.d))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=captions.device)
        if self.ckpt:
            h = checkpoint(lambda a, m: self.decoder(a, m, tgt_mask=causal, tgt_is_causal=True), x, memory,
                           use_reentrant=self.ckpt == "reentrant")
        else:
            h = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True)
        return self.head(h)  # (B, T, V)

    def forward(self, images, captions):
        return self.decode(self.encode(images), captions)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        memory = self.encode(images)
        if self.beam:
            return beam_search(lambda m, seq: self.decode(m, seq)[:, -1], memory, self.beam, self.bos, self.eos,
                               self.pad, max_len)
        return greedy(lambda seq: self.decode(memory, seq)[:, -1], images.shape[0], bos=self.bos, eos=self.eos,
                      pad=self.pad, max_len=max_len, device=images.device)


def beam_search(score: Callable, memory, k, bos, eos, pad, max_len, alpha=0.7):
    """Per-image beam search with GNMT length normalization, as most captioning repos write it."""
    outs = []
    for b in range(memory.shape[0]):
        mem = memory[b : b + 1]
        beams = [(torch.tensor([bos], device=memory.device), 0.0, False)]
        for _ in range(max_len - 1):
            if all(done for _, _, done in beams):
                break
            cands = []
            live = [bm for bm in beams if not bm[2]]
            seqs = torch.stack([s for s, _, _ in live])
            logp = F.log_softmax(score(mem.expand(len(live), -1, -1), seqs).float(), -1)  # (n, V)
            for (s, lp, _), row in zip(live, logp):
                top = row.topk(k)
                for v, i in zip(top.values.tolist(), top.indices.tolist()):
                    cands.append((torch.cat([s, s.new_tensor([i])]), lp + v, i == eos))
            cands += [bm for bm in beams if bm[2]]
            cands.sort(key=lambda c: c[1] / (((5 + len(c[0])) / 6) ** alpha), reverse=True)
            beams = cands[:k]
        best = max(beams, key=lambda c: c[1] / (((5 + len(c[0])) / 6) ** alpha))[0]
        outs.append(best)
    L = max(len(s) for s in outs)
    return torch.stack([F.pad(s, (0, L - len(s)), value=pad) for s in outs])


class PrefixLM(nn.Module):
    """Image regions pooled to K prefix tokens in front of the caption in one Transformer stack:
    the prefix attends bidirectionally to itself, caption tokens see the whole prefix and their past
    (a "prefix LM", as in SimVLM). Logits of the prefix positions are sliced off. GPT-2-style ids."""

    def __init__(self, vocab=24, pad=23, bos=23, eos=23, d=64, K=4):
        super().__init__()
        self.vocab, self.pad, self.bos, self.eos, self.K = vocab, pad, bos, eos, K
        self.cnn = SmallCNN(32)
        self.to_prefix = nn.Linear(32, d)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, 64, d))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def prefix(self, images):
        fmap = F.adaptive_avg_pool2d(self.cnn(images), 2)  # (B, 32, 2, 2)
        return self.to_prefix(regions_of(fmap))  # (B, K=4, d)

    def forward(self, images, captions):
        K, T = self.K, captions.shape[1]
        x = torch.cat([self.prefix(images), self.tok(captions)], 1) + self.pos[:, : K + T]
        mask = torch.full((K + T, K + T), float("-inf"), device=captions.device)
        mask[:, :K] = 0.0  # everything sees the prefix
        mask[K:, K:] = nn.Transformer.generate_square_subsequent_mask(T, device=captions.device)  # causal captions
        h = self.ln(self.blocks(x, mask=mask))
        return self.lm_head(h[:, K:])  # (B, T, V)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        return greedy(lambda seq: self.forward(images, seq)[:, -1], images.shape[0], bos=self.bos, eos=self.eos,
                      pad=self.pad, max_len=max_len, device=images.device)


class GPT2Prefix(nn.Module):
    """A ClipCap-style prefix model over a tiny GPT-2 (transformers, random weights from a config):
    pooled CNN regions -> MLP -> K prefix embeddings, the caption embedded by calling GPT-2's token
    embedding directly, both concatenated and passed as ``inputs_embeds``. GPT-2 ids (pad == bos == eos)."""

    def __init__(self, vocab=24, special=23, d=64, K=4):
        super().__init__()
        import transformers as tf

        self.vocab, self.pad, self.bos, self.eos, self.K = vocab, special, special, special, K
        self.cnn = SmallCNN(32)
        self.clip_project = nn.Sequential(nn.Linear(32 * 4, d * K // 2), nn.Tanh(), nn.Linear(d * K // 2, d * K))
        cfg = tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=d, n_layer=2, n_head=4, bos_token_id=special,
                            eos_token_id=special, pad_token_id=special, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
        self.gpt = tf.GPT2LMHeadModel(cfg)

    def forward(self, images, captions):
        B, T = captions.shape
        fmap = F.adaptive_avg_pool2d(self.cnn(images), 2).flatten(1)  # (B, 128)
        prefix = self.clip_project(fmap).view(B, self.K, -1)  # (B, K, d)
        tokens = self.gpt.transformer.wte(captions)  # (B, T, d)
        out = self.gpt(inputs_embeds=torch.cat([prefix, tokens], 1))
        return {"logits": out.logits[:, self.K :]}  # (B, T, V): drop the prefix positions

    @torch.no_grad()
    def generate(self, images, max_len=16):
        return greedy(lambda seq: self.forward(images, seq)["logits"][:, -1], images.shape[0], bos=self.bos,
                      eos=self.eos, pad=self.pad, max_len=max_len, device=images.device)

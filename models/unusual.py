"""Clean but unusual captioners, written the way people write them, each of which must pass every
capdiag check: a false alarm on any of them is a bug of capdiag's.

They differ from the reference models and the zoo on purpose: a frozen encoder under
``torch.no_grad()``, an image module that is a projection after pooled features, normalization or
``/ 255`` inside ``forward``, the popular tutorial's length-sorted decoder with zeros past each
caption's end, dropout 0.5 with sorting, tied embeddings, activation checkpointing (reentrant and
not), GPT-2 (pad == bos == eos) and CLIP (eos == pad) ids, BOS id 0, a prefix LM with a
bidirectional image prefix, dict and ModelOutput-style returns, beam search, 96 and 224 px inputs.

``build(name, bug=None, seed=0)`` builds one; ``PATTERNS`` lists them with their architecture;
``BUGS`` maps the planted bugs (one-line changes of a clean pattern) to the check that must fail.
Every bug here has been seen in public captioning code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from capdiag.models.decoding import greedy
from capdiag.models.show_attend_tell import Attention  # the paper's additive attention, written once

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


# ---- the family ----------------------------------------------------------------------------------
def _ids(pad, bos, eos, vocab=24):
    return dict(vocab_size=vocab, pad_id=pad, bos_id=bos, eos_id=eos)


GPT2_IDS = _ids(23, 23, 23)  # pad == bos == eos ("<|endoftext|>")
CLIP_IDS = _ids(23, 22, 23)  # eos == pad
BOS0_IDS = _ids(2, 0, 1)


@dataclass(frozen=True)
class Pattern:
    arch: str
    make: Callable[..., nn.Module]
    hints: dict
    what: str


def _std(**kw):
    return {**dict(vocab_size=24, pad_id=0, bos_id=1, eos_id=2, image_size=32, image_mean=IMAGENET_MEAN,
                   image_std=IMAGENET_STD), **kw}


PATTERNS = {
    "frozen_nograd_encoder": Pattern("gru", lambda bug=None: GRUCaptioner(frozen=True, keep_frozen_eval=bug != "frozen_bn_drifts"),
                                     _std(image_module="encoder"),
                                     "frozen encoder under torch.no_grad(), BatchNorm kept in eval"),
    "projection_image_module": Pattern("transformer", lambda bug=None: TransformerCaptioner(bug=bug),
                                       _std(image_module="proj", attention_modules=[]),
                                       "image_module is a projection after pooled ReLU features"),
    "normalize_inside": Pattern("lstm", lambda bug=None: SortedAttentionLSTM(normalize=True),
                                {**_std(image_module="encoder", attention_modules=["attention"]), **RAW},
                                "ImageNet normalization inside forward, images in [0, 1]"),
    "divide_255_inside": Pattern("gru", lambda bug=None: GRUCaptioner(raw_pixels=True),
                                 {**_std(image_module="encoder", attention_modules=[]), **RAW, "pixel_scale": 255.0},
                                 "raw 0-255 pixels divided by 255 and normalized inside forward"),
    "sorted_tutorial_lstm": Pattern("lstm", lambda bug=None: SortedAttentionLSTM(dropout=0.0),
                                    _std(image_module="encoder", attention_modules=["attention"]),
                                    "lengths from padding, sorted batch, zeros past each caption's end"),
    "dropout_sorted_lstm": Pattern("lstm", lambda bug=None: SortedAttentionLSTM(dropout=0.5),
                                   _std(image_module="encoder", attention_modules=["attention"]),
                                   "dropout 0.5 plus length sorting"),
    "packed_lstm_bos0": Pattern("lstm", lambda bug=None: PackedLSTM(), {**_std(image_module="cnn"), **BOS0_IDS},
                                "pack_padded_sequence, image as first input, BOS id 0"),
    "tied_embeddings": Pattern("transformer", lambda bug=None: TransformerCaptioner(tie=True, bug=bug),
                               _std(image_module="cnn", attention_modules=[]), "weight-tied input/output embeddings"),
    "reentrant_checkpoint": Pattern("transformer", lambda bug=None: TransformerCaptioner(ckpt="reentrant"),
                                    _std(image_module="cnn", attention_modules=[]),
                                    "reentrant activation checkpointing over BatchNorm stages and the decoder"),
    "nonreentrant_checkpoint": Pattern("gru", lambda bug=None: GRUCaptioner(ckpt=True),
                                       _std(image_module="encoder", attention_modules=[]),
                                       "non-reentrant activation checkpointing of the decoder"),
    "finetuned_bn_encoder": Pattern("transformer", lambda bug=None: TransformerCaptioner(stages=3),
                                    _std(image_module="cnn", attention_modules=[]),
                                    "encoder fine-tuned with BatchNorm in train mode"),
    "gpt2_ids": Pattern("transformer", lambda bug=None: TransformerCaptioner(**_pbe(GPT2_IDS)),
                        {**_std(image_module="cnn", attention_modules=[]), **GPT2_IDS}, "pad == bos == eos"),
    "clip_ids": Pattern("gru", lambda bug=None: GRUCaptioner(**_pbe(CLIP_IDS)),
                        {**_std(image_module="encoder", attention_modules=[]), **CLIP_IDS}, "eos == pad, bos separate"),
    "gpt2_prefix_inputs_embeds": Pattern("transformer", lambda bug=None: GPT2Prefix(),
                                         {**_std(image_module="clip_project", attention_modules=[]), **GPT2_IDS},
                                         "ClipCap-style: GPT-2 token embedding called directly, inputs_embeds"),
    "prefix_lm": Pattern("transformer", lambda bug=None: PrefixLM(),
                         {**_std(image_module="to_prefix", attention_modules=[]), **GPT2_IDS},
                         "prefix LM: bidirectional image prefix, causal caption"),
    "dict_output": Pattern("lstm", lambda bug=None: SortedAttentionLSTM(returns="dict", dropout=0.2),
                           _std(image_module="encoder", attention_modules=["attention"]), "returns a dict with logits"),
    "model_output": Pattern("gru", lambda bug=None: GRUCaptioner(returns="output"),
                            _std(image_module="encoder", attention_modules=[]), "returns a ModelOutput-style object"),
    "beam_search": Pattern("transformer", lambda bug=None: TransformerCaptioner(beam=3),
                           _std(image_module="cnn", attention_modules=[]), "beam-search generate"),
    "gru_96px": Pattern("gru", lambda bug=None: GRUCaptioner(stages=3), _std(image_module="encoder", attention_modules=[], image_size=96),
                        "96 px input"),
    "transformer_224px": Pattern("transformer", lambda bug=None: TransformerCaptioner(stem_stride=4, stages=4),
                                 _std(image_module="cnn", attention_modules=[], image_size=224), "224 px input"),
}


def _pbe(ids):
    return dict(pad=ids["pad_id"], bos=ids["bos_id"], eos=ids["eos_id"])


# bug -> (pattern it is planted in, check that must fail)
BUGS = {
    "positional_along_batch": ("projection_image_module", "batch_independence"),
    "cached_encoder": ("tied_embeddings", "eval_determinism"),
    "frozen_bn_drifts": ("frozen_nograd_encoder", "frozen_drift"),
}


def build(name: str, bug: Optional[str] = None, seed: int = 0) -> nn.Module:
    """Build pattern ``name`` (with ``bug`` planted, see ``BUGS``); its hints are on ``capdiag_hints``."""
    if bug is not None and BUGS.get(bug, (None,))[0] != name:
        raise ValueError(f"bug {bug!r} is not planted in {name!r}; see BUGS")
    torch.manual_seed(seed)
    p = PATTERNS[name]
    model = p.make(bug)
    model.capdiag_hints = dict(p.hints)
    return model

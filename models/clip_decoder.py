"""CLIP-conditioned Transformer decoder: CLIP ViT patch embeddings attended by a 6-layer,
8-head, 512-wide Transformer decoder (the CLIP-encoder captioners of e.g. Shen et al. 2021,
"How Much Can CLIP Benefit Vision-and-Language Tasks?", arXiv:2107.06383; decoder after
Vaswani et al. 2017).

The CLIP vision tower (Hugging Face ``CLIPVisionModelWithProjection``) gives ``(B, 1+N, h)``
tokens; the N patch tokens go through CLIP's own post-LayerNorm and projection ``(B, N, P)``
and a linear map to ``d_model``: the decoder's memory, one region per patch (a square grid, so
attention maps overlay the image). The tower is built from a configuration with random weights,
or loaded from local weights (``clip_weights=``), in which case it can be frozen.

Ids follow the CLIP tokenizer: ``<|startoftext|>`` and ``<|endoftext|>`` are the last two ids,
and pad is ``<|endoftext|>`` too (eos == pad), so padding is found by position.

Planted bugs (``build_model(bug=...)``):
  no_causal_mask                decoder called without tgt_mask
  image_not_fed                 the decoder's memory is a learned constant, not the image
  loss_counts_padding           the file's loss_fn averages over pad positions too
  bleu_counts_padding           the file's bleu_fn scores pad tokens as words
  xavier_init_clobbers_encoder  xavier over every Linear/Conv, the loaded CLIP tower included
                                (caught when real CLIP weights were loaded)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn

from capdiag.models.decoding import generate
from capdiag.models.hf_parts import CLIP_FULL, CLIP_MEAN, CLIP_SMALL, CLIP_STD, clip_vision, weights_file
from capdiag.models.recipe import bleu4, caption_loss, planted, xavier_init
from capdiag.models.registry import LOCAL_CLIP, register_model
from capdiag.models.transformer_decoder import CaptionDecoder, DecoderConfig, DecodesMemory

# bug -> the check that must fail on it (the xavier twin: against a local CLIP checkpoint)
BUGS = {"no_causal_mask": "causal_leak", "image_not_fed": "gradient_reachability", "loss_counts_padding": "loss_sanity",
        "bleu_counts_padding": "metric_sanity", "xavier_init_clobbers_encoder": "pretrained_guard"}


@dataclass
class Config(DecoderConfig):
    positions: str = "learned"  # or "sinusoidal"
    clip: dict = field(default_factory=lambda: dict(CLIP_SMALL))
    clip_weights: Optional[str] = None  # local folder / cached name of a CLIP checkpoint
    freeze_clip: bool = False

    @property
    def bos(self) -> int:
        return self.vocab_size - 2  # <|startoftext|>

    @property
    def eos(self) -> int:
        return self.vocab_size - 1  # <|endoftext|>, also the pad token


FULL = Config(vocab_size=49408, d_model=512, n_heads=8, n_layers=6, d_ff=2048, clip=dict(CLIP_FULL))


class ClipDecoderCaptioner(DecodesMemory, nn.Module):
    def __init__(self, cfg: Config = Config(), bug: Optional[str] = None):
        super().__init__()
        self.cfg, self.bug = cfg, planted(bug, BUGS)
        self.clip = clip_vision(cfg.clip, cfg.clip_weights)
        grid = self.clip.config.image_size // self.clip.config.patch_size
        self.proj = nn.Linear(self.clip.config.projection_dim, cfg.d_model)
        self.text = CaptionDecoder(cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, cfg.dropout,
                                   cfg.max_len, cfg.eos, cfg.positions)
        if bug == "image_not_fed":
            self.memory_const = nn.Parameter(torch.zeros(1, grid * grid, cfg.d_model))
        self.init_weights()
        if cfg.freeze_clip:
            self.clip.requires_grad_(False)

    def init_weights(self):
        if self.bug == "xavier_init_clobbers_encoder":
            self.apply(xavier_init)  # reaches the CLIP tower too
        else:
            for part in (self.proj, self.text.decoder, self.text.lm_head):
                part.apply(xavier_init)
        nn.init.normal_(self.text.embed.weight, std=0.02)
        if self.bug != "xavier_init_clobbers_encoder":
            nn.init.normal_(self.text.lm_head.weight, std=0.02)  # the loss starts at ln(V)

    @property
    def image_size(self) -> int:
        return self.clip.config.image_size

    def memory(self, images):
        if self.bug == "image_not_fed":
            return self.memory_const.expand(images.shape[0], -1, -1)
        tokens = self.clip.vision_model(pixel_values=images).last_hidden_state  # (B, 1+N, h)
        patches = self.clip.vision_model.post_layernorm(tokens[:, 1:])  # (B, N, h): the class token dropped
        return self.proj(self.clip.visual_projection(patches))  # (B, N, d)

    @torch.no_grad()
    def generate(self, images, max_len: int = 20, beam_size: int = 1, alpha: float = 0.6, min_len: int = 0):
        """Greedy (beam_size=1) or beam search; ids (B, L) start with <|startoftext|>."""
        return generate(self.memory(images), self.decode, bos=self.cfg.bos, eos=self.cfg.eos, pad=self.cfg.eos,
                        max_len=max_len, beam_size=beam_size, alpha=alpha, min_len=min_len)

    def loss_fn(self, logits, captions):
        return caption_loss(logits, captions, self.cfg.eos, count_padding=self.bug == "loss_counts_padding")

    def bleu_fn(self, references, hypotheses):
        return bleu4(references, hypotheses, self.cfg.bos, self.cfg.eos, self.bug == "bleu_counts_padding")


CAPDIAG = dict(vocab_size=Config.vocab_size, pad_id=Config.vocab_size - 1, bos_id=Config.vocab_size - 2,
               eos_id=Config.vocab_size - 1, image_size=CLIP_SMALL["image_size"], image_mean=CLIP_MEAN,
               image_std=CLIP_STD, max_len=12, image_module="clip.vision_model", pretrained={})


@register_model("clip_decoder", hints=CAPDIAG, bugs=BUGS, needs=("transformers",), pretrained=LOCAL_CLIP,
                bug_variants={"xavier_init_clobbers_encoder": "pretrained"})
def build_model(bug: Optional[str] = None, size: str = "small", **overrides) -> ClipDecoderCaptioner:
    """Small CPU config by default; ``size="full"`` for ViT-B/32 + the 6-layer, 8-head, 512-wide
    decoder. ``clip_weights=`` loads a local Hugging Face CLIP checkpoint."""
    cfg = FULL if size == "full" else Config()
    cfg = replace(cfg, **overrides)
    model = ClipDecoderCaptioner(cfg, bug)
    model.capdiag_hints = dict(
        vocab_size=cfg.vocab_size, pad_id=cfg.eos, bos_id=cfg.bos, eos_id=cfg.eos, image_size=model.image_size,
        pretrained={"clip": weights_file(cfg.clip_weights)} if cfg.clip_weights else {})
    return model



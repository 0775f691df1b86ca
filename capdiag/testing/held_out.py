"""Held-out: a captioner written in one more style, and bug twins of the classes localization used
to miss on code it had never seen. Every twin is one change a user makes; each must fail its check
with a location in this file (``SITES`` says which module and line), and the clean model must pass.

The clean model: a small BatchNorm CNN whose 4x4 grid is the memory of a hand-written decoder
(token + learned position embeddings, causal self-attention, cross-attention to the grid) trained
with cross-entropy on logits. ``generate()`` decodes greedily and incrementally: it keeps the
embedded prefix and runs only the new token's query, with its position id from the step counter.

Twins (bug -> check):

- ``softmax_head``: the head returns ``logits.softmax(-1)`` and the loss applies its own log-softmax
  (overfit);
- ``caption_view_write``: ``dec_in = captions[:, :-1]; dec_in[dec_in == EOS] = PAD`` writes into the
  caller's captions through a view (input_mutation);
- ``sampling_generate``: ``generate()`` samples with ``torch.multinomial`` (eval_determinism);
- ``positions_stuck``: ``generate()``'s position ids are ``torch.zeros`` at every step
  (decoding_consistency);
- ``generate_no_image``: ``generate()`` hands the decoder a learned null memory instead of the grid
  (decoding_consistency);
- ``encoder_train_in_forward``: ``self.encoder.train()`` inside forward: its BatchNorm normalizes
  with batch statistics in eval mode (batch_independence);
- ``cached_grid``: the grid is kept on ``self`` and reused while the batch size matches
  (eval_determinism);
- ``strict_false_load`` (a separate model with the real EfficientNet-Lite0 trunk): the ImageNet
  weights, saved from a ``DataParallel`` wrapper, are loaded with ``strict=False`` under their
  ``module.`` prefix, so nothing loads (pretrained_guard).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .family import build_member
from .family import _conv, _hints

BOS, EOS, PAD = 1, 2, 0


class Block(nn.Module):
    """Pre-norm decoder block; ``forward(x, past, memory, mask)`` attends from ``x`` over ``past``."""

    def __init__(self, d: int):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.cross = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, past, memory, mask=None):
        q, kv = self.n1(x), self.n1(past)
        x = x + self.self_attn(q, kv, kv, attn_mask=mask, need_weights=False)[0]
        x = x + self.cross(self.n2(x), memory, memory, need_weights=False)[0]
        return x + self.ff(self.n3(x))


class GridCaptioner(nn.Module):
    def __init__(self, vocab: int = 24, d: int = 64, bug: Optional[str] = None):
        super().__init__()
        self.encoder = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(4))
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(32, d)
        self.block = Block(d)
        self.head = nn.Linear(d, vocab)
        self.null_memory = nn.Parameter(torch.zeros(1, 16, d))  # used only by the generate_no_image twin
        self.bug = bug
        self._grid = None

    def grid(self, images):
        if self.bug == "cached_grid" and self._grid is not None and self._grid.shape[0] == images.shape[0]:
            return self._grid
        g = self.encoder(images).flatten(2).transpose(1, 2)  # (B, 16, d)
        if self.bug == "cached_grid":
            self._grid = g.detach()  # "the encoder is frozen anyway"
        return g

    def forward(self, images, captions):
        if self.bug == "encoder_train_in_forward":
            self.encoder.train()  # "fine-tune the CNN as well"
        memory = self.grid(images)
        dec_in = captions[:, :-1]
        if self.bug == "caption_view_write":
            dec_in[dec_in == EOS] = PAD  # the decoder never reads EOS (written through a view of captions)
        T = dec_in.shape[1]
        x = self.tok(dec_in) + self.pos(torch.arange(T, device=dec_in.device))  # (B, T, d)
        mask = torch.triu(torch.full((T, T), float("-inf"), device=x.device), 1)
        logits = self.head(self.block(x, x, memory, mask))  # (B, T, V): scores captions[:, 1:]
        if self.bug == "softmax_head":
            return logits.softmax(-1)  # "the model outputs probabilities"
        return logits

    @torch.no_grad()
    def generate(self, images, max_len: int = 16):
        B = images.shape[0]
        memory = self.grid(images)
        if self.bug == "generate_no_image":
            memory = self.null_memory.expand(B, -1, -1)
        seq = torch.full((B, 1), BOS, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        past = None
        for t in range(max_len - 1):
            if self.bug == "positions_stuck":
                pos_ids = torch.zeros(B, 1, dtype=torch.long, device=images.device)
            else:
                pos_ids = torch.full((B, 1), t, dtype=torch.long, device=images.device)
            x = self.tok(seq[:, -1:]) + self.pos(pos_ids)  # (B, 1, d): only the new token
            past = x if past is None else torch.cat([past, x], 1)
            logits = self.head(self.block(x, past, memory))[:, -1]
            if self.bug == "sampling_generate":
                word = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
            else:
                word = logits.argmax(-1)
            word = word.masked_fill(done, PAD)
            seq = torch.cat([seq, word[:, None]], 1)
            done |= word == EOS
            if bool(done.all()):
                break
        return seq


class LoadedEncoderCaptioner(nn.Module):
    """The real ImageNet EfficientNet-Lite0 trunk, loaded from a checkpoint saved from a DataParallel
    wrapper (keys ``module.*``), and a GRU decoder initialized from its pooled features."""

    def __init__(self, vocab: int = 24, d: int = 64, bug: Optional[str] = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        from capdiag.models.encoders import lite0_state_dict

        self.encoder = EfficientNet.from_name("efficientnet-lite0")
        saved = {f"module.{k}": v for k, v in lite0_state_dict().items()}  # as torch.save(DataParallel) wrote it
        if bug == "strict_false_load":
            self.encoder.load_state_dict(saved, strict=False)  # "some keys do not match; skip them"
        else:
            self.encoder.load_state_dict({k.removeprefix("module."): v for k, v in saved.items()})
        self.encoder._fc = nn.Identity()
        self.proj = nn.Linear(1280, d)
        self.embed = nn.Embedding(vocab, d)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.out = nn.Linear(d, vocab)

    def forward(self, images, captions):
        f = self.encoder.extract_features(images).mean((2, 3))  # (B, 1280)
        h = torch.tanh(self.proj(f))[None]  # (1, B, d)
        y, _ = self.gru(self.embed(captions[:, :-1]), h)
        return self.out(y)  # (B, T-1, V)


HINTS = _hints(image_module="encoder", attention_modules=[])
LOADED_HINTS = _hints(image_module="encoder", attention_modules=[], image_size=64, pretrained=["encoder"])
PATTERNS = {"grid": lambda bug=None: GridCaptioner(bug=bug), "loaded_encoder": lambda bug=None: LoadedEncoderCaptioner(bug=bug)}

BUGS = {
    "softmax_head": ("grid", "overfit"),
    "caption_view_write": ("grid", "input_mutation"),
    "sampling_generate": ("grid", "eval_determinism"),
    "positions_stuck": ("grid", "decoding_consistency"),
    "generate_no_image": ("grid", "decoding_consistency"),
    "encoder_train_in_forward": ("grid", "batch_independence"),
    "cached_grid": ("grid", "eval_determinism"),
    "strict_false_load": ("loaded_encoder", "pretrained_guard"),
}

# Where each twin's bug lives: (module a failing check must name, fragment of the line), as
# ``capdiag.testing.planted_sites.SITES``.
SITES = {
    "held_out/softmax_head": ("", "logits.softmax(-1)"),
    "held_out/caption_view_write": ("", "dec_in[dec_in == EOS] = PAD"),
    "held_out/sampling_generate": ("", "torch.multinomial"),
    "held_out/positions_stuck": ("", "pos_ids = torch.zeros"),
    "held_out/generate_no_image": ("", "self.null_memory.expand"),
    "held_out/encoder_train_in_forward": ("", "self.encoder.train()"),
    "held_out/cached_grid": ("", "self._grid"),
    "held_out/strict_false_load": ("encoder", "strict=False"),
}


def build(name: str, bug: Optional[str] = None, seed: int = 0) -> nn.Module:
    """Build ``name`` (with ``bug`` planted, see ``BUGS``); its hints are on ``capdiag_hints``."""
    return build_member(PATTERNS[name], LOADED_HINTS if name == "loaded_encoder" else HINTS, BUGS, name, bug, seed)

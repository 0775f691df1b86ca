"""The caption side shared by the CNN+Transformer and CLIP-decoder captioners: token
embedding, learned or sinusoidal positions, a pre-norm ``nn.TransformerDecoder`` (Vaswani et
al. 2017) cross-attending to image regions, and the output projection.

Cross-attention weights are those of each layer's ``multihead_attn`` (an
``nn.MultiheadAttention``), which is where capdiag's attention check finds them.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
from torch import nn


@dataclass
class DecoderConfig:
    """The Transformer decoder's size, shared by the references built on it (their ``Config`` adds the rest)."""

    vocab_size: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128
    dropout: float = 0.1
    max_len: int = 40


def sinusoidal(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n)[:, None].float()
    div = torch.exp(torch.arange(0, d, 2).float() * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


def padding_after_eos(captions: torch.Tensor, eos: int) -> torch.Tensor:
    """True after each caption's first EOS at position >= 1: padding found by position, never
    from the pad id alone, since pad == eos (CLIP, GPT-2) and bos == eos (GPT-2) are common."""
    T = captions.shape[1]
    pos = torch.arange(T, device=captions.device)
    is_eos = (captions == eos) & (pos >= 1)
    first = torch.where(is_eos, pos, torch.full_like(pos, T)).min(1).values  # (B,)
    return pos[None] > first[:, None]  # (B, T)


class CaptionDecoder(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, d_ff: int, dropout: float,
                 max_len: int, eos_id: int, positions: str = "learned"):
        super().__init__()
        if positions not in ("learned", "sinusoidal"):
            raise ValueError(f"positions must be 'learned' or 'sinusoidal', not {positions!r}")
        self.d_model, self.eos_id, self.positions = d_model, eos_id, positions
        self.embed = nn.Embedding(vocab_size, d_model)
        if positions == "learned":
            self.pos = nn.Embedding(max_len, d_model)
        else:
            self.register_buffer("pe", sinusoidal(max_len, d_model), persistent=False)
        layer = nn.TransformerDecoderLayer(d_model, n_heads, d_ff, dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, n_layers)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size)

    def position_table(self, T: int, device) -> torch.Tensor:
        if self.positions == "learned":
            return self.pos(torch.arange(T, device=device))
        return self.pe[:T]

    def forward(self, memory: torch.Tensor, captions: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """memory (B, L, d), captions (B, T) -> logits (B, T, V); [:, t] scores captions[:, t+1]."""
        B, T = captions.shape
        x = self.embed(captions) * math.sqrt(self.d_model) + self.position_table(T, captions.device)  # (B, T, d)
        mask = torch.ones(T, T, dtype=torch.bool, device=captions.device).triu(1) if causal else None
        h = self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=causal,
                         tgt_key_padding_mask=padding_after_eos(captions, self.eos_id))
        return self.lm_head(self.norm(h))  # (B, T, V)


class DecodesMemory:
    """A captioner whose image module makes a memory the Transformer decoder (``self.text``) attends to:
    ``forward(images, captions) = decode(memory(images), captions)``. The ``no_causal_mask`` twin
    decodes without the causal mask."""

    def decode(self, memory, captions):
        return self.text(memory, captions, causal=self.bug != "no_causal_mask")  # (B, T, V)

    def forward(self, images, captions):
        return self.decode(self.memory(images), captions)

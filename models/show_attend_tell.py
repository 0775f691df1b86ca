"""Show, Attend and Tell (Xu et al. 2015, "soft" attention), as users actually build it.

A torchvision CNN (classifier removed; any name in ``capdiag.models.encoders``) gives a
feature map; a 1x1 conv maps it to ``encoder_dim`` and adaptive pooling to an
``encoder_size`` x ``encoder_size`` grid of annotation vectors a_i ``(B, L, D)``. An LSTM
(1 or more layers) starts from h0, c0 = tanh(W mean_i a_i) through separate layers (Sec. 3.1.2).
At each step additive (Bahdanau) attention alpha_t = softmax(w^T tanh(W_a a_i + W_h h_{t-1}))
gives z_t = beta_t * sum_i alpha_ti a_i with the gating scalar beta_t = sigmoid(f_beta(h_{t-1}))
(Sec. 4.2.1). The deep output layer (Eq. 7) scores words: p(y_t) ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t)).
Loss: label-smoothed cross entropy on real tokens plus the doubly stochastic regularizer
att_gamma * sum_i (1 - sum_t alpha_ti)^2 (Eq. 14). Decoding: greedy, beam search, or
temperature sampling. ``forward`` returns ``(logits, alphas)``; alphas are ``(B, T, L)``.

Planted bugs (``build_model(bug=...)``):
  xavier_init_clobbers_encoder  init_weights' xavier reaches the pretrained encoder
  image_not_fed                 h0/c0 and contexts are computed from zeros, not the image
  att_softmax_wrong_dim         attention softmax over the batch instead of the regions
  loss_counts_padding           the recipe's loss averages over pad positions too
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from capdiag.models.encoders import ImageEncoder, choose_encoder
from capdiag.models.recipe import caption_loss, planted, real_targets, xavier_init
from capdiag.models.registry import LITE0, register_model

PAD, BOS, EOS = 0, 1, 2
# bug -> the check that must fail on it
BUGS = {"xavier_init_clobbers_encoder": "pretrained_guard", "image_not_fed": "gradient_reachability",
        "att_softmax_wrong_dim": "attention_maps", "loss_counts_padding": "loss_sanity"}


@dataclass
class Config:
    vocab_size: int = 32
    embed_dim: int = 64
    encoder_dim: int = 64
    decoder_dim: int = 96
    attention_dim: int = 64
    n_layers: int = 1
    dropout: float = 0.1
    encoder: str = "resnet18"
    encoder_weights: Optional[str] = None
    encoder_size: int = 4
    image_size: int = 64
    label_smoothing: float = 0.1
    att_gamma: float = 1.0


FULL = Config(vocab_size=10000, embed_dim=512, encoder_dim=2048, decoder_dim=512, attention_dim=512,
              encoder="resnet101", encoder_size=14, image_size=256, dropout=0.5)


class Attention(nn.Module):
    """Additive soft attention; returns (context (B, D), alpha (B, L))."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int, wrong_dim: bool = False):
        super().__init__()
        self.enc = nn.Linear(encoder_dim, attention_dim)
        self.dec = nn.Linear(decoder_dim, attention_dim)
        self.full = nn.Linear(attention_dim, 1)
        self.wrong_dim = wrong_dim

    def forward(self, annotations, h):
        scores = self.full(torch.tanh(self.enc(annotations) + self.dec(h)[:, None])).squeeze(-1)  # (B, L)
        alpha = torch.softmax(scores, dim=0 if self.wrong_dim else 1)
        return (alpha[..., None] * annotations).sum(1), alpha


class ShowAttendTell(nn.Module):
    def __init__(self, cfg: Config = Config(), bug: Optional[str] = None):
        super().__init__()
        self.cfg, self.bug = cfg, planted(bug, BUGS)
        self.encoder = ImageEncoder(cfg.encoder, cfg.encoder_weights)
        self.adapt = nn.Conv2d(self.encoder.out_channels, cfg.encoder_dim, 1)
        self.pool = nn.AdaptiveAvgPool2d(cfg.encoder_size)
        self.attention = Attention(cfg.encoder_dim, cfg.decoder_dim, cfg.attention_dim, bug == "att_softmax_wrong_dim")
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.init_h = nn.ModuleList(nn.Linear(cfg.encoder_dim, cfg.decoder_dim) for _ in range(cfg.n_layers))
        self.init_c = nn.ModuleList(nn.Linear(cfg.encoder_dim, cfg.decoder_dim) for _ in range(cfg.n_layers))
        self.f_beta = nn.Linear(cfg.decoder_dim, cfg.encoder_dim)
        self.cells = nn.ModuleList(
            nn.LSTMCell(cfg.embed_dim + cfg.encoder_dim if i == 0 else cfg.decoder_dim, cfg.decoder_dim)
            for i in range(cfg.n_layers)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.L_h = nn.Linear(cfg.decoder_dim, cfg.embed_dim)  # deep output layer, Eq. 7
        self.L_z = nn.Linear(cfg.encoder_dim, cfg.embed_dim)
        self.L_o = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.init_weights()

    def init_weights(self):
        if self.bug == "xavier_init_clobbers_encoder":
            self.apply(xavier_init)
        else:
            for name, child in self.named_children():
                if name != "encoder":
                    child.apply(xavier_init)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def annotations(self, images):
        if self.bug == "image_not_fed":
            images = torch.zeros_like(images)
        f = self.pool(self.adapt(self.encoder(images)))  # (B, D, s, s)
        return f.flatten(2).transpose(1, 2)  # (B, L, D)

    def init_state(self, a):
        mean = a.mean(1)
        return [(torch.tanh(h(mean)), torch.tanh(c(mean))) for h, c in zip(self.init_h, self.init_c)]

    def step(self, a, state, tokens):
        """One decoding step from the previous tokens (B,); returns logits (B, V), alpha, state."""
        h_top = state[-1][0]
        ctx, alpha = self.attention(a, h_top)
        z = torch.sigmoid(self.f_beta(h_top)) * ctx  # gating scalar beta (Sec. 4.2.1)
        e = self.embed(tokens)
        x = torch.cat([e, z], -1)
        new = []
        for cell, (h, c) in zip(self.cells, state):
            h, c = cell(x, (h, c))
            new.append((h, c))
            x = self.drop(h)
        logits = self.L_o(self.drop(e + self.L_h(new[-1][0]) + self.L_z(z)))
        return logits, alpha, new

    def forward(self, images, captions):
        """Teacher forcing: logits (B, T, V) with logits[:, t] scoring captions[:, t+1]; alphas (B, T, L)."""
        a = self.annotations(images)
        state = self.init_state(a)
        logits, alphas = [], []
        for t in range(captions.shape[1]):
            lg, alpha, state = self.step(a, state, captions[:, t])
            logits.append(lg)
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)

    # ---- the training recipe ------------------------------------------------------------
    def loss_fn(self, logits, captions):
        """Label-smoothed CE over real target tokens (the bug twin also averages over padding)."""
        return caption_loss(logits, captions, EOS, self.cfg.label_smoothing, self.bug == "loss_counts_padding")

    def training_loss(self, images, captions):
        """loss_fn plus the doubly stochastic attention regularizer (Eq. 14)."""
        logits, alphas = self(images, captions)
        _, real = real_targets(captions, EOS)
        coverage = (alphas[:, :-1] * real[..., None]).sum(1)  # (B, L): attention each region got
        return self.loss_fn(logits, captions) + self.cfg.att_gamma * ((1 - coverage) ** 2).mean()

    # ---- decoding -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images, max_len: int = 20, beam_size: int = 1, temperature: Optional[float] = None,
                 return_alphas: bool = False):
        """Greedy (default), beam search (beam_size > 1) or sampling (temperature); ids start with BOS."""
        if beam_size > 1:
            return torch.nn.utils.rnn.pad_sequence(
                [self._beam(images[i : i + 1], max_len, beam_size) for i in range(images.shape[0])],
                batch_first=True, padding_value=PAD)
        a = self.annotations(images)
        state = self.init_state(a)
        B = images.shape[0]
        seq = torch.full((B, 1), BOS, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        alphas = []
        for _ in range(max_len - 1):
            lg, alpha, state = self.step(a, state, seq[:, -1])
            alphas.append(alpha)
            if temperature:
                nxt = torch.multinomial(torch.softmax(lg / temperature, -1), 1).squeeze(1)
            else:
                nxt = lg.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        return (seq, torch.stack(alphas, 1)) if return_alphas else seq

    def _beam(self, image, max_len, k):
        a = self.annotations(image)
        beams = [([BOS], 0.0, self.init_state(a))]
        finished = []
        for _ in range(max_len - 1):
            cand = []
            for seq, score, state in beams:
                lg, _, new = self.step(a, state, torch.tensor([seq[-1]], device=image.device))
                logp = F.log_softmax(lg[0].float(), -1)
                top = logp.topk(k)
                cand += [(seq + [i], score + v, new) for v, i in zip(top.values.tolist(), top.indices.tolist())]
            cand.sort(key=lambda c: c[1], reverse=True)
            beams = []
            for c in cand[:k]:
                (finished if c[0][-1] == EOS else beams).append(c)
            if not beams:
                break
        best = max(finished or beams, key=lambda c: c[1] / len(c[0]))
        return torch.tensor(best[0], device=image.device)


CAPDIAG = dict(vocab_size=Config.vocab_size, pad_id=PAD, bos_id=BOS, eos_id=EOS, image_size=Config.image_size,
               max_len=12, image_module="encoder", attention_modules=["attention"])


@register_model("show_attend_tell", hints=CAPDIAG, bugs=BUGS, needs=(), pretrained=LITE0,
                bug_variants={"xavier_init_clobbers_encoder": "pretrained"})
def build_model(bug: Optional[str] = None, size: str = "small", encoder: Optional[str] = None,
                encoder_weights: Optional[str] = None, **overrides) -> ShowAttendTell:
    cfg = FULL if size == "full" else Config()
    encoder, encoder_weights = choose_encoder(cfg.encoder, encoder, encoder_weights)
    cfg = replace(cfg, encoder=encoder)
    model = ShowAttendTell(replace(cfg, encoder_weights=encoder_weights, **overrides), bug)
    # Hints that depend on the configuration (the module-level CAPDIAG describes the small one).
    model.capdiag_hints = {"pretrained": ["encoder"] if encoder_weights else [], "vocab_size": model.cfg.vocab_size,
                           "image_size": model.cfg.image_size}
    return model



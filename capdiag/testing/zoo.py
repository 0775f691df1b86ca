"""A zoo of tiny captioners (seconds to train on CPU) for testing checks: clean twins of three architectures, and one
planted bug each. Every bug here has been seen in public captioning code.

``make(arch, bug)`` builds one; ``BUGS`` maps each bug to the check that must catch it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from capdiag.models.decoding import greedy

VOCAB, PAD, BOS, EOS = 24, 0, 1, 2
HINTS = dict(vocab_size=VOCAB, pad_id=PAD, bos_id=BOS, eos_id=EOS, image_size=32, image_module="encoder",
             image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))  # ImageNet-normalized inputs

# bug -> (architectures it applies to, check that must fail)
BUGS = {
    "no_causal_mask": (("transformer",), "causal_leak"),
    "batch_mean_image": (("transformer", "lstm", "gru"), "batch_independence"),
    "relative_positions": (("transformer",), "padding_invariance"),
    "detached_image": (("transformer", "lstm", "gru"), "gradient_reachability"),
    "unused_module": (("transformer", "lstm", "gru"), "gradient_reachability"),
    "eval_dropout": (("transformer", "lstm", "gru"), "eval_determinism"),
    "eval_free_running": (("transformer", "lstm", "gru"), "caption_dependence"),
    "caption_blind": (("transformer", "lstm", "gru"), "caption_dependence"),
    "double_shift": (("gru",), "caption_dependence"),
    "inplace_normalize": (("transformer", "lstm", "gru"), "input_mutation"),
    "huge_init": (("transformer", "lstm", "gru"), "loss_at_init"),
    "nan_logits": (("transformer", "gru"), "loss_at_init"),
}
# Bugs only a model that has learned reveals (full checks; they train a copy).
LEARNED_BUGS = {
    "image_blind": (("transformer", "lstm", "gru"), ("overfit", "image_ablation", "attribution")),
    "generate_ignores_image": (("transformer", "gru"), ("decoding_consistency", "image_ablation")),
    "att_softmax_wrong_dim": (("lstm",), ("attention_maps",)),
    "uniform_attention": (("lstm",), ("attention_maps",)),
}
BUGS["normalizes_again"] = (("transformer", "gru"), "input_sanity")
ARCHS = ("transformer", "lstm", "gru")


class TinyEncoder(nn.Module):
    """Two strided convs with BatchNorm -> regions (B, 16, C)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )

    def forward(self, images):
        f = self.net(images)  # (B, C, 4, 4)
        return f.flatten(2).transpose(1, 2)  # (B, 16, C)


class AdditiveAttention(nn.Module):
    """Bahdanau attention returning (context, alpha), as Show-Attend-Tell implementations do."""

    def __init__(self, d: int, bug: str | None = None):
        super().__init__()
        self.att_img, self.att_hid, self.att_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 1)
        self.bug = bug

    def forward(self, regions, keys, h):
        e = torch.tanh(keys + self.att_hid(h)[:, None])  # (B, L, d)
        scores = self.att_v(e).squeeze(-1)  # (B, L)
        if self.bug == "att_softmax_wrong_dim":
            alpha = torch.softmax(scores, dim=0)  # over the batch, not the regions
        elif self.bug == "uniform_attention":
            alpha = torch.softmax(scores * 0.0, dim=1)  # scores flattened to a constant
        else:
            alpha = torch.softmax(scores, dim=1)
        return (alpha[..., None] * regions).sum(1), alpha


class ZooCaptioner(nn.Module):
    def __init__(self, arch: str = "transformer", bug: str | None = None, d: int = 32, vocab: int = VOCAB):
        super().__init__()
        self.arch, self.bug, self.d, self.vocab = arch, bug, d, vocab
        self.encoder = TinyEncoder(d)
        self.proj = nn.Linear(d, d)
        self.embed = nn.Embedding(vocab, d, padding_idx=PAD)
        if arch == "transformer":
            self.pos = nn.Embedding(64, d)
            layer = nn.TransformerDecoderLayer(d, 2, 64, dropout=0.1, batch_first=True)
            self.decoder = nn.TransformerDecoder(layer, 1)
        elif arch == "lstm":
            self.init_h, self.init_c = nn.Linear(d, d), nn.Linear(d, d)
            self.attention = AdditiveAttention(d, bug)
            self.cell = nn.LSTMCell(2 * d, d)
            self.drop = nn.Dropout(0.1)
        elif arch == "gru":
            self.rnn = nn.GRU(d, d, batch_first=True)
            self.drop = nn.Dropout(0.1)
        else:
            raise ValueError(arch)
        if arch == "transformer":
            self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(d, vocab)
        if bug == "unused_module":
            self.aux_head = nn.Linear(d, vocab)  # built, never called
        if bug == "huge_init":
            with torch.no_grad():
                self.out.weight.mul_(60.0)

    # ---- pieces -----------------------------------------------------------------------
    def image_regions(self, images):
        if self.bug == "normalizes_again":
            mean = images.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = images.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            images = (images - mean) / std  # the data pipeline already normalized them
        if self.bug == "inplace_normalize":
            images.sub_(0.1).div_(0.9)  # "normalize" the caller's tensor in place
        regions = self.proj(self.encoder(images))  # (B, L, d)
        if self.bug == "detached_image":
            regions = regions.detach()
        if self.bug == "starved_image":
            regions = regions * 1e-6  # features scaled to nothing next to the token embeddings
        if self.bug == "image_blind":
            regions = torch.zeros_like(regions)  # the decoder never receives the features
        if self.bug == "batch_mean_image":
            regions = regions + regions.mean(0, keepdim=True)  # meant mean(1): pools over the batch
        return regions

    def maybe_drop(self, x):
        if self.bug == "eval_dropout":
            return F.dropout(x, 0.3, training=True)
        return self.drop(x) if hasattr(self, "drop") else x

    def tokens_in(self, captions):
        if self.bug == "caption_blind":
            captions = torch.full_like(captions, BOS)
        return captions

    def forward(self, images, captions):
        if self.bug == "eval_free_running" and not self.training:
            return self.free_run(images, captions.shape[1])
        regions = self.image_regions(images)
        captions = self.tokens_in(captions)
        if self.arch == "transformer":
            logits = self._transformer(regions, captions)
        elif self.arch == "lstm":
            logits = self._lstm(regions, captions)
        else:
            logits = self._gru(regions, captions)
        if self.bug == "nan_logits":
            logits = logits + torch.log(logits.new_zeros(()) - 1.0)  # log(-1) = nan
        return logits  # (B, T, V)

    def _transformer(self, regions, captions):
        B, T = captions.shape
        if self.bug == "relative_positions":
            pos = (torch.arange(T, device=captions.device) * 63 // max(T - 1, 1))  # scaled by padded length
        else:
            pos = torch.arange(T, device=captions.device)
        x = self.embed(captions) * math.sqrt(self.d) + self.pos(pos)[None]
        mask = None if self.bug == "no_causal_mask" else nn.Transformer.generate_square_subsequent_mask(T, device=captions.device)
        h = self.decoder(x, regions, tgt_mask=mask, tgt_is_causal=mask is not None)
        return self.out(self.maybe_drop(h))

    def _lstm(self, regions, captions):
        B, T = captions.shape
        mean = regions.mean(1)
        h, c = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))
        emb = self.embed(captions)
        keys = self.attention.att_img(regions)
        outs = []
        for t in range(T):
            ctx, _ = self.attention(regions, keys, h)
            h, c = self.cell(torch.cat([emb[:, t], ctx], -1), (h, c))
            outs.append(self.out(self.maybe_drop(h)))
        return torch.stack(outs, 1)

    def _gru(self, regions, captions):
        emb = self.embed(captions)
        if self.bug == "double_shift":
            emb = torch.cat([torch.zeros_like(emb[:, :1]), emb[:, :-1]], 1)  # shifted once more
        h0 = torch.tanh(regions.mean(1))[None]
        out, _ = self.rnn(emb, h0.contiguous())
        return self.out(self.maybe_drop(out + regions.mean(1, keepdim=True)))

    @torch.no_grad()
    def generate(self, images, max_len: int = 12):
        """Greedy decoding, returns ids starting with BOS."""
        if self.bug == "generate_ignores_image":
            images = torch.zeros_like(images)
        return greedy(lambda seq: self.forward(images, seq)[:, -1], images.shape[0], bos=BOS, eos=EOS, pad=PAD,
                      max_len=max_len, device=images.device)

    @torch.no_grad()
    def free_run(self, images, T):
        seq = torch.full((images.shape[0], 1), BOS, dtype=torch.long, device=images.device)
        bug, self.bug = self.bug, None
        try:
            for _ in range(T - 1):
                nxt = self.forward(images, seq)[:, -1].argmax(-1)
                seq = torch.cat([seq, nxt[:, None]], 1)
            return self.forward(images, seq)
        finally:
            self.bug = bug


def make(arch: str = "transformer", bug: str | None = None, seed: int = 0) -> ZooCaptioner:
    torch.manual_seed(seed)
    return ZooCaptioner(arch, bug)

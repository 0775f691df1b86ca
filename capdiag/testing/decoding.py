"""Decoders: clean captioners whose generate() does more than greedy decoding (a per-image beam search
that reorders its LSTM state, a KV cache, a batched loop with a per-sample ``done`` mask), and their
decoding-only bug twins, each seen in public captioning code. Their forward() is always correct: only
generate() is wrong, so only a check that compares decoding with the forward can name them.

``build(name, bug=None, seed=0)``; ``PATTERNS`` lists the clean ones; ``BUGS`` maps each twin to its
clean pattern and the check that must name it (``decoding_consistency``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .family import build_member
from .family import _conv, _hints

BOS, EOS, PAD = 1, 2, 0


# ---- LSTM with a per-image beam search -------------------------------------------------------------
class BeamLSTM(nn.Module):
    """Image -> initial LSTM state; generate() is a per-image beam search (k = 3) over the LSTM cell.
    Twin ``beam_state_not_reordered``: the partial sequences are reordered by their origin beam, the
    (h, c) state is kept by slot (the bug of several public beam searches)."""

    def __init__(self, vocab=24, d=64, k=3, bug=None):
        super().__init__()
        self.encoder = nn.Sequential(_conv(3, 32), _conv(32, 64), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.init_h, self.init_c = nn.Linear(256, d), nn.Linear(256, d)
        self.embed = nn.Embedding(vocab, d)
        self.cell = nn.LSTMCell(d, d)
        self.out = nn.Linear(d, vocab)
        self.k, self.bug = k, bug

    def state(self, images):
        f = self.encoder(images)
        return torch.tanh(self.init_h(f)), self.init_c(f)

    def forward(self, images, captions):
        h, c = self.state(images)
        logits = []
        for t in range(captions.size(1)):
            h, c = self.cell(self.embed(captions[:, t]), (h, c))
            logits.append(self.out(h))
        return torch.stack(logits, 1)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        """The popular tutorial's beam search: finished beams leave, so k shrinks as captions end."""
        out = []
        for i in range(images.size(0)):
            k = self.k
            h, c = self.state(images[i:i + 1])
            h, c = h.expand(k, -1).contiguous(), c.expand(k, -1).contiguous()
            seqs = torch.full((k, 1), BOS, dtype=torch.long, device=images.device)
            top_scores = torch.zeros(k, 1, device=images.device)
            complete, complete_scores = [], []
            for step in range(max_len - 1):
                h, c = self.cell(self.embed(seqs[:, -1]), (h, c))
                scores = top_scores.expand_as(self.out(h)) + F.log_softmax(self.out(h), -1)
                flat = scores[0] if step == 0 else scores.view(-1)  # all beams start equal: expand one
                top_scores, top_words = flat.topk(k)
                prev, nxt = top_words // scores.size(1), top_words % scores.size(1)
                seqs = torch.cat([seqs[prev], nxt[:, None]], 1)
                incomplete = (nxt != EOS).nonzero().flatten()
                for j in (nxt == EOS).nonzero().flatten().tolist():
                    complete.append(seqs[j].tolist())
                    complete_scores.append(float(top_scores[j]))
                k -= len(seqs) - len(incomplete)
                if k == 0:
                    break
                seqs = seqs[incomplete]
                if self.bug == "beam_state_not_reordered":
                    h, c = h[:k], c[:k]  # kept by slot: the rows no longer match their sequences
                else:
                    h, c = h[prev[incomplete]], c[prev[incomplete]]
                top_scores = top_scores[incomplete][:, None]
            if not complete:
                complete, complete_scores = [s.tolist() for s in seqs], top_scores.flatten().tolist()
            best = max(range(len(complete)), key=lambda j: complete_scores[j])
            out.append(complete[best])
        return out


# ---- Transformer decoder: beam search, KV cache, batched greedy ----------------------------------------
class TfmDecoder(nn.Module):
    """Regions -> a 2-layer Transformer decoder written with explicit attention, so that generate() can
    run it with a KV cache. Bugs: ``beam_without_causal_mask`` (a beam search that calls the decoder
    without the mask), ``stop_on_any_eos`` (batched greedy stopping every caption at the first EOS of any),
    ``encoder_cached_in_generate``, ``image_only_at_step0``, ``kv_positions_stuck``."""

    def __init__(self, vocab=24, d=64, layers=2, mode="greedy", bug=None):
        super().__init__()
        self.cnn = nn.Sequential(_conv(3, 32), _conv(32, d), nn.AdaptiveAvgPool2d(4), nn.Flatten(2))
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(32, d)
        self.layers = nn.ModuleList([nn.TransformerDecoderLayer(d, 4, 2 * d, 0.0, batch_first=True) for _ in range(layers)])
        self.img_gate = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        self.mode, self.bug = mode, bug
        self._memory = None

    def encode(self, images):
        return self.cnn(images).transpose(1, 2)  # (B, 16, d)

    def decode(self, memory, tokens, start=0, causal=True, image=True):
        T = tokens.size(1)
        x = self.tok(tokens) + self.pos(torch.arange(start, start + T, device=tokens.device))
        if image:  # the image also enters every step directly (forward does this at every position)
            x = x + self.img_gate(memory.mean(1))[:, None]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device) if causal else None
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=mask)
        return self.head(x)

    def forward(self, images, captions):
        return self.decode(self.encode(images), captions)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        if self.bug == "encoder_cached_in_generate":
            if self._memory is None or self._memory.size(0) != images.size(0):
                self._memory = self.encode(images)  # "speed-up": reused while the batch size matches
            memory = self._memory
        else:
            memory = self.encode(images)
        if self.mode == "beam":
            return [self._beam(memory[i:i + 1]) for i in range(images.size(0))]
        if self.mode == "kv":
            return self._kv_greedy(memory)
        B = images.size(0)
        seq = torch.full((B, 1), BOS, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        for t in range(max_len - 1):
            image = self.bug != "image_only_at_step0" or t == 0
            word = self.decode(memory, seq, image=image)[:, -1].argmax(-1).masked_fill(done, PAD)
            seq = torch.cat([seq, word[:, None]], 1)
            done = done | (word == EOS)
            if self.bug == "stop_on_any_eos" and done.any():
                break
            if done.all():
                break
        return seq

    def _beam(self, memory, k=3, max_len=16):
        beams = [([BOS], 0.0)]
        finished = []
        causal = self.bug != "beam_without_causal_mask"
        for _ in range(max_len - 1):
            seqs = torch.tensor([b[0] for b in beams], device=memory.device)
            lp = F.log_softmax(self.decode(memory.expand(len(beams), -1, -1), seqs, causal=causal)[:, -1], -1)
            cand = [(b[0] + [w], b[1] + float(lp[j, w])) for j, b in enumerate(beams) for w in lp[j].topk(k).indices.tolist()]
            cand.sort(key=lambda c: -c[1])
            beams = []
            for cnd in cand[:k]:
                (finished if cnd[0][-1] == EOS else beams).append(cnd)
            if not beams or len(finished) >= k:
                break
        return max(finished or beams, key=lambda c: c[1] / len(c[0]))[0]

    def _kv_greedy(self, memory, max_len=16):
        """Greedy decoding with a cache of every layer's inputs (the keys/values of self-attention):
        each step runs only the new token. Bug ``kv_positions_stuck``: the new token's position id is 0."""
        B = memory.size(0)
        seq = torch.full((B, 1), BOS, dtype=torch.long, device=memory.device)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        cache: list = [None] * len(self.layers)
        ctx = self.img_gate(memory.mean(1))[:, None]
        for t in range(max_len - 1):
            pos = 0 if self.bug == "kv_positions_stuck" else t
            x = self.tok(seq[:, -1:]) + self.pos.weight[pos] + ctx
            for i, layer in enumerate(self.layers):
                past = x if cache[i] is None else torch.cat([cache[i], x], 1)
                cache[i] = past
                x = _layer_step(layer, x, past, memory)
            word = self.head(x)[:, -1].argmax(-1).masked_fill(done, PAD)
            seq = torch.cat([seq, word[:, None]], 1)
            done = done | (word == EOS)
            if done.all():
                break
        return seq


def _layer_step(layer: nn.TransformerDecoderLayer, x, past, memory):
    """One post-norm TransformerDecoderLayer for the newest position ``x`` (B, 1, d), attending to
    ``past`` (B, t+1, d), the layer's inputs so far: what the full causal forward computes there."""
    x = layer.norm1(x + layer.dropout1(layer.self_attn(x, past, past, need_weights=False)[0]))
    x = layer.norm2(x + layer.dropout2(layer.multihead_attn(x, memory, memory, need_weights=False)[0]))
    return layer.norm3(x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))))


class StepGRU(nn.Module):
    """A GRU decoder fed [word, image context] at every step, in forward and in generate(). Twin
    ``image_only_at_step0``: generate() feeds the image at the first step only (zeros after), while
    forward feeds it at every step."""

    def __init__(self, vocab=24, d=64, bug=None):
        super().__init__()
        self.encoder = nn.Sequential(_conv(3, 32), _conv(32, 64), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, d))
        self.embed = nn.Embedding(vocab, d)
        self.cell = nn.GRUCell(2 * d, d)
        self.out = nn.Linear(d, vocab)
        self.bug = bug

    def forward(self, images, captions):
        ctx = self.encoder(images)
        h = torch.zeros_like(ctx)
        logits = []
        for t in range(captions.size(1)):
            h = self.cell(torch.cat([self.embed(captions[:, t]), ctx], 1), h)
            logits.append(self.out(h))
        return torch.stack(logits, 1)

    @torch.no_grad()
    def generate(self, images, max_len=16):
        ctx = self.encoder(images)
        h = torch.zeros_like(ctx)
        B = images.size(0)
        seq = torch.full((B, 1), BOS, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        for t in range(max_len - 1):
            feed = ctx if (self.bug != "image_only_at_step0" or t == 0) else torch.zeros_like(ctx)
            h = self.cell(torch.cat([self.embed(seq[:, -1]), feed], 1), h)
            word = self.out(h).argmax(-1).masked_fill(done, PAD)
            seq = torch.cat([seq, word[:, None]], 1)
            done = done | (word == EOS)
            if done.all():
                break
        return seq


@dataclass(frozen=True)
class Decoder:
    make: Callable[..., nn.Module]
    what: str


PATTERNS = {
    "beam_lstm": Decoder(lambda bug=None: BeamLSTM(bug=bug), "per-image beam search (k = 3) over an LSTM cell"),
    "beam_transformer": Decoder(lambda bug=None: TfmDecoder(mode="beam", bug=bug), "per-image beam search over a Transformer"),
    "kv_cache": Decoder(lambda bug=None: TfmDecoder(mode="kv", bug=bug), "greedy decoding with a KV cache"),
    "batched_greedy": Decoder(lambda bug=None: TfmDecoder(mode="greedy", bug=bug), "batched greedy, per-sample done mask"),
    "step_gru": Decoder(lambda bug=None: StepGRU(bug=bug), "GRU fed the image at every step"),
}
HINTS = {"beam_lstm": _hints(image_module="encoder", attention_modules=[]),
         "step_gru": _hints(image_module="encoder", attention_modules=[])}

# bug -> (clean pattern it is planted in, check that must name it)
BUGS = {
    "beam_state_not_reordered": ("beam_lstm", "decoding_consistency"),
    "beam_without_causal_mask": ("beam_transformer", "decoding_consistency"),
    "stop_on_any_eos": ("batched_greedy", "decoding_consistency"),
    "encoder_cached_in_generate": ("batched_greedy", "decoding_consistency"),
    "image_only_at_step0": ("step_gru", "decoding_consistency"),
    "kv_positions_stuck": ("kv_cache", "decoding_consistency"),
}


def build(name: str, bug: Optional[str] = None, seed: int = 0) -> nn.Module:
    """Build decoder ``name`` (with ``bug`` planted, see ``BUGS``); its hints are on ``capdiag_hints``."""
    hints = HINTS.get(name, _hints(image_module="cnn", attention_modules=[]))
    return build_member(PATTERNS[name].make, hints, BUGS, name, bug, seed)

"""Greedy and beam-search decoding shared by the reference captioners whose decoder scores the
next token from (image context, caption so far): CNN+Transformer, the CLIP decoder, ClipCap
and the dual-transfer model. Show-Attend-Tell carries LSTM state and keeps its own loop.

``generate(context, decode_fn, ...)`` is the entry point: ``decode_fn(context, seq)`` scores the
caption so far for each row (context expanded to one row per live beam). Recomputing the whole
prefix each step is slower than a KV cache but decodes exactly what teacher forcing scores,
which is what capdiag's decoding_consistency check compares.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Step = Callable[[torch.Tensor], torch.Tensor]


def next_logprobs(step: Step, seq: torch.Tensor, eos: int, min_len: int) -> torch.Tensor:
    logp = F.log_softmax(step(seq).float(), -1)  # (N, V)
    if seq.shape[1] - 1 < min_len:
        logp[:, eos] = -float("inf")  # no EOS before the minimum length
    return logp


def greedy(step: Step, batch: int, *, bos: int, eos: int, pad: int, max_len: int, min_len: int = 0,
           device=None) -> torch.Tensor:
    """Ids (B, L) starting with BOS; rows that emitted EOS are filled with ``pad``."""
    seq = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_len - 1):
        nxt = next_logprobs(step, seq, eos, min_len).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return seq


def beam(step: Step, *, bos: int, eos: int, max_len: int, k: int, alpha: float = 0.6, min_len: int = 0,
         device=None) -> torch.Tensor:
    """Beam search for one image: ids (L,) of the best hypothesis under GNMT length
    normalisation ((5+len)/6)^alpha (Wu et al. 2016). ``step`` gets one row per live beam."""
    beams = [(torch.tensor([bos], device=device), 0.0)]
    finished = []
    for _ in range(max_len - 1):
        seqs = torch.stack([b[0] for b in beams])  # (beams, t)
        logp = next_logprobs(step, seqs, eos, min_len)
        scores = torch.tensor([b[1] for b in beams], device=device)[:, None] + logp  # (beams, V)
        top = scores.flatten().topk(k)
        V = logp.shape[-1]
        beams = []
        for s, idx in zip(top.values.tolist(), top.indices.tolist()):
            seq = torch.cat([seqs[idx // V], torch.tensor([idx % V], device=device)])
            (finished if idx % V == eos else beams).append((seq, s))
        if not beams or len(finished) >= k:
            break
    pool = finished or beams
    return max(pool, key=lambda b: b[1] / (((5 + len(b[0])) / 6) ** alpha))[0]


def generate(context: torch.Tensor, decode_fn: Callable, *, bos: int, eos: int, pad: int, max_len: int,
             beam_size: int = 1, alpha: float = 0.6, min_len: int = 0) -> torch.Tensor:
    """Greedy (beam_size 1) or per-image beam search, padded to (B, L) with ``pad``.

    ``context`` (B, ...) is what the decoder reads of each image (regions, prefix, image vector);
    ``decode_fn(context, captions)`` returns logits (N, t, V) scoring the next tokens."""
    B, device = context.shape[0], context.device
    if beam_size == 1:
        return greedy(lambda seq: decode_fn(context, seq)[:, -1], B, bos=bos, eos=eos, pad=pad, max_len=max_len,
                      min_len=min_len, device=device)
    rows = []
    for i in range(B):
        one = context[i : i + 1]

        def step(seq, one=one):  # one row of context per live beam
            return decode_fn(one.expand(seq.shape[0], *one.shape[1:]), seq)[:, -1]

        rows.append(beam(step, bos=bos, eos=eos, max_len=max_len, k=beam_size, alpha=alpha, min_len=min_len,
                         device=device))
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)

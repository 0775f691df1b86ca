"""Capture attention weights without changing the model.

Two sources. ``nn.MultiheadAttention`` modules used as cross-attention (key is not the query):
a forward pre-hook asks that call for per-head weights (``need_weights=True,
average_attn_weights=False``) and a forward hook records them; nothing persists after the
block. Additive (Bahdanau) attention modules that return ``(context, alpha)``: the last
non-negative tensor of the output tuple is recorded, per call (per decoding step).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from ..hooks import hooked


@dataclass
class AttentionRecord:
    module: str
    kind: str  # "cross" (MultiheadAttention) or "additive"
    weights: list = field(default_factory=list)  # per call: (B, H, Tq, L) cross, (B, L) additive


def attention_modules(model: nn.Module, names: Optional[list] = None) -> dict:
    """Modules to watch: the named ones (``[]`` declares that the model has no attention over
    image regions, e.g. a prefix LM whose self-attention is not image attention), else every
    MultiheadAttention and every module whose name or class mentions attention (and is not
    inside a MultiheadAttention)."""
    if names is not None:
        return {n: model.get_submodule(n) for n in names}
    out = {}
    mha_names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for n, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out[n] = m
        elif n and ("att" in n.split(".")[-1].lower() or "attention" in type(m).__name__.lower()):
            if not any(n.startswith(h + ".") for h in mha_names) and not isinstance(m, (nn.Linear, nn.Dropout)):
                out[n] = m
    # drop modules that contain another watched module (keep the innermost)
    return {n: m for n, m in out.items() if not any(o != n and o.startswith(n + ".") for o in out)}


@contextlib.contextmanager
def captured_attention(model: nn.Module, names: Optional[list] = None) -> Iterator[dict]:
    records: dict = {}
    cross_call: dict = {}  # id(module) -> whether the current call is cross-attention

    def mha_pre(name):
        def hook(module, args, kwargs):
            query = args[0] if args else kwargs.get("query")
            key = args[1] if len(args) > 1 else kwargs.get("key")
            cross = key is not None and key is not query
            cross_call[id(module)] = cross
            if cross:  # ask this call (only) for per-head weights
                kwargs = {**kwargs, "need_weights": True, "average_attn_weights": False}
            return args, kwargs
        return hook

    def mha_post(name):
        def hook(module, args, output):
            if cross_call.get(id(module)) and isinstance(output, tuple) and output[1] is not None:
                rec = records.setdefault(name, AttentionRecord(name, "cross"))
                rec.weights.append(output[1].detach())
            return output
        return hook

    def declared_post(name):
        def hook(module, args, output):
            # A declared cross-attention module of a library model (a transformers GPT-2 or BERT
            # decoder's crossattention, run with eager attention) returns (output, weights) with
            # per-head weights (B, H, T, L) over the L image tokens.
            w = output[-1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 4 and bool((w >= 0).all()):
                records.setdefault(name, AttentionRecord(name, "cross")).weights.append(w.detach())
            else:
                additive_post(name)(module, args, output)
        return hook

    def additive_post(name):
        def hook(module, args, output):
            if isinstance(output, (tuple, list)):
                # One weight per region for each sample at this step: (B, L), or (B, 1, L) / (B, L, 1).
                # Per-head square maps (B, H, T, T) are a transformer's self-attention (a ViT's over
                # patches, a GPT-2's over tokens with eager attention), not the decoder looking at
                # the image.
                cands = [t for t in output[1:] if isinstance(t, torch.Tensor) and t.is_floating_point()
                         and (t.dim() == 2 or (t.dim() == 3 and 1 in t.shape[1:]))]
                if cands and bool((cands[-1] >= 0).all()):
                    rec = records.setdefault(name, AttentionRecord(name, "additive"))
                    rec.weights.append(cands[-1].detach())
        return hook

    mods = attention_modules(model, names)
    mha = {n: m for n, m in mods.items() if isinstance(m, nn.MultiheadAttention)}
    post = [(m, mha_post(n) if n in mha else (declared_post if names is not None else additive_post)(n))
            for n, m in mods.items()]
    with hooked([(m, mha_pre(n)) for n, m in mha.items()], pre=True, with_kwargs=True), hooked(post):
        yield records


def per_token_maps(rec: AttentionRecord) -> torch.Tensor:
    """``(B, T, L)`` maps (heads averaged) from a record: one call over all positions for
    cross-attention (the last call), or one call per decoding step for additive attention."""
    if rec.kind == "cross":
        w = rec.weights[-1]  # (B, H, T, L)
        return w.float().mean(1) if w.dim() == 4 else w.float()
    return torch.stack([w.float().reshape(w.shape[0], -1) for w in rec.weights], 1)  # (B, T, L)


def judged_rows(rec: AttentionRecord, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(N, L)`` attention rows to judge: one per (sample, real caption position).

    With ``real`` (``(B, T)`` real positions) and calls that all cover the whole batch, the rows of
    real positions. A decoder that attends only for the captions still running (the tutorial's
    length-sorted ``batch_size_t`` loop) records fewer rows per step, in its sorted order: every row
    it records is then a real position, and all of them are judged.
    """
    if rec.kind == "additive" and len({w.shape[0] for w in rec.weights}) > 1:
        return torch.cat([w.float().reshape(w.shape[0], -1) for w in rec.weights])
    maps = per_token_maps(rec)  # (B, T, L)
    if real is None:
        return maps.reshape(-1, maps.shape[-1])
    T = min(maps.shape[1], real.shape[1])
    return maps[:, :T][real[:, :T].to(maps.device)]


def normalized_entropy(rows: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of attention weights over its L regions, divided by ln L (1 = uniform)."""
    L = rows.shape[-1]
    if L < 2:
        return torch.zeros(rows.shape[0])
    p = rows.clamp_min(0) / rows.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(L)


def attention_stats(rows: torch.Tensor) -> dict:
    """Statistics of ``(N, L)`` attention rows of real positions: how far the rows are from summing
    to one, their mean normalized entropy, and the largest total-variation distance between two
    rows (0 when every word and image get the same map)."""
    L = rows.shape[-1]
    sums = rows.sum(-1)
    p = rows.clamp_min(0) / sums.clamp_min(1e-12)[:, None]
    flat = p.view(-1, L)
    idx = torch.linspace(0, len(flat) - 1, min(len(flat), 64)).long()
    sub = flat[idx]
    tv = 0.5 * (sub[:, None] - sub[None]).abs().sum(-1).max() if len(sub) > 1 else torch.tensor(0.0)
    return {"max_sum_error": float((sums - 1).abs().max()), "normalized_entropy": float(normalized_entropy(rows).mean()),
            "max_pairwise_tv": float(tv), "regions": L}

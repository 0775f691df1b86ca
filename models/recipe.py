"""The training-recipe pieces every reference captioner exposes as its file's ``loss_fn`` and
``bleu_fn`` (capdiag's loss_sanity and metric_sanity check them). Real tokens are found by
position, up to and including each caption's first EOS after BOS, never by the pad id alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capdiag.models.transformer_decoder import padding_after_eos


def real_targets(captions: torch.Tensor, eos: int) -> tuple:
    """Targets ``captions[:, 1:]`` (B, T-1) and the mask of real ones (EOS included)."""
    return captions[:, 1:], ~padding_after_eos(captions, eos)[:, 1:]


def caption_loss(logits: torch.Tensor, captions: torch.Tensor, eos: int, label_smoothing: float = 0.0,
                 count_padding: bool = False) -> torch.Tensor:
    """Mean cross entropy over real targets; ``count_padding`` is the planted bug that averages
    over pad positions too. ``logits[:, t]`` scores ``captions[:, t+1]``."""
    targets, real = real_targets(captions, eos)
    logits = logits[:, : targets.shape[1]]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                         label_smoothing=label_smoothing, reduction="none").view_as(targets)
    if count_padding:
        return ce.mean()
    return (ce * real).sum() / real.sum()


def loss_ignoring_pad_id(logits: torch.Tensor, captions: torch.Tensor, pad: int) -> torch.Tensor:
    """The planted bug of the GPT-2 recipes: ``ignore_index=pad_id``. With pad == eos every EOS
    target is dropped too, so the model never learns to stop."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), captions[:, 1:].reshape(-1), ignore_index=pad)


def words(ids, bos: int, eos: int, count_padding: bool = False) -> list:
    """The caption's words: BOS dropped, cut at the first EOS. ``count_padding`` is the planted
    bug that keeps whatever follows (pad tokens scored as words)."""
    ids = list(ids)
    ids = ids[1:] if ids and ids[0] == bos else ids
    if count_padding:
        return ids
    return ids[: ids.index(eos)] if eos in ids else ids


def bleu4(references, hypotheses, bos: int, eos: int, count_padding: bool = False) -> float:
    """Corpus BLEU-4 (nltk, smoothing method 1) on id lists."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    return corpus_bleu([[words(r, bos, eos, count_padding)] for r in references],
                       [words(h, bos, eos, count_padding) for h in hypotheses],
                       smoothing_function=SmoothingFunction().method1)


def xavier_init(m: nn.Module) -> None:
    """The init of the forum case's recipe, for ``module.apply``: xavier-uniform weights and zero
    biases on every Linear/Conv2d. Applied to the whole model it also overwrites a pretrained
    encoder; the reference models apply it to their new layers only (except the bug twins)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

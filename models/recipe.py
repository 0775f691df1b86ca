"""The training-recipe pieces every reference captioner exposes as its file's ``loss_fn`` and
``bleu_fn`` (capdiag's loss_sanity and metric_sanity check them). Real tokens are found by
position, up to and including each caption's first EOS after BOS, never by the pad id alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capdiag.models.transformer_decoder import padding_after_eos


def planted(bug, bugs: dict):
    """``bug`` when it is one of the family's ``bugs`` (or None); else a ValueError naming them."""
    if bug is not None and bug not in bugs:
        raise ValueError(f"unknown bug {bug!r}; choose from {', '.join(bugs)}")
    return bug


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


class EndOfTextRecipe:
    """Forward, decoding, loss and BLEU of a GPT-2-style captioner whose one special id
    (``self.special``, GPT-2's <|endoftext|>) is pad, BOS and EOS at once.

    The class provides ``context(images)`` (what the language model is conditioned on: a prefix,
    an image vector), ``decode(context, captions) -> logits (B, T, V)`` and ``bug``.
    """

    def forward(self, images, captions):
        return self.decode(self.context(images), captions)

    @torch.no_grad()
    def generate(self, images, max_len: int = 20, beam_size: int = 1, alpha: float = 0.6, min_len: int = 0):
        """Greedy (beam_size=1) or beam search; ids (B, L) start with BOS (= EOS = pad)."""
        from capdiag.models.decoding import generate

        return generate(self.context(images), self.decode, bos=self.special, eos=self.special, pad=self.special,
                        max_len=max_len, beam_size=beam_size, alpha=alpha, min_len=min_len)

    def loss_fn(self, logits, captions):
        if self.bug == "loss_ignores_eos":
            return loss_ignoring_pad_id(logits, captions, self.special)
        return caption_loss(logits, captions, self.special)

    def bleu_fn(self, references, hypotheses):
        return bleu4(references, hypotheses, self.special, self.special, self.bug == "bleu_counts_padding")

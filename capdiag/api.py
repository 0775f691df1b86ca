"""Library entry points for users who hold a model object rather than a model file."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .check import Subject
from .intake.subject import subject_from_model


def subject_for(
    model: nn.Module,
    *,
    vocab_size: Optional[int] = None,
    pad_id: int = 0,
    bos_id: int = 1,
    eos_id: int = 2,
    image_size: Optional[int] = None,
    batch: Optional[tuple] = None,
    seed: int = 0,
    loss_fn=None,
    bleu_fn=None,
    **hints,
) -> Subject:
    """Wrap a model object (already built, on its own device) for checks.

    The model is used as it is: capdiag does not move it or change its mode or weights.

    Args:
        model: the captioner, called ``model(images, captions)``.
        vocab_size, pad_id, bos_id, eos_id, image_size: contract hints (see README).
        batch: a real ``(images, captions)`` batch; default: synthetic data.
        loss_fn, bleu_fn: the training recipe's own loss and BLEU, checked by loss_sanity/metric_sanity.
        **hints: any other ``CAPDIAG`` hint (image_module, pretrained, ...).

    Raises:
        UsageError: an unknown or malformed hint (the same message a model file's CAPDIAG gets).
    """
    h = {"pad_id": pad_id, "bos_id": bos_id, "eos_id": eos_id, **hints}
    if vocab_size is not None:
        h["vocab_size"] = vocab_size
    if image_size is not None:
        h["image_size"] = image_size
    sample = (lambda: batch) if batch is not None else None
    return subject_from_model(model, h, name=type(model).__name__, sample_batch=sample, loss_fn=loss_fn,
                              bleu_fn=bleu_fn, seed=seed, where="subject_for()")

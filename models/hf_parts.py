"""Hugging Face parts of the reference captioners: a CLIP vision tower and GPT-2, built from a
configuration (random weights, offline) or loaded from weights the user already has locally (a
folder from ``save_pretrained`` or a model in the Hugging Face cache). Nothing is downloaded.

Needs the ``hf`` extra (``pip install capdiag[hf]``); the core install does not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

HF_HINT = "needs Hugging Face transformers: pip install 'capdiag[hf]'"

# Small configurations: seconds per check on two CPU cores.
CLIP_SMALL = dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=64)
CLIP_FULL = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, projection_dim=512)  # ViT-B/32
GPT2_SMALL = dict(n_embd=96, n_layer=2, n_head=4, n_positions=64)
GPT2_FULL = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024)  # GPT-2 small (124M)

# CLIP's normalization (not ImageNet's): real CLIP weights expect it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def transformers():
    try:
        import transformers as tf
    except ImportError as e:
        raise ImportError(f"this reference model {HF_HINT}") from e
    return tf


def _load(cls, weights: str, what: str):
    try:
        return cls.from_pretrained(weights, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(
            f"no local {what} weights at {weights!r} (capdiag never downloads): give a folder saved with "
            f"save_pretrained() or the name of a model already in the Hugging Face cache"
        ) from e


def clip_vision(size: dict, weights: Optional[str] = None) -> nn.Module:
    """``CLIPVisionModelWithProjection``: random from ``size``, or the local ``weights``."""
    tf = transformers()
    if weights:
        return _load(tf.CLIPVisionModelWithProjection, weights, "CLIP")
    return tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**size))


def gpt2(size: dict, vocab_size: int, special_id: int, weights: Optional[str] = None) -> nn.Module:
    """``GPT2LMHeadModel`` (output projection tied to the token embedding); GPT-2's single
    special token serves as BOS, EOS and pad, as in the usual GPT-2 captioning recipes."""
    tf = transformers()
    if weights:
        return _load(tf.GPT2LMHeadModel, weights, "GPT-2")
    cfg = tf.GPT2Config(vocab_size=vocab_size, bos_token_id=special_id, eos_token_id=special_id,
                        pad_token_id=special_id, **size)
    return tf.GPT2LMHeadModel(cfg)


def weights_file(weights: str) -> str:
    """The weights file behind a local folder or a cached model name: the reference capdiag's
    pretrained_guard compares the loaded module with."""
    folder = Path(weights)
    names = ("model.safetensors", "pytorch_model.bin")
    if folder.is_dir():
        for n in names:
            if (folder / n).is_file():
                return str(folder / n)
    from huggingface_hub import try_to_load_from_cache

    for n in names:
        hit = try_to_load_from_cache(weights, n)
        if isinstance(hit, str):
            return hit
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin for {weights!r}")

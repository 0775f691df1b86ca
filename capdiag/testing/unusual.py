"""Clean but unusual captioners, written the way people write them, each of which must pass every
capdiag check: a false alarm on any of them is a bug of capdiag's.

They differ from the reference models and the zoo on purpose: a frozen encoder under
``torch.no_grad()``, an image module that is a projection after pooled features, normalization or
``/ 255`` inside ``forward``, the popular tutorial's length-sorted decoder with zeros past each
caption's end, dropout 0.5 with sorting, tied embeddings, activation checkpointing (reentrant and
not), GPT-2 (pad == bos == eos) and CLIP (eos == pad) ids, BOS id 0, a prefix LM with a
bidirectional image prefix, dict and ModelOutput-style returns, beam search, 96 and 224 px inputs.

``build(name, bug=None, seed=0)`` builds one; ``PATTERNS`` lists them with their architecture;
``BUGS`` maps the planted bugs (one-line changes of a clean pattern) to the check that must fail.
Every bug here has been seen in public captioning code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .unusual_recurrent import GRUCaptioner, PackedLSTM, SortedAttentionLSTM
from .unusual_transformers import IMAGENET_MEAN, IMAGENET_STD, RAW, GPT2Prefix, PrefixLM, TransformerCaptioner


# ---- the family ----------------------------------------------------------------------------------
def _ids(pad, bos, eos, vocab=24):
    return dict(vocab_size=vocab, pad_id=pad, bos_id=bos, eos_id=eos)


GPT2_IDS = _ids(23, 23, 23)  # pad == bos == eos ("<|endoftext|>")
CLIP_IDS = _ids(23, 22, 23)  # eos == pad
BOS0_IDS = _ids(2, 0, 1)


@dataclass(frozen=True)
class Pattern:
    arch: str
    make: Callable[..., nn.Module]
    hints: dict
    what: str


def _std(**kw):
    return {**dict(vocab_size=24, pad_id=0, bos_id=1, eos_id=2, image_size=32, image_mean=IMAGENET_MEAN,
                   image_std=IMAGENET_STD), **kw}


PATTERNS = {
    "frozen_nograd_encoder": Pattern("gru", lambda bug=None: GRUCaptioner(frozen=True, keep_frozen_eval=bug != "frozen_bn_drifts"),
                                     _std(image_module="encoder"),
                                     "frozen encoder under torch.no_grad(), BatchNorm kept in eval"),
    "projection_image_module": Pattern("transformer", lambda bug=None: TransformerCaptioner(bug=bug),
                                       _std(image_module="proj", attention_modules=[]),
                                       "image_module is a projection after pooled ReLU features"),
    "normalize_inside": Pattern("lstm", lambda bug=None: SortedAttentionLSTM(normalize=True),
                                {**_std(image_module="encoder", attention_modules=["attention"]), **RAW},
                                "ImageNet normalization inside forward, images in [0, 1]"),
    "divide_255_inside": Pattern("gru", lambda bug=None: GRUCaptioner(raw_pixels=True),
                                 {**_std(image_module="encoder", attention_modules=[]), **RAW, "pixel_scale": 255.0},
                                 "raw 0-255 pixels divided by 255 and normalized inside forward"),
    "sorted_tutorial_lstm": Pattern("lstm", lambda bug=None: SortedAttentionLSTM(dropout=0.0),
                                    _std(image_module="encoder", attention_modules=["attention"]),
                                    "lengths from padding, sorted batch, zeros past each caption's end"),
    "dropout_sorted_lstm": Pattern("lstm", lambda bug=None: SortedAttentionLSTM(dropout=0.5),
                                   _std(image_module="encoder", attention_modules=["attention"]),
                                   "dropout 0.5 plus length sorting"),
    "packed_lstm_bos0": Pattern("lstm", lambda bug=None: PackedLSTM(), {**_std(image_module="cnn"), **BOS0_IDS},
                                "pack_padded_sequence, image as first input, BOS id 0"),
    "tied_embeddings": Pattern("transformer", lambda bug=None: TransformerCaptioner(tie=True, bug=bug),
                               _std(image_module="cnn", attention_modules=[]), "weight-tied input/output embeddings"),
    "reentrant_checkpoint": Pattern("transformer", lambda bug=None: TransformerCaptioner(ckpt="reentrant"),
                                    _std(image_module="cnn", attention_modules=[]),
                                    "reentrant activation checkpointing over BatchNorm stages and the decoder"),
    "nonreentrant_checkpoint": Pattern("gru", lambda bug=None: GRUCaptioner(ckpt=True),
                                       _std(image_module="encoder", attention_modules=[]),
                                       "non-reentrant activation checkpointing of the decoder"),
    "finetuned_bn_encoder": Pattern("transformer", lambda bug=None: TransformerCaptioner(stages=3),
                                    _std(image_module="cnn", attention_modules=[]),
                                    "encoder fine-tuned with BatchNorm in train mode"),
    "gpt2_ids": Pattern("transformer", lambda bug=None: TransformerCaptioner(**_pbe(GPT2_IDS)),
                        {**_std(image_module="cnn", attention_modules=[]), **GPT2_IDS}, "pad == bos == eos"),
    "clip_ids": Pattern("gru", lambda bug=None: GRUCaptioner(**_pbe(CLIP_IDS)),
                        {**_std(image_module="encoder", attention_modules=[]), **CLIP_IDS}, "eos == pad, bos separate"),
    "gpt2_prefix_inputs_embeds": Pattern("transformer", lambda bug=None: GPT2Prefix(),
                                         {**_std(image_module="clip_project", attention_modules=[]), **GPT2_IDS},
                                         "ClipCap-style: GPT-2 token embedding called directly, inputs_embeds"),
    "prefix_lm": Pattern("transformer", lambda bug=None: PrefixLM(),
                         {**_std(image_module="to_prefix", attention_modules=[]), **GPT2_IDS},
                         "prefix LM: bidirectional image prefix, causal caption"),
    "dict_output": Pattern("lstm", lambda bug=None: SortedAttentionLSTM(returns="dict", dropout=0.2),
                           _std(image_module="encoder", attention_modules=["attention"]), "returns a dict with logits"),
    "model_output": Pattern("gru", lambda bug=None: GRUCaptioner(returns="output"),
                            _std(image_module="encoder", attention_modules=[]), "returns a ModelOutput-style object"),
    "beam_search": Pattern("transformer", lambda bug=None: TransformerCaptioner(beam=3),
                           _std(image_module="cnn", attention_modules=[]), "beam-search generate"),
    "gru_96px": Pattern("gru", lambda bug=None: GRUCaptioner(stages=3), _std(image_module="encoder", attention_modules=[], image_size=96),
                        "96 px input"),
    "transformer_224px": Pattern("transformer", lambda bug=None: TransformerCaptioner(stem_stride=4, stages=4),
                                 _std(image_module="cnn", attention_modules=[], image_size=224), "224 px input"),
}


def _pbe(ids):
    return dict(pad=ids["pad_id"], bos=ids["bos_id"], eos=ids["eos_id"])


# bug -> (pattern it is planted in, check that must fail)
BUGS = {
    "positional_along_batch": ("projection_image_module", "batch_independence"),
    "cached_encoder": ("tied_embeddings", "eval_determinism"),
    "frozen_bn_drifts": ("frozen_nograd_encoder", "frozen_drift"),
}


def build(name: str, bug: Optional[str] = None, seed: int = 0) -> nn.Module:
    """Build pattern ``name`` (with ``bug`` planted, see ``BUGS``); its hints are on ``capdiag_hints``."""
    if bug is not None and BUGS.get(bug, (None,))[0] != name:
        raise ValueError(f"bug {bug!r} is not planted in {name!r}; see BUGS")
    torch.manual_seed(seed)
    p = PATTERNS[name]
    model = p.make(bug)
    model.capdiag_hints = dict(p.hints)
    return model

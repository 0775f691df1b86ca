"""Strangers: clean captioners written in styles the rest of this repository does not use.

Each one is correct and must pass every capdiag check at every seed; a FAIL or an ERROR on any of
them is a false alarm of capdiag's. They are written the way other people write captioners (the
conventions public repositories use, not the references' or ``capdiag.testing.unusual``'s), and
cover the cases a first try of v0.2 on unseen code got wrong:

- image modules returning ``(features, positions)`` (DETR-style backbones) or a dict;
- forwards returning log-probabilities, or a ``(log_probs, attention)`` tuple, and models without
  ``generate``;
- a bf16 ``torch.autocast`` region inside ``forward``;
- slow learners: the up-down two-LSTM captioner (Anderson et al. 2018) with dropout 0.5;
- ``pack_padded_sequence(enforce_sorted=False)`` with dropout between LSTM layers and BatchNorm1d in
  the encoder head; BatchNorm1d in the output head;
- encoders frozen by ``requires_grad_(False)``, ``torch.no_grad()``, ``FrozenBatchNorm2d`` or a
  ``train()`` override; a forward that ``copy_``s its images into a canvas made under no_grad;
- a memory-augmented encoder (learned memory slots in the region attention, M2-style);
- scheduled sampling in train mode; fairseq-style incremental decoding with a per-layer cache;
- a hand-written GPT with an image prefix (SDPA, GPT-2 ids pad == bos == eos), pad == bos == eos == 0.

``build(name, bug=None, seed=0)`` builds one with its hints on ``capdiag_hints``; ``PATTERNS``
lists them; ``BUGS`` maps bug twins (one change of a clean stranger, each seen in public code) to
the check that must name them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn

from .family import _hints, build_member
from .strangers_decoders import (CanvasCopy, ClipPrefixGPT, DeepRandomBN, FairseqStyle, FrozenBNZeroIds, RaggedBeam,
                                 SeqFirstDetached)
from .strangers_encoders import (AutocastCaptioner, DetrCaptioner, LogProbAttnNoGenerate, MemoryCaptioner, NoGradTrunk,
                                 PackedUnsorted, ScheduledSampling, UpDown)


# ---- the family ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stranger:
    make: Callable[..., nn.Module]
    hints: dict
    what: str


GPT2 = dict(pad_id=23, bos_id=23, eos_id=23)
PATTERNS = {
    "detr_backbone": Stranger(lambda bug=None: DetrCaptioner(), _hints(image_module="backbone", attention_modules=[]),
                              "image module returns (features, positions), DETR-style"),
    "updown_two_lstm": Stranger(lambda bug=None: UpDown(), _hints(image_module="cnn", attention_modules=[]),
                                "up-down two-LSTM attention, dropout 0.5: a slow learner"),
    "packed_unsorted_bn1d": Stranger(lambda bug=None: PackedUnsorted(), _hints(image_module="fc"),
                                     "pack_padded_sequence(enforce_sorted=False), LSTM dropout, BatchNorm1d encoder head"),
    "autocast_bf16": Stranger(lambda bug=None: AutocastCaptioner(), _hints(image_module="encoder", attention_modules=[]),
                              "bf16 torch.autocast inside forward"),
    "logprob_tuple_no_generate": Stranger(lambda bug=None: LogProbAttnNoGenerate(), _hints(image_module="encoder", attention_modules=[]),
                                          "(log_probs, attention) tuple, no generate, encoder frozen by requires_grad_(False)"),
    "memory_augmented": Stranger(lambda bug=None: MemoryCaptioner(bug=bug), _hints(image_module="cnn", attention_modules=[]),
                                 "memory slots in the region attention, region padding mask"),
    "nograd_trunk_eval": Stranger(lambda bug=None: NoGradTrunk(bug=bug), _hints(image_module="proj"),
                                  "trunk frozen by torch.no_grad() (requires_grad left True), kept in eval"),
    "scheduled_sampling": Stranger(lambda bug=None: ScheduledSampling(), _hints(image_module="enc"),
                                   "scheduled sampling in train mode"),
    "fairseq_incremental": Stranger(lambda bug=None: FairseqStyle(), _hints(image_module="encoder", attention_modules=[]),
                                    "fairseq-style incremental decoding with a per-layer cache"),
    "clip_prefix_gpt": Stranger(lambda bug=None: ClipPrefixGPT(), _hints(image_module="clip_project", attention_modules=[], **GPT2),
                                "hand-written GPT (SDPA) with a ClipCap prefix, pad == bos == eos"),
    "frozen_bn_zero_ids": Stranger(lambda bug=None: FrozenBNZeroIds(), _hints(image_module="backbone", pad_id=0, bos_id=0, eos_id=0),
                                   "FrozenBatchNorm2d backbone, pad == bos == eos == 0, BatchNorm1d head"),
    "canvas_copy_dict": Stranger(lambda bug=None: CanvasCopy(), _hints(image_module="vision", attention_modules=[]),
                                 "copy_ into a no_grad view of a canvas; image module returns a dict"),
    "deep_random_bn": Stranger(lambda bug=None: DeepRandomBN(), _hints(image_module="encoder"),
                               "random ResNet-18 trunk (BatchNorm) + teacher-forced tutorial LSTM"),
    "ragged_beam": Stranger(lambda bug=None: RaggedBeam(), _hints(image_module="enc", attention_modules=[]),
                            "per-image beam search returning ragged lists"),
    "seq_first_detached": Stranger(lambda bug=None: SeqFirstDetached(), _hints(image_module="img2h", attention_modules=[]),
                                   "(T, B, d) LSTM; encoder kept out of training by .detach() and eval"),
}

# bug -> (stranger it is planted in, check that must name it)
BUGS = {
    "region_mask_from_zeros": ("memory_augmented", "batch_independence"),
    "trunk_bn_drifts": ("nograd_trunk_eval", "frozen_drift"),
}


def build(name: str, bug: Optional[str] = None, seed: int = 0) -> nn.Module:
    """Build stranger ``name`` (with ``bug`` planted, see ``BUGS``); its hints are on ``capdiag_hints``."""
    return build_member(PATTERNS[name].make, PATTERNS[name].hints, BUGS, name, bug, seed)

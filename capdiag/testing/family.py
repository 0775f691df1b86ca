"""What every fixture family shares: building one member, clean or with one planted bug, seeded, with
its hints on ``capdiag_hints`` (how ``capdiag check`` reads a built model's hints)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_member(make: Callable[[Optional[str]], nn.Module], hints: dict, bugs: dict, name: str,
                 bug: Optional[str] = None, seed: int = 0) -> nn.Module:
    """``make(bug)`` under ``torch.manual_seed(seed)``; ``bugs`` maps bug -> (member it is planted in, check)."""
    if bug is not None and bugs.get(bug, (None,))[0] != name:
        raise ValueError(f"bug {bug!r} is not planted in {name!r}; see BUGS")
    torch.manual_seed(seed)
    model = make(bug)
    model.capdiag_hints = dict(hints)
    return model


def _hints(**kw):
    return {**dict(vocab_size=24, pad_id=0, bos_id=1, eos_id=2, image_size=32, image_mean=MEAN, image_std=STD), **kw}


def _conv(cin, cout, norm=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), norm(cout), nn.ReLU())


def _greedy_steps(step_fn, images, bos, eos, pad, max_len):
    """The loop most repositories write: feed the argmax back, keep a per-sample ``finished`` mask."""
    B = images.shape[0]
    out = torch.full((B, 1), bos, dtype=torch.long, device=images.device)
    finished = torch.zeros(B, dtype=torch.bool, device=images.device)
    for _ in range(max_len - 1):
        word = step_fn(out).argmax(-1)
        word = word.masked_fill(finished, pad)
        out = torch.cat([out, word[:, None]], 1)
        finished = finished | (word == eos)
        if finished.all():
            break
    return out

"""What every fixture family shares: building one member, clean or with one planted bug, seeded, with
its hints on ``capdiag_hints`` (how ``capdiag check`` reads a built model's hints)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def build_member(make: Callable[[Optional[str]], nn.Module], hints: dict, bugs: dict, name: str,
                 bug: Optional[str] = None, seed: int = 0) -> nn.Module:
    """``make(bug)`` under ``torch.manual_seed(seed)``; ``bugs`` maps bug -> (member it is planted in, check)."""
    if bug is not None and bugs.get(bug, (None,))[0] != name:
        raise ValueError(f"bug {bug!r} is not planted in {name!r}; see BUGS")
    torch.manual_seed(seed)
    model = make(bug)
    model.capdiag_hints = dict(hints)
    return model

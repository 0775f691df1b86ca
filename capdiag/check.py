"""The central abstraction: a ``Check`` takes a ``Subject`` and returns a ``Finding``.

The CLI, the pytest plugin and the training hooks all build a ``Subject``, pick checks from
the registry and call ``run_checks``; no front end contains check logic.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional

import torch

from .captioner import Captioner
from .finding import Finding, Status


@dataclass
class Subject:
    """A captioner plus the data a check needs.

    Attributes:
        captioner: the wrapped user model.
        images, captions: one batch on the model's device (the user's or synthetic).
        data: the synthetic dataset generator when the vocabulary allows one, else None.
        seed: base seed; checks derive their own seeds from it and never touch global RNG.
        out_dir: where checks write PNGs (None: write nothing).
        progress: whether long checks may draw progress bars.
        batch_source: "user" (sample_batch() or a batch passed in) or "synthetic" (capdiag's own,
            built from the hints): a check never blames the user for capdiag's own batch.
    """

    captioner: Captioner
    images: torch.Tensor
    captions: torch.Tensor
    data: Any = None
    seed: int = 0
    out_dir: Optional[Path] = None
    progress: bool = False
    batch_source: str = "synthetic"
    options: dict = field(default_factory=dict)

    @property
    def model(self) -> torch.nn.Module:
        return self.captioner.model

    def measured(self, key: str, compute: Callable[[], Any]) -> Any:
        """A measurement of this subject's model and batch that several checks need, computed once.

        Only for pure functions of (model, batch, seed): the value is the same whichever check asks
        first, so caching it cannot make a verdict depend on the order checks run in."""
        memo = self.options.setdefault("_measured", {})
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def output_path(self, filename: str) -> Optional[Path]:
        if self.out_dir is None:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / filename


class Check(abc.ABC):
    """One diagnostic.

    Subclasses set ``name`` (registry key, snake_case, used everywhere), ``catches`` (the bug
    it finds, one line for ``capdiag list``), ``cheap`` (a few passes: safe in quick runs and
    during training) and implement ``run``. ``run`` must leave the model exactly as it found
    it: work in context managers from ``capdiag.state`` or on a deep copy.
    """

    name: ClassVar[str] = ""
    catches: ClassVar[str] = ""
    cheap: ClassVar[bool] = True

    @abc.abstractmethod
    def run(self, subject: Subject) -> Finding: ...

    def finding(
        self,
        status: Status,
        summary: str,
        metrics: Optional[Mapping[str, float]] = None,
        hint: str = "",
        artifacts: Optional[Mapping[str, Any]] = None,
    ) -> Finding:
        return Finding(self.name, status, summary, dict(metrics or {}), dict(artifacts or {}), hint)

    def skip(self, reason: str) -> Finding:
        return self.finding(Status.SKIP, reason)

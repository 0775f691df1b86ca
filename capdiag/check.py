"""The central abstraction: a ``Check`` takes a ``Subject`` and returns a ``Finding``.

The CLI, the pytest plugin and the training hooks all build a ``Subject``, pick checks from
the registry and call ``run_checks``; no front end contains check logic.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch

from .captioner import Captioner
from .finding import Finding, Location, Status


@dataclass
class Subject:
    """A captioner plus the data a check needs.

    Attributes:
        captioner: the wrapped user model.
        images, captions: one batch on the model's device (the user's or synthetic).
        data: the synthetic dataset generator when the vocabulary allows one, else None.
        seed: base seed; checks derive their own seeds from it and never touch global RNG.
        progress: whether long checks may draw progress bars.
        batch_source: "user" (sample_batch() or a batch passed in) or "synthetic" (capdiag's own,
            built from the hints): a check never blames the user for capdiag's own batch.
        live: the model is being trained right now (the training monitor): checks judge it as it
            is and never train a copy, gradient checks read the ``.grad`` its training step left
            instead of running a backward of their own, and drift checks compare frozen modules
            with ``frozen_reference``.
        frozen_reference: with ``live``, ``DriftWatcher``s over the modules meant to stay frozen,
            taken when training started.
        recipe: the ``training.Recipe`` of the one copy ``training.fitted_of`` trains (None: the default
            ``training.RECIPE``); ``capdiag overfit --steps/--lr`` sets it.
        rebuild: when known, a function building the model afresh the way the user does (their
            ``build_model``): ``pretrained_guard`` reruns it to find the line that overwrote weights.
        dataset: the user's captions and images (``--data``, a ``userdata.CaptionData`` with its
            tokenizer and preprocessing set), or None. The batch was drawn from it; the checks of a
            trained model draw more images from it.

    Shared state is explicit and order-independent: ``measured`` caches pure functions of
    (model, batch, seed); ``fitted`` is the one copy trained by ``recipe``, whichever check asks
    first; ``learned`` is what every check that needs a learned model judges.
    """

    kind: ClassVar[str] = "captioner"  # what a check's ``subjects`` name (capdiag.prompted adds "prompted")
    captioner: Captioner
    images: torch.Tensor
    captions: torch.Tensor
    data: Any = None
    seed: int = 0
    progress: bool = False
    batch_source: str = "synthetic"
    live: bool = False
    frozen_reference: Sequence = ()
    recipe: Any = None  # how training.fitted_of trains its copy: a training.Recipe (None: training.RECIPE)
    rebuild: Optional[Callable[[], torch.nn.Module]] = None  # builds the model afresh (the model file's factory)
    weights: Optional[str] = None  # the checkpoint loaded into the model (``--weights``), in words
    dataset: Any = None  # the user's captions and images (``--data``): a ``userdata.CaptionData``
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def model(self) -> torch.nn.Module:
        return self.captioner.model

    # What the front ends and reports read of any subject kind.
    @property
    def name(self) -> str:
        return self.captioner.name

    @property
    def assumptions(self) -> list:
        return list(self.captioner.spec.assumptions)

    @property
    def device(self) -> torch.device:
        return self.captioner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.captioner.dtype

    def decode(self, ids) -> str:
        """Token ids of this subject's batch as words for reports: the user's tokenizer, the
        synthetic vocabulary for capdiag's own batch, else the ids themselves."""
        if self.dataset is not None:
            return self.dataset.tokenizer.decode(list(ids))
        if self.data is not None and self.batch_source == "synthetic":
            return self.data.decode(ids)
        return " ".join(str(int(t)) for t in ids)

    @property
    def fitted_decode(self) -> Callable:
        """``decode`` for the batch the fitted copy trains on: the synthetic vocabulary when capdiag
        makes one (see training.overfit_batch), else this subject's own."""
        return self.data.decode if self.data is not None else self.decode

    def measured(self, key: str, compute: Callable[[], Any]) -> Any:
        """A measurement of this subject's model and batch that several checks need, computed once.

        Only for pure functions of (model, batch, seed): the value is the same whichever check asks
        first, so caching it cannot make a verdict depend on the order checks run in."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


class Check(abc.ABC):
    """One diagnostic.

    Subclasses set ``name`` (registry key, snake_case, used everywhere), ``catches`` (the bug
    it finds, one line for ``capdiag list``), ``cheap`` (a few passes, nothing trained: in
    ``--quick`` runs), ``live`` (meaningful and safe on a model in training, given a ``live``
    subject: a few no-grad passes on the probe batch or the step's own gradients; the training
    monitor runs these) and implement ``run``. ``run`` must leave the model exactly as it found
    it: work in context managers from ``capdiag.state`` or on a deep copy.
    """

    name: ClassVar[str] = ""
    catches: ClassVar[str] = ""
    cheap: ClassVar[bool] = True
    live: ClassVar[bool] = False
    # The user's method whose results the verdict judges ("forward", "generate", "loss_fn", "bleu_fn"):
    # a failing finding that no traced operation located points there (a "called from" location).
    calls: ClassVar[str] = "forward"
    # The subject kinds this check judges: "captioner" (``Subject``), "prompted" (``capdiag.prompted``'s
    # vision-language captioners). On another kind the runner reports SKIP without calling ``run``.
    subjects: ClassVar[tuple] = ("captioner",)

    @abc.abstractmethod
    def run(self, subject: Subject) -> Finding: ...

    def reads_only(self, subject: Subject) -> bool:
        """True when this run only reads state (never calls the model, changes no mode, buffer or
        RNG): the runner then skips its ``preserved_state`` snapshot, which on the training hot path
        would cost more than the check (cloning every buffer, walking every module)."""
        return False

    def finding(
        self,
        status: Status,
        summary: str,
        metrics: Optional[Mapping[str, float]] = None,
        hint: str = "",
        artifacts: Optional[Mapping[str, Any]] = None,
        location: Optional[Location] = None,
    ) -> Finding:
        return Finding(self.name, status, summary, dict(metrics or {}), dict(artifacts or {}), hint,
                       location if status.failed else None)

    def skip(self, reason: str) -> Finding:
        return self.finding(Status.SKIP, reason)

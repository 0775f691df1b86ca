"""Training a *copy* of the user's captioner (the caller's weights are never touched).

Used by the overfit check and by checks that need a model which has learned something
(image ablation, attention, attribution on an untrained model).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .captioner import Captioner
from .data import empirical_blind_floor
from .state import mode, seeded


@dataclass
class FitResult:
    captioner: Captioner  # the trained copy
    losses: list = field(default_factory=list)  # train-mode loss per step
    lr: float = 1e-3
    interrupted: bool = False
    diverged: bool = False

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def recent_loss(self) -> float:
        """Best train-mode loss of the last 10 steps (inf before any step)."""
        return min(self.losses[-10:]) if self.losses else float("inf")


def copy_captioner(cap: Captioner) -> Captioner:
    return cap.with_model(copy.deepcopy(cap.model))


def fit_copy(
    cap: Captioner,
    images: torch.Tensor,
    captions: torch.Tensor,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    stop_loss: float = 0.005,
    progress: bool = False,
    desc: str = "overfit",
    patience: int = 100,
    floor: Optional[float] = None,
) -> FitResult:
    """Train a deep copy with Adam on one fixed batch; stop early at ``stop_loss``, or on a
    plateau: no 2 % improvement of the best loss within ``patience`` steps (a model that
    cannot see the image sits at its floor; more steps only cost time). With the batch's
    image-blind ``floor`` given, ``patience // 2`` consecutive steps within 5 % of it also stop:
    a model that reads the image passes through that level in a few steps.

    Ctrl-C stops the loop and returns the partial result with ``interrupted=True``.
    """
    twin = copy_captioner(cap)
    params = [p for p in twin.model.parameters() if p.requires_grad]
    result = FitResult(twin, lr=lr)
    if not params:
        return result
    opt = torch.optim.Adam(params, lr=lr)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True)
    twin.model.train()  # our own copy: its BatchNorm statistics must keep what training taught them
    with seeded(seed):
        try:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = twin.loss(images, captions)
                value = float(loss.detach())
                result.losses.append(value)
                if not math.isfinite(value):
                    result.diverged = True
                    break
                loss.backward()
                opt.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}")
                if value < stop_loss or _plateaued(result.losses, patience, floor) or _at_floor(result.losses, floor, patience // 2):
                    break
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            if bar is not None:
                bar.close()
    return result


def _plateaued(losses: list, patience: int, floor: Optional[float] = None) -> bool:
    """No 2 % improvement in ``patience`` steps, while still far from memorized (a model already
    well below the image-blind floor is converging, however slowly, and keeps training)."""
    if not patience or len(losses) < 2 * patience:
        return False
    if floor is not None and min(losses) < 0.5 * floor:
        return False
    return min(losses[-patience:]) > 0.98 * min(losses[:-patience])


def _at_floor(losses: list, floor: Optional[float], n: int) -> bool:
    if floor is None or not n or len(losses) < n:
        return False
    return all(abs(v - floor) < 0.05 * floor for v in losses[-n:])


@torch.no_grad()
def eval_loss(cap: Captioner, images: torch.Tensor, captions: torch.Tensor, seed: int = 0) -> float:
    with seeded(seed), mode(cap.model, False):
        return float(cap.loss(images, captions))



def overfit_batch(s, batch_size: int = 16):
    """A balanced synthetic batch (captions share prefixes, differ only in what the image
    shows) when capdiag can make one for this vocabulary, else the subject's own batch."""
    if s.data is not None:
        images, captions = s.data.batch(batch_size, seed=s.seed + 100, balanced=True)
        return s.captioner.to_inputs(images, captions)
    return s.images, s.captions


def learned(s, steps: int = 300, lr: float = 3e-3, batch_size: int = 16):
    """A captioner that has learned something, plus the batch to judge it on.

    Uses the model as it is when its loss is already well below ln(V) (a trained checkpoint);
    otherwise a copy overfit on ``overfit_batch`` (shared with the overfit check through
    ``s.options['fitted']``). Returns ``(captioner, images, captions, source)``.
    """
    cap = s.captioner
    if eval_loss(cap, s.images, s.captions, s.seed) < 0.5 * math.log(cap.spec.vocab_size):
        return cap, s.images, s.captions, "the model as given (already trained)"
    images, captions = overfit_batch(s, batch_size)
    fitted = s.options.get("fitted")
    if fitted is None:
        floor = empirical_blind_floor(captions.cpu(), cap.target_mask(captions).cpu())
        fitted = fit_copy(cap, images, captions, steps, lr, s.seed, 0.005, s.progress, "fitting a copy", floor=floor).captioner
        s.options["fitted"] = fitted
    return fitted, images, captions, "a copy overfit on one synthetic batch"

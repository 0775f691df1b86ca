"""Pretrained-weight guard: tell pretrained weights from freshly initialized ones.

Two ways. With a reference (a state_dict file, a torchvision weights enum whose file is in
the local cache, or a snapshot taken by ``guard_pretrained``): compare tensor by tensor.
Without one: a freshly initialized tensor has a fingerprint. Its values follow the uniform
or normal law of a standard init (PyTorch's default, xavier, kaiming, N(0, 0.02)), with the
standard deviation that init gives for the layer's fan-in/fan-out; BatchNorm starts at weight
1, bias 0, running mean 0, running var 1. Trained weights are heavy-tailed and scaled
otherwise. The forum case (``model.apply(xavier_init)`` reaching a pretrained ResNet) leaves
exactly this fingerprint on every conv.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from ..distributed import local_shard
from ..errors import ClobberedWeightsError
from ..intake.checkpoints import strip_prefix

MIN_NUMEL = 64


def _fans(w: torch.Tensor) -> tuple:
    if w.dim() < 2:
        return w.numel(), w.numel()
    receptive = w[0][0].numel()
    return w.shape[1] * receptive, w.shape[0] * receptive


def init_stds(w: torch.Tensor) -> dict:
    """Standard deviations that common initializers give a tensor of this shape."""
    fan_in, fan_out = _fans(w)
    avg = (fan_in + fan_out) / 2
    return {
        "pytorch default (kaiming_uniform a=sqrt 5)": 1 / math.sqrt(3 * fan_in),
        "xavier": math.sqrt(1 / avg),
        "xavier (relu gain)": math.sqrt(2 / avg),
        "xavier (tanh gain)": 5 / 3 * math.sqrt(1 / avg),
        "kaiming fan_in": math.sqrt(2 / fan_in),
        "kaiming fan_out": math.sqrt(2 / fan_out),
        "lecun": math.sqrt(1 / fan_in),
        "normal 0.02": 0.02,
        "normal 0.01": 0.01,
        "normal 1 (embedding default)": 1.0,
    }


def fresh_init_match(w: torch.Tensor) -> Optional[str]:
    """Name of the standard init this tensor looks freshly drawn from, or None."""
    if w.numel() < MIN_NUMEL or w.dim() < 2:
        return None
    x = w.detach().float().flatten()
    if not bool(torch.isfinite(x).all()):
        return None
    mean, std = float(x.mean()), float(x.std())
    if std == 0 or abs(mean) > 0.2 * std + 1e-8:
        return None
    z = (x - mean) / std
    kurt = float((z**4).mean())
    n = x.numel()
    # Sampling error of the kurtosis is ~sqrt(24/n) for a normal law, smaller for a uniform one.
    tol = 4 * math.sqrt(24 / n) + 0.05
    law = None
    if abs(kurt - 1.8) < tol and float(z.abs().max()) < math.sqrt(3) * 1.02:
        law = "uniform"
    elif abs(kurt - 3.0) < tol + 0.1 and float(z.abs().max()) < 6.5:
        law = "normal"
    if law is None:
        return None
    for name, s in init_stds(w).items():
        if abs(std - s) / s < 0.06:
            return f"{name} ({law})"
    # truncated normal draws (ViT/GPT-2) have kurtosis < 3: accept 0.02 when the std fits
    return None


def bn_is_default(m: nn.Module) -> bool:
    if not isinstance(m, nn.modules.batchnorm._NormBase) or not m.affine:
        return False
    ok = bool((m.weight == 1).all()) and bool((m.bias == 0).all())
    if m.track_running_stats and m.running_mean is not None:
        ok = ok and bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())
    return ok


@dataclass
class FreshnessReport:
    n_tensors: int
    n_fresh: int
    n_bn: int
    n_bn_default: int
    examples: list
    fresh_names: list = field(default_factory=list)  # parameter names (within the module) that look fresh

    @property
    def fraction_fresh(self) -> float:
        """Share of weight tensors that look freshly drawn (BatchNorm layers when there are none).

        Weights and BN are kept apart: ``apply(xavier)`` re-draws convs but leaves BN pretrained."""
        if self.n_tensors:
            return self.n_fresh / self.n_tensors
        return self.n_bn_default / self.n_bn if self.n_bn else 0.0


def freshness(module: nn.Module) -> FreshnessReport:
    """How much of a module looks freshly initialized (weights and BatchNorm layers)."""
    n = fresh = nbn = bndef = 0
    examples, names = [], []
    for mname, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
            nbn += 1
            bndef += bn_is_default(m)
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and w.numel() >= MIN_NUMEL:
            n += 1
            match = fresh_init_match(w)
            if match:
                fresh += 1
                names.append(f"{mname}.weight" if mname else "weight")
                if len(examples) < 5:
                    examples.append(f"{mname or type(m).__name__}.weight ~ {match}")
    return FreshnessReport(n, fresh, nbn, bndef, examples, names)


KNOWN_BACKBONES = (
    "ResNet", "EfficientNet", "MobileNetV2", "MobileNetV3", "DenseNet", "VGG", "ShuffleNetV2", "SqueezeNet",
    "MNASNet", "RegNet", "ConvNeXt", "VisionTransformer", "SwinTransformer", "CLIPVisionModel",
    "CLIPVisionTransformer", "GoogLeNet", "Inception3", "EfficientNetV2",
)


def looks_like_backbone(module: nn.Module) -> Optional[str]:
    """Class name of a known pretrained-backbone architecture inside ``module`` (or None)."""
    for m in module.modules():
        if type(m).__name__ in KNOWN_BACKBONES:
            return type(m).__name__
    return None


@dataclass
class Comparison:
    n_compared: int
    identical: list
    finetuned: list  # changed but still strongly correlated with the reference
    clobbered: list  # changed and uncorrelated: overwritten
    missing: list

    @property
    def fraction_clobbered(self) -> float:
        return len(self.clobbered) / max(self.n_compared, 1)


def compare_to_reference(module: nn.Module, reference: dict) -> Comparison:
    state = module.state_dict()
    ref, _ = strip_prefix(reference, state)
    same, tuned, clobbered, missing = [], [], [], []
    n = 0
    for k, r in ref.items():
        v = state.get(k)
        if v is None or v.shape != r.shape:
            missing.append(k)
            continue
        if not v.is_floating_point():
            continue
        n += 1
        a, b = v.detach().float().cpu().flatten(), r.float().flatten()
        if torch.equal(a, b):
            same.append(k)
            continue
        cos = float(torch.nn.functional.cosine_similarity(a - a.mean() * 0, b, dim=0)) if a.numel() > 1 else 0.0
        (tuned if cos > 0.5 else clobbered).append((k, cos))
    return Comparison(n, same, tuned, clobbered, missing)


@contextlib.contextmanager
def guard_pretrained(module: nn.Module, name: str = "module") -> Iterator[None]:
    """Raise if the block overwrites ``module``'s weights.

    Example::

        with capdiag.guard_pretrained(model.encoder, "encoder"):
            model.apply(init_weights)   # raises: the init reached the pretrained encoder

    Raises:
        ClobberedWeightsError: naming the changed parameters and the init they now look like.
    """
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    yield
    after = module.state_dict()
    changed = [k for k, v in before.items() if k in after and not torch.equal(v, after[k])]
    if changed:
        looks = [m for m in (fresh_init_match(after[k]) for k in changed if after[k].dim() >= 2) if m]
        how = f"; they now look freshly initialized ({looks[0]})" if looks else ""
        raise ClobberedWeightsError(
            f"{len(changed)} pretrained tensors of {name} were overwritten ({', '.join(changed[:4])}"
            f"{' ...' if len(changed) > 4 else ''}){how}; restrict the init to the new layers, e.g. "
            f"apply it to the decoder only or skip modules inside {name}"
        )


class DriftWatcher:
    """Watch modules meant to stay frozen: parameters and BatchNorm running statistics.

    ``drift()`` returns ``{tensor name: max relative change since the snapshot}`` for tensors
    that moved. BN running stats move in train mode even with ``requires_grad=False``: a common
    silent change to a "frozen" pretrained encoder.
    """

    def __init__(self, module: nn.Module, name: str = ""):
        self.module, self.name = module, name
        # Local shards under FSDP (each rank watches its own piece; the monitor reduces the result).
        self.reference = {k: local_shard(v).detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    def drift(self) -> dict:
        """``{tensor name: max relative change}`` of the tensors (this rank's shards) that moved."""
        out = {}
        state = self.module.state_dict()
        for k, ref in self.reference.items():
            cur = local_shard(state[k]).detach()
            if not torch.equal(cur, ref):
                out[f"{self.name}.{k}" if self.name else k] = float(
                    (cur.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)
                )
        return out


def frozen_modules(model: torch.nn.Module) -> list:
    """Dotted names of the largest submodules whose parameters (at least one) all have requires_grad=False."""
    out = []
    for name, m in model.named_modules():
        params = list(m.parameters())
        if not name or not params or any(p.requires_grad for p in params):
            continue
        if any(name.startswith(f + ".") for f in out):
            continue  # inside a frozen module already listed
        out.append(name)
    return out


def is_running_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var"))

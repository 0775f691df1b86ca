"""The one option table the front ends share: the CLI's ``--weights`` is the pytest plugin's
``--capdiag-weights``, with the same help, choices and meaning, and one function turns the chosen
values into a ``Subject``. Imports only the standard library (the pytest plugin loads it at start-up).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Option:
    """One option: ``--NAME`` on the command line, ``--capdiag-NAME`` under pytest."""

    name: str  # dashes in the flag, underscores in the value's name
    help: str
    metavar: Optional[str] = None
    default: Any = None
    choices: Optional[tuple] = None
    type: Optional[Callable] = None
    repeat: bool = False  # may be given several times (action="append")
    flag: bool = False  # takes no value (action="store_true")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def kwargs(self) -> dict:
        if self.flag:
            return {"action": "store_true", "help": self.help}
        out = {"help": self.help, "default": [] if self.repeat and self.default is None else self.default}
        if self.repeat:
            out["action"] = "append"
        for key in ("metavar", "choices", "type"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


MODEL = (
    Option("factory", "callable in the model file that builds the model", default="build_model"),
    Option("arg", "keyword argument for the factory (repeatable)", metavar="NAME=VALUE", repeat=True),
    Option("device", "cpu, cuda or cuda:N (default: cuda when available)"),
    Option("precision", "cast the built model to this dtype before checking (default: as built); bfloat16 halves "
           "the memory of a model too big for one device in float32", choices=("float32", "bfloat16", "float16")),
    Option("weights", "load this checkpoint into the built model first (state_dict .pt/.pth, .safetensors, "
           "Lightning .ckpt; DDP/Lightning key prefixes removed; keys must match)", metavar="PATH"),
    Option("data", "draw the batches from your captions and images: a COCO captions JSON, a Flickr captions file "
           "or a CSV (or the folder holding it and the images)", metavar="PATH"),
    Option("tokenizer", "with --data: a word-map JSON or a Hugging Face tokenizer folder (default: tokenize() in "
           "the model file)", metavar="PATH"),
    Option("seed", "seed of every random draw (which images --data uses, too)", default=0, type=int),
    Option("prompt", "a vision-language captioner's prompt before each caption, {image} for the image token "
           "(default: the family's, or PROMPT in the model file)", metavar="TEXT"),
    Option("adapter", "a vision-language folder: load this LoRA adapter (the folder peft's save_pretrained() "
           "wrote) onto the model, trainable as for fine-tuning", metavar="DIR"),
)
SELECT = (
    Option("only", "comma-separated checks to run (repeatable)", metavar="CHECKS", repeat=True),
    Option("skip", "comma-separated checks to leave out (repeatable)", metavar="CHECKS", repeat=True),
    Option("quick", "only the cheap structural checks (seconds)", flag=True),
)


def add_cli(parser, options) -> None:
    """Add ``options`` to an argparse parser as ``--NAME``."""
    for o in options:
        parser.add_argument(f"--{o.name}", dest=o.dest, **o.kwargs())


def add_pytest(group, options) -> None:
    """Add ``options`` to a pytest option group as ``--capdiag-NAME`` (dest ``capdiag_NAME``)."""
    for o in options:
        group.addoption(f"--capdiag-{o.name}", dest=f"capdiag_{o.dest}", **o.kwargs())


def split(values) -> list:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (``--only a,b --only c``)."""
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def selected(get: Callable[[str], Any], kind: str = "captioner") -> list:
    """The check names ``--only``/``--skip``/``--quick`` pick for a subject of ``kind`` (validated: unknown
    names are a ``UsageError`` naming close matches)."""
    from .registry import select_checks

    return select_checks(split(get("only")), split(get("skip")), quick=bool(get("quick")), kind=kind)


def subject_from(target: str, get: Callable[[str], Any], batch_size: int = 8, progress: Optional[bool] = None):
    """``(model file, Subject)`` for ``target`` with the ``MODEL`` options read through ``get(name)``.

    Raises:
        CapdiagError: the model cannot be found, built, loaded or called (one line, exit code 2).
    """
    import torch

    from .errors import UsageError
    from .intake.discover import load_model_file
    from .intake.modelfile import model_kwargs
    from .intake.subject import make_subject
    from .prompted.families import supported
    from .prompted.front import folder_subject, is_prompted_file, is_prompted_target, model_file_subject

    precision = get("precision")
    if is_prompted_target(target):
        return folder_subject(target, get)
    mf = load_model_file(target, get("factory") or "build_model")
    if is_prompted_file(mf):
        return model_file_subject(mf, get)
    for name in ("prompt", "adapter"):
        if get(name):
            raise UsageError(f"--{name} is for vision-language captioners (a folder of {supported()} or a model "
                             f"file defining collate()); {target} is not one")
    subject = make_subject(
        mf, device=get("device"), seed=get("seed") or 0, batch_size=batch_size, model_kwargs=model_kwargs(get("arg")),
        progress=sys.stderr.isatty() if progress is None else progress,
        dtype=getattr(torch, precision) if precision else None, weights=get("weights"), data=get("data"),
        tokenizer=get("tokenizer"),
    )
    return mf, subject


def context(subject) -> dict:
    """What every report names: device, precision, weights and data."""
    return {"device": str(subject.device), "precision": str(subject.dtype).replace("torch.", ""),
            "weights": subject.weights or "", "data": subject.dataset.describe() if subject.dataset is not None else ""}

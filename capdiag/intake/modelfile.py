"""A model file: what the user's ``.py`` file (or module) provides, and building its model.

The model-file contract (see README): ``build_model()`` returning an ``nn.Module`` called as
``model(images, captions)``; optional ``CAPDIAG`` hints, ``sample_batch()``, ``loss_fn`` and
``bleu_fn``. ``capdiag.intake.discover`` picks this loader or the Hugging Face folder's.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from ..errors import CapdiagError, ModelCallError, ModelFileError, UsageError
from ..usercode import raised_at
from .hints import check_keys


@dataclass
class ModelFile:
    """What a model file provides."""

    path: str
    module: Any
    factory: Callable
    hints: dict = field(default_factory=dict)
    sample_batch: Optional[Callable] = None
    loss_fn: Optional[Callable] = None
    bleu_fn: Optional[Callable] = None
    tokenizer_folder: Optional[str] = None  # a Hugging Face folder's own tokenizer (for --data)
    crop: bool = True  # --data images: resize and center-crop (False: squash, as ViT/BLIP processors do)
    built: Optional[nn.Module] = None  # a model the loader already built (a Hugging Face folder), used once

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path.endswith(".py") else self.path



def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""



def load_python_file(target: str, factory: str = "build_model") -> ModelFile:
    """Import a model file by path (``model.py``) or by module name (``capdiag.models.cnn_transformer``).

    Raises:
        ModelFileError: missing file, syntax/import error, or no factory; message says how to fix it.
    """
    path = Path(target)
    is_module_name = not target.endswith(".py") and not path.exists() and all(
        p.isidentifier() for p in target.split(".")
    )
    try:
        if is_module_name:
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as e:
                if e.name and target.startswith(e.name):
                    raise ModelFileError(
                        f"no model file or module {target!r}; pass the path to a .py file that defines build_model()"
                    ) from None
                raise
            shown = target
        else:
            if not path.is_file():
                raise ModelFileError(
                    f"model file {target!r} not found; pass the path to a .py file that defines build_model()"
                    if not path.is_dir() else f"{target!r} is a folder without config.json; pass a .py file defining "
                    "build_model() or a Hugging Face folder saved with save_pretrained()"
                )
            mod_name = f"capdiag_user_model_{abs(hash(str(path.resolve())))}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            # Let the file import its neighbours, as `python model.py` would.
            sys.path.insert(0, str(path.resolve().parent))
            try:
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            finally:
                sys.path.pop(0)
            shown = str(path)
    except CapdiagError:
        raise
    except SyntaxError as e:
        raise ModelFileError(f"{e.filename}:{e.lineno}: syntax error: {e.msg}; fix the file and rerun") from e
    except ImportError as e:
        where = raised_at(e)
        what = f"No module named {e.name!r}" if isinstance(e, ModuleNotFoundError) and e.name else _first_line(e)
        raise ModelFileError(
            f"importing {target} failed: {what} (at {where}); install the missing package or fix the import"
        ) from e
    except Exception as e:  # noqa: BLE001
        raise ModelFileError(
            f"importing {target} raised {type(e).__name__}: {_first_line(e)} (at {raised_at(e)})"
        ) from e

    fn = getattr(module, factory, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__]
        also = f" (functions found: {', '.join(found)})" if found else ""
        raise ModelFileError(
            f"{shown} defines no {factory}(); add `def {factory}(): return YourCaptioner()` "
            f"or pass --factory NAME{also}"
        )
    hints = getattr(module, "CAPDIAG", {}) or {}
    check_keys(hints, f"CAPDIAG in {shown}")  # a dict of known hints, or a one-line error
    return ModelFile(
        shown, module, fn, dict(hints),
        getattr(module, "sample_batch", None), getattr(module, "loss_fn", None), getattr(module, "bleu_fn", None),
    )



def build_model(mf: ModelFile, kwargs: Optional[dict] = None) -> nn.Module:
    try:
        model = mf.factory(**(kwargs or {}))
    except Exception as e:  # noqa: BLE001
        raise ModelCallError(
            f"{mf.factory.__name__}() raised {type(e).__name__}: {_first_line(e)} (at {raised_at(e, _file(mf))})"
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelCallError(f"{mf.factory.__name__}() returned {type(model).__name__}; expected a torch.nn.Module")
    return model



def _file(mf: ModelFile) -> Optional[str]:
    return getattr(mf.module, "__file__", None)



def model_kwargs(pairs) -> dict:
    """``NAME=VALUE`` pairs (``--arg``, ``--capdiag-arg``) as factory keyword arguments; values are
    Python literals when they parse as one, else strings."""
    kwargs = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--arg {pair!r} must look like NAME=VALUE (e.g. --arg bug=no_causal_mask)")
        k, v = pair.split("=", 1)
        try:
            kwargs[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            kwargs[k] = v
    return kwargs

"""Find the captioner the user pointed at: a Hugging Face folder (``config.json``) or a Python model
file / module. Its own small module so that neither loader imports the other."""
from __future__ import annotations

from .hf_folder import is_hf_folder, model_file
from .modelfile import ModelFile, load_python_file


def load_model_file(target: str, factory: str = "build_model") -> ModelFile:
    """A ``ModelFile`` for ``target``: a Hugging Face folder saved with ``save_pretrained()``, a ``.py``
    file defining ``factory`` (default ``build_model``), or an importable module name.

    Raises:
        ModelFileError: nothing loadable there; the message says how to fix it.
    """
    if is_hf_folder(target):
        return model_file(target)
    return load_python_file(target, factory)

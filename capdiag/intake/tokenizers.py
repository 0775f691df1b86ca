"""The user's tokenizer for ``--data``: three kinds, one interface.

- ``FunctionTokenizer``: ``tokenize(list[str]) -> LongTensor (B, T)`` defined in the model file
  (BOS, EOS and padding included, as the model is trained), with an optional
  ``decode(list[int]) -> str`` beside it.
- ``HFTokenizer``: a Hugging Face tokenizer folder (``--tokenizer DIR``, or the tokenizer saved in
  a Hugging Face model folder). Text is tokenized without the tokenizer's own specials and wrapped
  in the model's BOS and EOS ids, because those are what the model was trained with (GPT-2 adds
  no BOS; BLIP's decoder starts from [DEC], not [CLS]).
- ``WordMap``: the JSON word -> id map of the popular "Show, Attend and Tell" tutorial
  (``WORDMAP_*.json`` with ``<start>``, ``<end>``, ``<pad>``, ``<unk>``): lower-cased words.

``encode`` returns ``(B, T)`` long ids: BOS, words, EOS, then padding; ``max_len`` truncates the
words (the EOS is kept).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import DataError

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _pad(rows: list, pad_id: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (T - len(r)) for r in rows], dtype=torch.long)


def _wrap(words: list, bos: int, eos: int, max_len: Optional[int]) -> list:
    if max_len is not None:
        words = words[: max(1, max_len - 2)]
    return [bos] + list(words) + [eos]


class FunctionTokenizer:
    def __init__(self, fn: Callable, decode: Optional[Callable] = None, where: str = "the model file"):
        self.fn, self._decode, self.name = fn, decode, f"tokenize() in {where}"
        self.can_decode = decode is not None  # else captions are compared as token ids
        self.unk_id = None  # not known for a user's function

    def encode(self, texts: list, max_len: Optional[int] = None) -> torch.Tensor:
        try:
            out = self.fn(list(texts))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{self.name} raised {type(e).__name__}: {e}") from None
        out = torch.as_tensor(out)
        if out.dim() != 2 or out.shape[0] != len(texts) or out.dtype not in (torch.long, torch.int, torch.int32):
            raise DataError(f"{self.name} returned {out.dtype} {tuple(out.shape)} for {len(texts)} captions; "
                            "expected a LongTensor (B, T) of token ids with BOS, EOS and padding")
        return out.long()[:, :max_len] if max_len else out.long()

    def decode(self, ids: list) -> str:
        return self._decode(list(ids)) if self._decode else " ".join(f"<{int(t)}>" for t in ids)


class HFTokenizer:
    def __init__(self, folder: str, bos: int, eos: int, pad: int):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError("--tokenizer with a Hugging Face folder needs transformers: pip install 'capdiag[hf]'") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"no Hugging Face tokenizer in {folder} ({type(e).__name__}); give a folder saved with "
                            "tokenizer.save_pretrained()") from None
        self.bos, self.eos, self.pad = bos, eos, pad
        self.unk_id = self.tok.unk_token_id  # None for byte-level BPE (GPT-2), which has no unknown words
        self.name = f"Hugging Face {type(self.tok).__name__} from {folder}"

    def encode(self, texts: list, max_len: Optional[int] = None) -> torch.Tensor:
        ids = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        return _pad([_wrap(r, self.bos, self.eos, max_len) for r in ids], self.pad)

    def decode(self, ids: list) -> str:
        return self.tok.decode([int(t) for t in ids], skip_special_tokens=False).strip()


class WordMap:
    SPECIALS = {"pad_id": "<pad>", "bos_id": "<start>", "eos_id": "<end>"}

    def __init__(self, path: str, stoi: Optional[dict] = None):
        try:
            self.stoi = {str(k): int(v) for k, v in (stoi if stoi is not None else json.loads(Path(path).read_text())).items()}
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise DataError(f"--tokenizer {path} is not a word map (a JSON object word -> id): {e}") from None
        missing = [w for w in (*self.SPECIALS.values(), "<unk>") if w not in self.stoi]
        if missing:
            raise DataError(f"word map {path} has no {', '.join(missing)}; the tutorial format needs "
                            "<start>, <end>, <pad> and <unk>")
        self.itos = {v: k for k, v in self.stoi.items()}
        self.unk_id = self.stoi["<unk>"]
        self.name = f"word map {path}"

    @classmethod
    def from_dict(cls, stoi: dict) -> "WordMap":
        return cls("(in memory)", stoi)

    @property
    def special_ids(self) -> dict:
        """The hint values this word map fixes: ``{"pad_id": ..., "bos_id": ..., "eos_id": ...}``."""
        return {k: self.stoi[w] for k, w in self.SPECIALS.items()}

    def words(self, text: str) -> list:
        return WORD.findall(text.lower())

    def encode(self, texts: list, max_len: Optional[int] = None) -> torch.Tensor:
        unk, ids = self.stoi["<unk>"], self.special_ids
        rows = [_wrap([self.stoi.get(w, unk) for w in self.words(t)], ids["bos_id"], ids["eos_id"], max_len)
                for t in texts]
        return _pad(rows, ids["pad_id"])

    def decode(self, ids: list) -> str:
        return " ".join(self.itos.get(int(t), f"<{int(t)}>") for t in ids)


def is_word_map(path: Optional[str]) -> bool:
    """A ``--tokenizer`` that names a word-map JSON (a Hugging Face ``tokenizer.json`` is not one)."""
    return bool(path) and Path(path).suffix.lower() == ".json" and not Path(path).name.startswith("tokenizer")


def load_tokenizer(path: Optional[str], model_module=None, spec=None, hf_folder: Optional[str] = None):
    """The tokenizer ``--data`` uses: ``--tokenizer PATH`` (a word-map JSON or a Hugging Face
    folder), else the model file's ``tokenize``, else the tokenizer inside a Hugging Face model folder.

    Raises:
        DataError: none of them is there, or the one named cannot be read.
    """
    if path:
        p = Path(path)
        if p.is_file() and is_word_map(path):
            return WordMap(path)
        if p.exists():
            folder = str(p if p.is_dir() else p.parent)
            return HFTokenizer(folder, spec.bos_id, spec.eos_id, spec.pad_id)
        raise DataError(f"--tokenizer {path!r} does not exist; give a word-map JSON or a Hugging Face tokenizer folder")
    fn = getattr(model_module, "tokenize", None) if model_module is not None else None
    if callable(fn):
        where = getattr(model_module, "__file__", None) or getattr(model_module, "__name__", "the model file")
        return FunctionTokenizer(fn, getattr(model_module, "decode", None), Path(where).name)
    if hf_folder and any((Path(hf_folder) / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt")):
        return HFTokenizer(hf_folder, spec.bos_id, spec.eos_id, spec.pad_id)
    raise DataError("--data needs a tokenizer: define tokenize(list_of_str) -> LongTensor in the model file, or pass "
                    "--tokenizer WORDMAP.json or --tokenizer HF_TOKENIZER_FOLDER")

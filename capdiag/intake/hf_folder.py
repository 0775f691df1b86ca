"""``capdiag check FOLDER``: a Hugging Face captioner saved with ``save_pretrained()``, no wrapper.

The folder's ``config.json`` says which model it is: ``vision-encoder-decoder`` (ViT + GPT-2 as
in the vit-gpt2 recipe, or any encoder and decoder), ``blip`` (``BlipForConditionalGeneration``)
or ``git`` (``GitForCausalLM``). ``HFCaptioner`` gives it capdiag's calling convention,
``model(images, captions)`` returning logits ``(B, T, V)``, with the caption ids as each model
takes them (``decoder_input_ids`` for an encoder-decoder, ``input_ids`` for BLIP and GIT; GIT's
image positions are cut off), and ``generate(images, max_len)`` as greedy ``generate``.
The hints come from the folder:

- special ids from the config and ``generation_config.json``: the decoder start token is BOS
  (GPT-2's pad == bos == eos included), BLIP ends captions with [SEP], GIT with its eos;
- image size, mean, std and resizing from ``preprocessor_config.json`` (the image processor), or
  the vision config's image size when there is none;
- the image module (the vision tower), the decoder's cross-attention modules (read with eager
  attention, which returns the weights) and, when ``--data`` is given, the tokenizer saved in the
  folder.

Offline only: weights are read with ``local_files_only=True``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import ModelFileError

KINDS = {
    "vision-encoder-decoder": ("VisionEncoderDecoderModel", "inner.encoder"),
    "blip": ("BlipForConditionalGeneration", "inner.vision_model"),
    "git": ("GitForCausalLM", "inner.git.image_encoder"),
}


def is_hf_folder(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


@contextlib.contextmanager
def quiet():
    """transformers' advice about attention masks is not meant for capdiag's probes (it passes an
    all-ones mask; causal decoders need no more), so its logger is kept at errors during calls."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


class HFCaptioner(nn.Module):
    """capdiag's ``model(images, captions)`` over a Hugging Face captioner (``inner``)."""

    def __init__(self, inner: nn.Module, kind: str):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(captions)
        with quiet():
            if self.kind == "vision-encoder-decoder":
                out = self.inner(pixel_values=images, decoder_input_ids=captions, decoder_attention_mask=mask)
            elif self.kind == "blip":
                out = self.inner(pixel_values=images, input_ids=captions, attention_mask=mask)
            else:  # git: image tokens come first in the sequence; keep the caption positions
                out = self.inner(input_ids=captions, pixel_values=images, attention_mask=mask)
        logits = out.logits
        return logits[:, -captions.shape[1]:] if self.kind == "git" else logits

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_len: int = 20) -> torch.Tensor:
        with quiet():
            return self.inner.generate(pixel_values=images, max_length=max_len, do_sample=False, num_beams=1)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise ModelFileError(f"{path} is not valid JSON; re-save the model with save_pretrained()") from None


def _first(*values):
    return next((v for v in values if v is not None), None)


def folder_hints(folder: str, kind: str, inner: nn.Module) -> tuple:
    """``(CAPDIAG hints, crop)`` read from the folder: special ids, vocabulary, image facts."""
    f = Path(folder)
    cfg, gen = inner.config, _read(f / "generation_config.json")
    proc = _read(f / "preprocessor_config.json")
    if kind == "vision-encoder-decoder":
        text, vision = cfg.decoder, cfg.encoder
        bos = _first(cfg.decoder_start_token_id, gen.get("decoder_start_token_id"), text.bos_token_id)
        eos = _first(gen.get("eos_token_id"), cfg.eos_token_id, text.eos_token_id)
        pad = _first(gen.get("pad_token_id"), cfg.pad_token_id, text.pad_token_id, eos)
    elif kind == "blip":
        text, vision = cfg.text_config, cfg.vision_config
        bos = _first(text.bos_token_id, gen.get("bos_token_id"))
        eos = _first(text.sep_token_id, gen.get("eos_token_id"), text.eos_token_id)  # BLIP's generate stops at [SEP]
        pad = _first(text.pad_token_id, gen.get("pad_token_id"), eos)
    else:
        text, vision = cfg, cfg.vision_config
        bos = _first(gen.get("bos_token_id"), cfg.bos_token_id)
        eos = _first(gen.get("eos_token_id"), cfg.eos_token_id)
        pad = _first(gen.get("pad_token_id"), cfg.pad_token_id, eos)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    missing = [n for n, v in (("BOS (decoder start)", bos), ("EOS", eos)) if v is None]
    if missing:
        raise ModelFileError(f"{folder}: the config sets no {' or '.join(missing)} token id; set it in config.json "
                             "or generation_config.json")
    # Cross-attention over the image tokens (GIT has none: its image tokens share the self-attention).
    cross = [f"inner.{n}" for n, _ in inner.named_modules() if n.endswith("crossattention")
             or n.endswith("crossattention.self")]
    cross = [n for n in cross if f"{n}.self" not in cross]  # BLIP: the .self inside returns the weights
    hints = dict(vocab_size=int(text.vocab_size), bos_id=int(bos), eos_id=int(eos), pad_id=int(pad),
                 image_module=KINDS[kind][1], attention_modules=cross)
    size = proc.get("crop_size") if proc.get("do_center_crop") else proc.get("size")
    if isinstance(size, dict):
        size = _first(size.get("height"), size.get("shortest_edge"), size.get("width"))
    hints["image_size"] = int(_first(size, getattr(vision, "image_size", None), 224))
    if proc.get("image_mean") and proc.get("image_std"):
        hints["image_mean"], hints["image_std"] = tuple(proc["image_mean"]), tuple(proc["image_std"])
    if proc.get("do_rescale") is False:  # the processor feeds raw 0-255 pixels
        hints["pixel_scale"] = 255.0
    return hints, bool(proc.get("do_center_crop", False))


def model_file(folder: str):
    """A ``loading.ModelFile`` for a Hugging Face folder: its factory loads the model and wraps it.

    Raises:
        ModelFileError: transformers missing, or a config of a model capdiag has no adapter for.
    """
    from .modelfile import ModelFile

    try:
        import transformers
    except ImportError:
        raise ModelFileError(f"{folder} is a Hugging Face folder; reading it needs transformers: "
                             "pip install 'capdiag[hf]'") from None
    cfg = _read(Path(folder) / "config.json")
    kind = cfg.get("model_type")
    if kind not in KINDS:
        raise ModelFileError(f"{folder}: config.json has model_type {kind!r}; capdiag reads "
                             f"{', '.join(KINDS)} folders (write a model file with build_model() for others)")
    cls = getattr(transformers, KINDS[kind][0])

    def build_model():
        try:
            with quiet():
                # Eager attention returns the attention weights attention_maps reads (SDPA does
                # not); the same computation, written out.
                inner = cls.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
        except OSError as e:
            raise ModelFileError(f"cannot load {KINDS[kind][0]} from {folder}: {e}".splitlines()[0]) from None
        if kind == "vision-encoder-decoder" and getattr(inner.encoder, "pooler", None) is not None:
            # The encoder's pooler (ViT's, DeiT's, ...) is computed but never read: the decoder
            # cross-attends to the last hidden state. Left in, it is a module without gradient by
            # design of the architecture, not a bug of this model; its weights stay in the folder.
            inner.encoder.pooler = None
        return HFCaptioner(inner, kind).eval()  # as from_pretrained leaves it

    probe = build_model()
    hints, crop = folder_hints(folder, kind, probe.inner)
    # The factory's first result is reused by make_subject instead of loading the weights twice.
    return ModelFile(str(folder), None, build_model, hints, tokenizer_folder=str(folder), crop=crop, built=probe)

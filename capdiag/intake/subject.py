"""Turn a model (built from a model file, or handed over in Python) into a ``Subject``: probe what the
hints leave out (the image size, the vocabulary), take the batch from ``sample_batch()``, the user's
data or capdiag's synthetic captions, and record every assumption made.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..captioner import Captioner, CaptionSpec, align_logits, extract_logits
from ..check import Subject
from ..errors import ModelCallError, UsageError
from ..state import in_mode, preserved_attributes, seeded
from ..usercode import raised_at
from .data import SyntheticCaptions
from .hints import caption_spec, merged
from .modelfile import ModelFile, _file, _first_line, build_model

PROBE_SIZES = (64, 224, 32, 128, 96, 256, 299, 384)
SLOW_FORWARD = 0.25  # seconds for one eval forward of the probe batch above which it is cut ...
SMALL_BATCH = 4  # ... to this many samples


def resolve_device(device: Optional[str]) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but this machine has no usable CUDA GPU; use --device cpu")
    return dev



def call_forward(captioner: Captioner, images, captions, user_file: Optional[str] = None) -> torch.Tensor:
    """Forward once in eval mode with a clear error on failure; returns aligned logits. The model
    keeps no attribute this call sets (a cache of the probe batch)."""
    try:
        with torch.no_grad(), in_mode(captioner.model, False), preserved_attributes(captioner.model):
            out = captioner.call(images, captions)
    except Exception as e:  # noqa: BLE001
        raise ModelCallError(
            f"forward raised {type(e).__name__}: {_first_line(e)} (at {raised_at(e, user_file)})"
        ) from e
    return align_logits(extract_logits(out), captions)



def _validate_batch(batch: Any) -> tuple:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise ModelCallError(f"sample_batch() returned {type(batch).__name__}; expected a tuple (images, captions)")
    images, captions = batch[0], batch[1]
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ModelCallError(f"sample_batch() images are {got}; expected a float tensor (B, 3, H, W)")
    if not isinstance(captions, torch.Tensor) or captions.dim() != 2 or captions.dtype != torch.long:
        got = f"{captions.dtype} {tuple(captions.shape)}" if isinstance(captions, torch.Tensor) else type(captions).__name__
        raise ModelCallError(f"sample_batch() captions are {got}; expected a long tensor (B, T) of token ids")
    if images.shape[0] != captions.shape[0]:
        raise ModelCallError(
            f"sample_batch() gives {images.shape[0]} images but {captions.shape[0]} captions; they must match"
        )
    if captions.shape[1] < 3:
        raise ModelCallError("sample_batch() captions must have at least 3 tokens (BOS, a word, EOS)")
    return images, captions



def make_subject(
    mf: ModelFile,
    model: Optional[nn.Module] = None,
    device: Optional[str] = None,
    seed: int = 0,
    batch_size: int = 8,
    model_kwargs: Optional[dict] = None,
    progress: bool = False,
    dtype: Optional[torch.dtype] = None,
    weights: Optional[str] = None,
    data: Optional[str] = None,
    tokenizer: Optional[str] = None,
) -> Subject:
    """Build the model of a model file (unless given), load ``weights`` (a checkpoint) into it when
    given, and make its ``Subject``; with ``data`` (``--data``) its batch comes from the user's
    captions and images, tokenized by ``tokenizer`` (``--tokenizer``) or the file's ``tokenize``.

    Raises:
        ModelCallError / UsageError: the model cannot be built or called as the contract says.
        WeightsError / CheckpointMismatch: the checkpoint cannot be read / does not fit the model.
        DataError: the data or tokenizer cannot be read, or the tokenizer does not fit the model.
    """
    from .checkpoints import load_checkpoint
    from ..errors import DataError

    dataset, hints = None, dict(mf.hints)
    if tokenizer is not None and data is None:
        raise UsageError("--tokenizer is used with --data; add --data PATH (captions and images)")
    if data is not None:
        from .tokenizers import WordMap, is_word_map, load_tokenizer
        from .userdata import read_captions

        dataset = read_captions(data)
        dataset.crop = mf.crop
        word_map = WordMap(tokenizer) if is_word_map(tokenizer) else None
        if word_map is not None:  # the word map fixes the special ids; hints that disagree are a mistake
            for key, value in word_map.special_ids.items():
                if key in hints and hints[key] != value:
                    raise DataError(f"word map {tokenizer} has {WordMap.SPECIALS[key]} = {value} but CAPDIAG {key} = "
                                    f"{hints[key]}; fix the hint or pass the word map the model was trained with")
                hints[key] = value

    loaded = None
    if model is None:
        dev = resolve_device(device)
        if mf.built is not None and not model_kwargs:
            model, mf.built = mf.built, None
        else:
            with seeded(seed):
                model = build_model(mf, model_kwargs)
        if weights is not None:
            loaded = load_checkpoint(model, weights)
        model.to(dev)  # capdiag built this model, so moving it (and casting it) is ours to do
        if dtype is not None:
            model.to(dtype)
    make_tokenizer = None
    if dataset is not None:
        make_tokenizer = (lambda spec: word_map) if word_map is not None else \
            (lambda spec: load_tokenizer(tokenizer, mf.module, spec, mf.tokenizer_folder))
    s = subject_from_model(model, hints, name=mf.name, sample_batch=None if dataset is not None else mf.sample_batch,
                           loss_fn=mf.loss_fn, bleu_fn=mf.bleu_fn, user_file=_file(mf), seed=seed,
                           batch_size=batch_size, progress=progress, where=f"CAPDIAG in {mf.path}",
                           dataset=dataset, tokenizer=make_tokenizer)
    s.rebuild = lambda: mf.factory(**(model_kwargs or {}))
    s.weights = loaded
    return s


def subject_from_model(
    model: nn.Module,
    hints: Optional[dict] = None,
    *,
    name: str = "model",
    sample_batch: Optional[Callable] = None,
    loss_fn: Optional[Callable] = None,
    bleu_fn: Optional[Callable] = None,
    user_file: Optional[str] = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    where: str = "the hints",
    dataset=None,
    tokenizer=None,
) -> Subject:
    """Probe what the hints leave out and assemble a ``Subject`` for a model on its own device.

    The model's own ``capdiag_hints``, ``loss_fn`` and ``bleu_fn`` refine the given ones (bug
    twins, configs). A ``sample_batch`` gives the batch; else a ``dataset`` (the user's captions
    and images, ``userdata.CaptionData``) with ``tokenizer(spec)`` making its tokenizer once the
    special ids are known; else a synthetic batch is made from the hints (the image size probed
    when not hinted).
    """
    h = merged(hints, getattr(model, "capdiag_hints", None))
    spec = caption_spec(h, model, where)
    assumptions = spec.assumptions
    dev = next(iter(model.parameters()), torch.empty(0)).device
    cap = Captioner(model, spec, loss_fn=_callable(model, "loss_fn") or loss_fn, name=name,
                    bleu_fn=_callable(model, "bleu_fn") or bleu_fn, stateless=True)
    data = None

    if sample_batch is not None:
        try:
            with seeded(seed):
                batch = sample_batch()
        except Exception as e:  # noqa: BLE001
            raise ModelCallError(f"sample_batch() raised {type(e).__name__}: {_first_line(e)} (at {raised_at(e, user_file)})") from e
        images, captions = _validate_batch(batch)
        images, captions = cap.to_inputs(images, captions)
        spec.image_size = int(images.shape[-1])
        logits = call_forward(cap, images, captions, user_file)
        _check_vocab(spec, logits, assumptions)
        if "max_len" not in h:
            spec.max_len = int(captions.shape[1]) + 4
        try:
            data = SyntheticCaptions.for_spec(spec)
        except UsageError:
            data = None
    else:
        logits = _probe_image_size(cap, spec, "image_size" in h, dev, user_file)
        _check_vocab(spec, logits, assumptions)
        if dataset is not None:
            images, captions = _data_batch(cap, spec, dataset, tokenizer, seed, batch_size, "max_len" in h)
            try:
                data = SyntheticCaptions.for_spec(spec)  # fitted copies of an untrained model still learn shapes
            except UsageError:
                data = None
        else:
            data = SyntheticCaptions.for_spec(spec)
            images, captions = data.batch(batch_size, seed=seed, balanced=True)
            images, captions = cap.to_inputs(images, captions)
        # The probe used tiny inputs; make sure the real batch goes through too.
        started = time.perf_counter()
        call_forward(cap, images, captions, user_file)
        took = time.perf_counter() - started
        if took > SLOW_FORWARD and images.shape[0] > SMALL_BATCH:
            # Every probe costs a few forwards of this batch: a model this slow gets the smallest batch
            # the checks need (two samples to mix, one more to move), and says so.
            assumptions.append(f"probe batch of {SMALL_BATCH} images, not {images.shape[0]}: a forward of "
                               f"{images.shape[0]} takes {took:.2f} s here")
            images, captions = images[:SMALL_BATCH], captions[:SMALL_BATCH]
        if "max_len" not in h:
            spec.max_len = captions.shape[1] + 4
    source = "user" if sample_batch is not None or dataset is not None else "synthetic"
    s = Subject(cap, images, captions, data=data, seed=seed, progress=progress, batch_source=source)
    s.dataset = dataset
    return s


def logits_of(cap: Captioner, spec: CaptionSpec, dev, user_file: Optional[str]) -> torch.Tensor:
    """Logits of a two-caption probe on zero images of the spec's size (the vocabulary's width)."""
    probe_caps = torch.tensor([[spec.bos_id, 3, 4, spec.eos_id]] * 2, device=dev)
    imgs = torch.zeros(2, 3, spec.image_size, spec.image_size, device=dev, dtype=cap.dtype)
    return call_forward(cap, imgs, probe_caps, user_file)



def _probe_image_size(cap: Captioner, spec: CaptionSpec, hinted: bool, dev, user_file: Optional[str]) -> torch.Tensor:
    """Set ``spec.image_size`` to the first size the model accepts (the hinted one only, when
    hinted); returns that probe's logits."""
    sizes = (spec.image_size,) if hinted else PROBE_SIZES
    first_err = None
    for size in sizes:
        spec.image_size = size
        try:
            logits = logits_of(cap, spec, dev, user_file)
            break
        except ModelCallError as e:
            first_err = first_err or e
    else:
        tried = ", ".join(map(str, sizes))
        raise ModelCallError(f"{first_err} [tried image sizes {tried}; set CAPDIAG['image_size']]") from first_err
    if not hinted:
        spec.assumptions.append(f"image_size = {spec.image_size} (probed; set CAPDIAG['image_size'])")
    return logits



def _data_batch(cap: Captioner, spec: CaptionSpec, dataset, tokenizer, seed: int, n: int, max_len_hinted: bool):
    """The probe batch drawn from the user's data (``--data``), on the model's device."""
    from .userdata import Preprocess

    dataset.tokenizer = tokenizer(spec)
    if dataset.preprocess is None:
        dataset.preprocess = Preprocess(spec.image_size, spec.image_mean, spec.image_std, spec.pixel_scale, dataset.crop)
    images, captions, _ = dataset.batch(n, seed, spec.max_len if max_len_hinted else None)
    check_token_ids(captions, spec, dataset.tokenizer.name)
    return cap.to_inputs(images, captions)



def check_token_ids(captions: torch.Tensor, spec: CaptionSpec, tokenizer: str) -> None:
    """Tokenized captions must index the model's vocabulary (a wrong tokenizer is bad input)."""
    from ..errors import DataError

    top = int(captions.max())
    if top >= spec.vocab_size or int(captions.min()) < 0:
        raise DataError(f"{tokenizer} produced token id {top} but the model's vocabulary has {spec.vocab_size} "
                        "tokens; pass the tokenizer the model was trained with")



def _callable(model: nn.Module, name: str):
    fn = getattr(model, name, None)
    return fn if callable(fn) and not isinstance(fn, nn.Module) else None



def _check_vocab(spec: CaptionSpec, logits: torch.Tensor, assumptions: list) -> None:
    V = int(logits.shape[-1])
    if spec.vocab_size and spec.vocab_size != V:
        raise ModelCallError(
            f"model returned logits over {V} tokens but CAPDIAG['vocab_size'] is {spec.vocab_size}; "
            "fix the hint or the output layer"
        )
    if not spec.vocab_size:
        spec.vocab_size = V
        assumptions.append(f"vocab_size = {V} (read from the logits)")
    for key in ("pad_id", "bos_id", "eos_id"):
        if not 0 <= getattr(spec, key) < V:
            raise UsageError(f"CAPDIAG[{key!r}] = {getattr(spec, key)} is outside the vocabulary [0, {V})")

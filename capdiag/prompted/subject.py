"""The prompted-captioner subject: a vision-language model, its processor and family, and one batch as the
family's processor writes it (``pixel_values`` and the family's extras, ``input_ids`` with the image
placeholders, ``attention_mask``, ``labels`` with -100), split into each row's prompt and caption.

The batch comes from the user's own collator where there is one (a model file's ``collate(examples)`` or
``sample_batch()``): that collator is what label_sanity and image_ablation judge. Else capdiag's reference
collator writes it from ``--data`` (the user's captions and images) or from synthetic shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch

from ..errors import ModelCallError, UsageError
from .batches import Split, check_prompt, prompt_text, reference_batch
from .families import Family
from .folder import base_model, image_token_id, processor_mismatch

SOURCES = {"capdiag": "capdiag's own collator on synthetic shapes", "data": "capdiag's own collator on --data",
           "collate": "your collate()", "sample_batch": "your sample_batch()", "probe": "your probe batch"}


@dataclass
class PromptedSubject:
    """A prompted captioner and one batch of it. ``source`` says whose collator wrote the batch (``SOURCES``);
    ``measured`` caches pure functions of (model, batch, seed) as ``check.Subject.measured`` does."""

    kind: ClassVar[str] = "prompted"
    model: torch.nn.Module
    processor: Any
    family: Family
    batch: dict
    prompt: str  # the prompt text before each caption, image token included
    prompt_len: Split  # its tokens as the processor writes them (image placeholders expanded), and the pad id
    source: str
    path: str
    seed: int = 0
    progress: bool = False
    live: bool = False
    adapter: Optional[str] = None
    weights: Optional[str] = None
    dataset: Any = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def base(self) -> torch.nn.Module:
        return base_model(self.model)

    @property
    def name(self) -> str:
        return f"{self.family.name} ({self.path})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return image_token_id(self.model)

    @property
    def assumptions(self) -> list:
        side = self.tokenizer.padding_side
        n = self.prompt_len.tokens
        n = n if isinstance(n, int) else "/".join(map(str, n))
        out = [f"{self.family.name}: prompt {self.prompt!r} ({n} tokens with the image's), "
               f"batch from {SOURCES[self.source]}, {self.batch['input_ids'].shape[0]} rows, padded on the {side}"]
        if self.adapter:
            out.append(f"LoRA adapter {self.adapter}")
        return out

    @property
    def start_id(self) -> Optional[int]:
        """An encoder-decoder's decoder start token as training uses it (None for decoder-only models)."""
        if not self.family.encoder_decoder:
            return None
        cfg = self.base.config
        got = getattr(getattr(cfg, "text_config", cfg), "decoder_start_token_id", None)
        return getattr(cfg, "decoder_start_token_id", None) if got is None else got

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)

    def measured(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def synthetic_examples(n: int, seed: int, size: int = 32) -> list:
    """``n`` examples of capdiag's synthetic shapes: ``{"image": PIL RGB image, "caption": str}``, as a
    Hugging Face dataset of images and captions yields them."""
    from PIL import Image

    from ..intake.data import SyntheticCaptions, caption_texts

    data = SyntheticCaptions(vocab_size=64, image_size=size)
    rng = np.random.default_rng(seed + 1)
    samples = data.samples(n, seed, balanced=True)
    return [{"image": Image.fromarray((np.clip(data.render(s, rng), 0, 1) * 255).astype(np.uint8)),
             "caption": caption_texts(s)[0]} for s in samples]


def data_examples(dataset, n: int, seed: int) -> list:
    """``n`` examples drawn from the user's ``--data``, each one of its image's captions."""
    from PIL import Image

    rng = np.random.default_rng(seed + 1)
    out = []
    for it in dataset.draw(n, seed):
        with Image.open(it.image) as im:
            out.append({"image": im.convert("RGB"), "caption": it.captions[int(rng.integers(len(it.captions)))]})
    return out


def make_prompted_subject(model, processor, family: Family, path: str, *, prompt: Optional[str] = None,
                          collate: Optional[Callable] = None, sample_batch: Optional[Callable] = None,
                          data: Optional[str] = None, seed: int = 0, batch_size: int = 4, adapter: Optional[str] = None,
                          device: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> PromptedSubject:
    """The subject of ``model``: its batch from ``sample_batch()``, else ``collate(examples)``, else capdiag's
    reference collator, over ``--data`` examples or synthetic shapes.

    Raises:
        UsageError / ModelFileError: the processor disagrees with the model, the batch does not begin each
        row with the prompt, or is not the dict the family's processor writes.
    """
    dataset = None
    if data is not None:
        from ..intake.userdata import read_captions

        dataset = read_captions(data)
        examples = data_examples(dataset, batch_size, seed)
    else:
        examples = synthetic_examples(batch_size, seed)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    text = prompt_text(family, processor, prompt)
    try:
        said = processor_mismatch(model, processor, examples[0]["image"], text)
        if said:
            raise UsageError(f"{path}: {said}")
        if sample_batch is not None:
            batch, source = _called(sample_batch, "sample_batch()"), "sample_batch"
        elif collate is not None:
            batch, source = _called(collate, "collate(examples)", examples), "collate"
        else:
            batch = reference_batch(processor, examples, text, family.suffix, family.encoder_decoder)
            source = "data" if dataset is not None else "capdiag"
        batch = _checked(dict(batch), f"from {SOURCES[source]}")
        n = _prompt_split(processor, batch, examples[0]["image"], text, f"from {SOURCES[source]}", image_token_id(model))
        n = n._replace(decoder=family.encoder_decoder)
    except ValueError as e:  # the family's processor refuses the prompt (no image token where it needs one, ...)
        raise UsageError(f"{path}: the processor refuses the prompt {text!r}: {str(e).strip().splitlines()[0]}; "
                         "pass --prompt with {image} where the image goes (or PROMPT in the model file)") from None
    subject = PromptedSubject(model, processor, family, batch, text, n, source, path, seed=seed, adapter=adapter,
                              dataset=dataset)
    subject.batch = subject.to_device(batch)
    return warmed(subject)


def warmed(subject: PromptedSubject) -> PromptedSubject:
    """Run the subject's forward once before any check does, in eval mode with the RNG restored.

    transformers 5 installs its output-capturing hooks on a model's first forward and marks the model with an
    attribute. Inside a check, ``preserved_state`` takes both away again afterwards, so every check would
    install them anew; run once here, as the user's own first call would, they are set up for good. It
    changes no weight, buffer, mode or RNG."""
    from ..state import in_mode, preserved_rng
    from .probes import inputs_of

    with torch.no_grad(), preserved_rng(), in_mode(subject.model, False):
        try:
            subject.model(**inputs_of(subject.batch, subject.prompt_len))
        except Exception:  # noqa: BLE001 - a batch the model refuses is for the checks to report, with its line
            pass
    return subject


def _prompt_split(processor, batch: dict, image, text: str, where: str, image_id: int) -> Split:
    """Where each row's prompt ends: the prompt as the processor writes it with an image, its run of image
    placeholders as long as the row's own (Qwen2-VL writes one per merged patch: images of other sizes get
    other counts), checked against every row; for a batch without ``pixel_values`` (a collator that dropped
    the image), the prompt as the tokenizer writes the text alone."""
    pad = processor.tokenizer.pad_token_id
    with_image = processor(images=[[image]], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    if "pixel_values" in batch:
        rows = [_with_run(with_image, image_id, int((batch["input_ids"][r] == image_id).sum()))
                for r in range(batch["input_ids"].shape[0])]
        for r, ids in enumerate(rows):
            check_prompt({k: batch[k][r:r + 1] for k in ("input_ids", "attention_mask")}, ids, f"{where} (row {r})", pad)
        lengths = tuple(len(ids) for ids in rows)
        return Split(lengths[0] if len(set(lengths)) == 1 else lengths, pad)
    alone = processor.tokenizer(text)["input_ids"]
    for ids in (alone, with_image):
        try:
            check_prompt(batch, ids, where, pad)
            return Split(len(ids), pad)
        except UsageError:
            pass
    check_prompt(batch, alone, where, pad)  # raises, naming the row
    return Split(len(alone), pad)


def _with_run(ids: list, image_id: int, n: int) -> list:
    """``ids`` with its one run of image placeholders made ``n`` long (unchanged when it has no single run)."""
    at = [i for i, t in enumerate(ids) if t == image_id]
    if not at or at != list(range(at[0], at[-1] + 1)) or n == 0:
        return ids
    return ids[:at[0]] + [image_id] * n + ids[at[-1] + 1:]


def subject_from_batch(model, processor, batch: dict, prompt: Optional[str] = None, *, live: bool = False,
                       path: str = "probe batch") -> PromptedSubject:
    """A subject over a batch the user's collator wrote (the training monitor's probe batch): the prompt's
    split is measured against the rows with a blank image of the processor's making."""
    from PIL import Image

    from .families import family_of, supported

    family = family_of(getattr(base_model(model).config, "model_type", None))
    if family is None:
        raise UsageError(f"{type(base_model(model)).__name__} is not a vision-language captioner capdiag reads "
                         f"({supported()})")
    text = prompt_text(family, processor, prompt)
    batch = _checked(dict(batch), "given")
    split = _prompt_split(processor, batch, Image.new("RGB", (64, 64)), text, "given", image_token_id(model))
    split = split._replace(decoder=family.encoder_decoder)
    return warmed(PromptedSubject(model, processor, family, batch, text, split, "probe", path, live=live))


def _called(fn: Callable, what: str, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the user's collator raised: one line naming it
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelCallError(f"{what} raised {type(e).__name__}: {msg}") from e


def _checked(batch: dict, where: str) -> dict:
    missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in batch]
    if missing:
        raise UsageError(f"the batch {where} has no {', '.join(missing)}; return the processor's dict with "
                         "labels (-100 where the loss must not look)")
    if batch["input_ids"].shape[0] < 2:
        raise UsageError(f"the batch {where} has {batch['input_ids'].shape[0]} row; capdiag needs at least 2 "
                         "(images are swapped between rows)")
    return batch

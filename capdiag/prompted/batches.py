"""Batches of a prompted captioner: capdiag's own captioning collator (the reference a user's is judged
against), where each row's prompt ends and its caption starts, and the batch with its images moved between
rows or its prompt replaced, for the ablations.

Layout of a decoder-only row: ``[padding] prompt (image placeholders expanded) caption EOS [padding]``;
padding on either side. Labels are the input ids on the caption and its EOS, -100 elsewhere; the model
shifts them itself.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ..errors import UsageError

IGNORE = -100
PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes", "pixel_mask")
TEXT_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")


def prompt_text(family, processor, prompt: Optional[str]) -> str:
    """The prompt as written before each caption: ``prompt`` (``--prompt``, ``PROMPT``) or the family's
    default, with ``{image}`` standing for the processor's image token."""
    token = processor.image_token
    return (family.prompt if prompt is None else prompt).replace("{image}", str(getattr(token, "content", token)))


def reference_batch(processor, examples: list, prompt: str, suffix: bool = False, encoder_decoder: bool = False) -> dict:
    """capdiag's captioning collator: ``examples`` are ``{"image", "caption"}`` dicts; prompt, image and
    padding positions are -100 in the labels, the caption and its EOS are targets. ``suffix``: the processor
    takes the caption as ``suffix=`` (PaliGemma) and appends its EOS; ``encoder_decoder``: the prompt goes to
    the encoder and the labels are the caption alone (Florence-2)."""
    tok = processor.tokenizer
    images = [e["image"] for e in examples]
    if encoder_decoder:  # the prompt is the encoder's; the labels are the caption as the tokenizer writes it
        batch = dict(processor(images=[[im] for im in images], text=[prompt] * len(examples), return_tensors="pt",
                               padding=True))
        caps = tok([e["caption"] for e in examples], return_tensors="pt", padding=True)
        batch["labels"] = caps["input_ids"].masked_fill(caps["attention_mask"] == 0, IGNORE)
        return batch
    if suffix:
        batch = dict(processor(images=[[im] for im in images], text=[prompt] * len(examples), suffix=[e["caption"] for e in examples],
                               return_tensors="pt", padding=True))
    else:
        batch = dict(processor(images=[[im] for im in images], text=[f"{prompt} {e['caption']}{tok.eos_token}".lstrip() for e in examples],
                               return_tensors="pt", padding=True))
    lengths = tuple(prompt_length(processor, im, prompt) for im in images)  # images of other sizes: other counts
    n = Split(lengths[0] if len(set(lengths)) == 1 else lengths, tok.pad_token_id)
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for r, sp in enumerate(spans(batch, n)):
        labels[r, sp.caption] = batch["input_ids"][r, sp.caption]
    batch["labels"] = labels
    return batch


def prompt_length(processor, image, prompt: str) -> int:
    """Tokens of the prompt as the processor writes it before a caption (image placeholders expanded)."""
    return len(processor(images=[[image]], text=[prompt], return_tensors="pt")["input_ids"][0])


class Split(NamedTuple):
    """Where each row's prompt ends: after ``tokens`` tokens of the row (its image placeholders expanded),
    padding skipped. Padding is the attention-mask-0 positions holding ``pad_id`` (any attention-mask-0
    position when None): a collator may mask other positions too, and BLIP-2's processor puts the padding
    between the image tokens and the text."""

    tokens: Union[int, tuple]  # one length for every row, or one per row (images of different sizes)
    pad_id: Optional[int] = None
    decoder: bool = False  # encoder-decoder: input_ids hold the prompt alone, the caption is the labels

    def of(self, row: int) -> int:
        return self.tokens if isinstance(self.tokens, int) else self.tokens[row]


class Span(NamedTuple):
    prompt: torch.Tensor  # positions of the row's prompt
    caption: torch.Tensor  # positions of its caption (EOS included), padding skipped


def spans(batch: dict, split) -> list:
    """Per row, a ``Span``: the row's first ``split.tokens`` positions that are not padding are the prompt,
    the rest up to the last attended position the caption. ``split`` is a ``Split`` or the prompt's length."""
    split = split if isinstance(split, Split) else Split(int(split))
    mask, ids = batch["attention_mask"], batch["input_ids"]
    padding = (mask == 0) if split.pad_id is None else (mask == 0) & (ids == split.pad_id)
    out = []
    for r in range(ids.shape[0]):
        last = int(mask[r].nonzero().flatten()[-1])
        content = (~padding[r, : last + 1]).nonzero().flatten()
        n = len(content) if split.decoder else split.of(r)
        out.append(Span(content[:n], content[n:]))
    return out


def caption_mask(batch: dict, prompt_len) -> torch.Tensor:
    """``(B, T)`` True on each row's caption tokens (its EOS included); encoder-decoder: on the labels'
    positions that hold a token (not -100, not the pad id)."""
    if isinstance(prompt_len, Split) and prompt_len.decoder:
        labels = batch["labels"]
        return (labels != IGNORE) & (labels != prompt_len.pad_id)
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for r, sp in enumerate(spans(batch, prompt_len)):
        mask[r, sp.caption] = True
    return mask


def check_prompt(batch: dict, prompt_ids: list, where: str, pad_id: Optional[int] = None) -> None:
    """Each row of ``batch`` must begin (after padding) with ``prompt_ids``: else capdiag would split prompt
    from caption in the wrong place, and every measurement after would be wrong."""
    n = len(prompt_ids)
    for r, sp in enumerate(spans(batch, Split(n, pad_id))):
        row = batch["input_ids"][r, sp.prompt].tolist()
        if row != prompt_ids:
            raise UsageError(f"row {r} of the batch {where} does not begin with the prompt's {n} tokens; pass the "
                             "prompt your collator writes with --prompt (or PROMPT = '...' in the model file)")


def pixel_inputs(batch: dict) -> dict:
    """The image side of a batch (``pixel_values`` and the family's extras)."""
    return {k: v for k, v in batch.items() if k in PIXEL_KEYS}


def per_image(batch: dict) -> list:
    """The pixel inputs of each image: rows of patches split by ``image_grid_thw`` (Qwen2-VL), else the
    leading dimension of ``pixel_values``."""
    px = batch["pixel_values"]
    if "image_grid_thw" in batch:
        sizes = [int(t * h * w) for t, h, w in batch["image_grid_thw"].tolist()]
        return [{"pixel_values": p, "image_grid_thw": g[None]}
                for p, g in zip(px.split(sizes), batch["image_grid_thw"])]
    extras = {k: v for k, v in pixel_inputs(batch).items() if k != "pixel_values" and torch.is_tensor(v)}
    return [{"pixel_values": px[i:i + 1], **{k: v[i:i + 1] for k, v in extras.items()}} for i in range(px.shape[0])]


def join_images(parts: list) -> dict:
    if "image_grid_thw" in parts[0]:
        return {"pixel_values": torch.cat([p["pixel_values"] for p in parts]),
                "image_grid_thw": torch.cat([p["image_grid_thw"] for p in parts])}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def swapped_images(batch: dict) -> Optional[dict]:
    """The batch with each row's image taken from the next row of the same shape (a derangement within each
    group of equal shapes), or None when no row has a partner."""
    parts = per_image(batch)
    shapes = [tuple(p["pixel_values"].shape) + tuple(p.get("image_grid_thw", torch.zeros(0)).flatten().tolist())
              for p in parts]
    order = list(range(len(parts)))
    for shape in set(shapes):
        rows = [i for i, s in enumerate(shapes) if s == shape]
        for a, b in zip(rows, rows[1:] + rows[:1]):
            order[a] = b
    if order == list(range(len(parts))):
        return None
    return {**batch, **join_images([parts[i] for i in order])}


def prompt_replaced(batch: dict, prompt_len: int, keep: set, vocab: list) -> dict:
    """The batch with every prompt token not in ``keep`` (image placeholders, special tokens) replaced by
    another token of ``vocab`` (the next one, cyclically): the same length, the same image positions."""
    ids = batch["input_ids"].clone()
    nxt = {v: vocab[(i + 1) % len(vocab)] for i, v in enumerate(vocab)}
    for r, sp in enumerate(spans(batch, prompt_len)):
        for t in sp.prompt.tolist():
            tid = int(ids[r, t])
            if tid not in keep:
                ids[r, t] = nxt.get(tid, vocab[0])
    return {**batch, "input_ids": ids}

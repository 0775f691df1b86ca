"""Batches of a prompted captioner: capdiag's own captioning collator (the reference a user's is judged
against), where each row's prompt ends and its caption starts, the prompts alone for ``generate``, and the
batch with its images moved between rows or its prompt replaced, for the ablations.

Layout of a decoder-only row: ``[padding] prompt (image placeholders expanded) caption EOS [padding]``;
padding on either side. Labels are the input ids on the caption and its EOS, -100 elsewhere; the model
shifts them itself.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import UsageError

IGNORE = -100
PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes", "pixel_mask")
TEXT_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")


def prompt_text(family, processor, prompt: Optional[str]) -> str:
    """The prompt as written before each caption: ``prompt`` (``--prompt``, ``PROMPT``) or the family's
    default, with ``{image}`` standing for the processor's image token."""
    return (prompt or family.prompt).replace("{image}", processor.image_token)


def reference_batch(processor, examples: list, prompt: str, suffix: bool = False) -> dict:
    """capdiag's captioning collator: ``examples`` are ``{"image", "caption"}`` dicts; prompt, image and
    padding positions are -100 in the labels, the caption and its EOS are targets. ``suffix``: the processor
    takes the caption as ``suffix=`` (PaliGemma) and appends its EOS."""
    tok = processor.tokenizer
    images = [e["image"] for e in examples]
    if suffix:
        batch = dict(processor(images=images, text=[prompt] * len(examples), suffix=[e["caption"] for e in examples],
                               return_tensors="pt", padding=True))
    else:
        batch = dict(processor(images=images, text=[f"{prompt} {e['caption']}{tok.eos_token}" for e in examples],
                               return_tensors="pt", padding=True))
    n = prompt_length(processor, images[0], prompt)
    labels = batch["input_ids"].clone()
    for r, (first, start, end) in enumerate(spans(batch["attention_mask"], n)):
        labels[r, :start] = IGNORE
        labels[r, end:] = IGNORE
    batch["labels"] = labels
    return batch


def prompt_length(processor, image, prompt: str) -> int:
    """Tokens of the prompt as the processor writes it before a caption (image placeholders expanded)."""
    return len(processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"][0])


def spans(attention_mask: torch.Tensor, prompt_len: int) -> list:
    """Per row, ``(prompt start, caption start, end)``: the prompt starts at the first attended position,
    the caption ``prompt_len`` tokens later and runs to the last attended position."""
    out = []
    for row in attention_mask:
        on = row.nonzero().flatten()
        first, last = int(on[0]), int(on[-1])
        out.append((first, first + prompt_len, last + 1))
    return out


def caption_mask(batch: dict, prompt_len: int) -> torch.Tensor:
    """``(B, T)`` True on each row's caption tokens (its EOS included)."""
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for r, (_, start, end) in enumerate(spans(batch["attention_mask"], prompt_len)):
        mask[r, start:end] = True
    return mask


def check_prompt(batch: dict, prompt_ids: list, where: str) -> None:
    """Each row of ``batch`` must begin (after padding) with ``prompt_ids``: else capdiag would split prompt
    from caption in the wrong place, and every measurement after would be wrong."""
    n = len(prompt_ids)
    for r, (first, start, end) in enumerate(spans(batch["attention_mask"], n)):
        row = batch["input_ids"][r, first:start].tolist()
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
    for r, (first, start, _) in enumerate(spans(batch["attention_mask"], prompt_len)):
        for t in range(first, start):
            tid = int(ids[r, t])
            if tid not in keep:
                ids[r, t] = nxt.get(tid, vocab[0])
    return {**batch, "input_ids": ids}


def prompts_only(batch: dict, prompt_len: int, side: str, pad_id: int) -> dict:
    """The prompts of ``batch`` alone (captions cut off), re-padded on ``side``, with the batch's images:
    what a user hands ``generate``."""
    rows = [batch["input_ids"][r, first:start] for r, (first, start, _) in
            enumerate(spans(batch["attention_mask"], prompt_len))]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=batch["input_ids"].dtype)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[r, sl], mask[r, sl] = row, 1
    return {**pixel_inputs(batch), "input_ids": ids, "attention_mask": mask}


def row(batch: dict, r: int, prompt_len: int) -> dict:
    """Row ``r``'s prompt alone, unpadded, with its image."""
    first, start, _ = spans(batch["attention_mask"], prompt_len)[r]
    ids = batch["input_ids"][r:r + 1, first:start]
    return {**per_image(batch)[r], "input_ids": ids, "attention_mask": torch.ones_like(ids)}

"""Batched generation of a prompted captioner against each prompt alone, padded as the processor pads.

A decoder-only model continues each row from its last position: prompts padded on the right put pad tokens
between a short prompt and its caption, and the batched captions of the short rows are garbage. The probe
writes prompts of different lengths (the batch's prompt, with 0, 1, 2, ... extra words), pads them on the
processor's side and compares each row's greedy caption and first-step logits with the same prompt
generated alone. A flip where both paths' log-probabilities agree to rounding (a near tie) is not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batches import per_image, pixel_inputs, spans
from .folder import base_model

SUFFIX = " in a few words the image shows"


@dataclass
class Batched:
    side: str
    rows: int
    changed: int  # rows whose batched greedy caption differs from the alone one (near ties left out)
    near_ties: int  # rows that differ only after a near tie
    first_step: float  # max |difference| of the first generated step's log-probabilities, batched vs alone
    floor: float  # float rounding at the logits' scale
    examples: list  # (alone, batched) captions of changed rows, as text


def _prompts(batch: dict, prompt_len: int, tokenizer, extra: bool = True) -> list:
    extra = tokenizer(SUFFIX, add_special_tokens=False)["input_ids"] if extra else []
    out = []
    for r, sp in enumerate(spans(batch, prompt_len)):
        out.append(torch.cat([batch["input_ids"][r, sp.prompt], torch.tensor(extra[:r], dtype=torch.long,
                                                                                 device=batch["input_ids"].device)]))
    return out


def _padded(rows: list, side: str, pad_id: int) -> tuple:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, sl], mask[i, sl] = row, 1
    return ids, mask


@torch.no_grad()
def _generate(model, inputs: dict, steps: int, pad_id: int, eos_id):
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=pad_id)
    # decoder-only: the prompt, then the new tokens; encoder-decoder: the decoder start token, then the new tokens
    start = 1 if getattr(base_model(model).config, "is_encoder_decoder", False) else inputs["input_ids"].shape[1]
    return out.sequences[:, start:], torch.stack([s.float() for s in out.logits], 1).log_softmax(-1)


@dataclass
class StartToken:
    train: int  # the decoder start token training shifts the labels behind (the model's config)
    generate: int  # the one generate() starts from (generation_config.json)
    gap: float  # max |difference| of the first step's log-probabilities, generate() vs the teacher-forced forward
    floor: float


@torch.no_grad()
def start_token_gap(model, batch: dict, split, tokenizer) -> StartToken:
    """An encoder-decoder's first generated step against the forward that training runs (its decoder fed
    the start token the labels are shifted behind), on the batch's prompts and images."""
    inner = base_model(model)
    text = getattr(inner.config, "text_config", inner.config)
    train = getattr(text, "decoder_start_token_id", None)
    train = getattr(inner.config, "decoder_start_token_id", None) if train is None else train
    gen = inner.generation_config.decoder_start_token_id
    gen = train if gen is None else gen
    pad = tokenizer.pad_token_id
    ids, mask = _padded(_prompts(batch, split, tokenizer, extra=False), "right", pad)
    inputs = {**pixel_inputs(batch), "input_ids": ids, "attention_mask": mask}
    _, lp = _generate(model, inputs, 1, pad, tokenizer.eos_token_id)
    start = torch.full((ids.shape[0], 1), int(train), dtype=torch.long, device=ids.device)
    forward = model(**inputs, decoder_input_ids=start).logits[:, 0].float().log_softmax(-1)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    floor = max(1024 * torch.finfo(torch.float32).eps, 8 * torch.finfo(dtype).eps) * (1.0 + float(forward.abs().max()))
    return StartToken(int(train), int(gen), float((lp[:, 0] - forward).abs().max()), floor)


def batched_vs_alone(model, batch: dict, prompt_len: int, tokenizer, side: str, steps: int = 5) -> Batched:
    """See the module doc. ``side`` is the padding side the user's processor uses for generation."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = _prompts(batch, prompt_len, tokenizer)
    images = per_image(batch)
    ids, mask = _padded(rows, side, pad)
    together, lp_together = _generate(model, {**pixel_inputs(batch), "input_ids": ids, "attention_mask": mask}, steps, pad,
                                      tokenizer.eos_token_id)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    changed, ties, first, scale, shown = 0, 0, 0.0, 0.0, []
    alone_all = []
    for r, row in enumerate(rows):
        alone, lp = _generate(model, {**images[r], "input_ids": row[None], "attention_mask": torch.ones_like(row)[None]},
                              steps, pad, tokenizer.eos_token_id)
        alone_all.append((alone[0], lp[0]))
        scale = max(scale, float(lp[0].abs().max()))
        first = max(first, float((lp[0, 0] - lp_together[r, 0]).abs().max()))
    # A batch of rows of different lengths sums attention in another order than one row alone: a few
    # hundred eps at the logits' scale (float32: ~1e-5 on logits of 10), far under a pad token read as input.
    floor = max(1024 * torch.finfo(torch.float32).eps, 8 * torch.finfo(dtype).eps) * (1.0 + scale)
    for r, (alone, lp) in enumerate(alone_all):
        diff = (alone != together[r]).nonzero().flatten()
        if len(diff) == 0:
            continue
        k = int(diff[0])  # the same tokens before k: the logits at k must agree unless the padding changed them
        if float((lp[k] - lp_together[r, k]).abs().max()) <= floor:
            ties += 1  # the logits agree to rounding: the tokens flipped on a near tie
            continue
        changed += 1
        shown.append((tokenizer.decode(alone.tolist()), tokenizer.decode(together[r].tolist())))
    return Batched(side, len(rows), changed, ties, first, floor, shown)

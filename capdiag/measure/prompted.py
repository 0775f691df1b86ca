"""The labels of a prompted captioner's batch (a vision-language model fed ``input_ids`` with image
placeholders, ``attention_mask`` and ``labels``): which positions are targets, whether the collator
shifted them although the model shifts itself, and whether the model's loss is the mean over the
caption's tokens only. ``label_facts`` measures, ``label_problems`` says what is wrong in words.

The split between prompt and caption comes from the prompt's length in tokens (image placeholders
expanded, as the processor tokenizes the prompt alone); padding may be on either side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class LabelFacts:
    rows: int
    targets: int  # label positions that are not IGNORE
    prompt_targets: int  # ... inside the prompt, image placeholders left out
    image_targets: int  # ... at image placeholder positions
    pad_targets: int  # ... at padding (attention mask 0)
    eos_rows: int  # captions whose EOS is a target
    same_as_input: float  # share of targets whose label is the input id at that position (the model shifts)
    next_input: float  # share whose label is the next input id (the collator shifted)
    loss: Optional[float] = None  # the model's loss on the batch, labels as given
    caption_mean: Optional[float] = None  # next-token cross-entropy averaged over the caption tokens only


def caption_spans(batch: dict, prompt_len: int) -> list:
    """Per row, ``(prompt start, caption start, end)``: the prompt starts after the padding on the left,
    its ``prompt_len`` tokens end where the caption starts, which runs to the last attended position."""
    spans = []
    for row in batch["attention_mask"]:
        on = row.nonzero().flatten()
        first, last = int(on[0]), int(on[-1])
        spans.append((first, first + prompt_len, last + 1))
    return spans


def label_facts(model, batch: dict, prompt_len: int, image_token_id: int, eos_id: int) -> LabelFacts:
    """Measure the labels of ``batch`` (see ``LabelFacts``); one no-grad forward of ``model`` in its
    current mode compares its loss with the mean over the caption tokens."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target = labels != IGNORE
    spans = caption_spans(batch, prompt_len)
    in_prompt = torch.zeros_like(target)
    in_caption = torch.zeros_like(target)
    for r, (first, start, end) in enumerate(spans):
        in_prompt[r, first:start] = True
        in_caption[r, start:end] = True
    image = ids == image_token_id
    eos_rows = sum(bool((target[r] & (ids[r] == eos_id) & in_caption[r]).any()) for r in range(ids.shape[0]))
    n = max(int(target.sum()), 1)
    same = float((target & (labels == ids)).sum()) / n
    nxt = torch.zeros_like(target)
    nxt[:, :-1] = target[:, :-1] & (labels[:, :-1] == ids[:, 1:])
    facts = LabelFacts(ids.shape[0], int(target.sum()), int((target & in_prompt & ~image).sum()),
                       int((target & image).sum()), int((target & (mask == 0)).sum()), eos_rows, same,
                       float(nxt.sum()) / n)
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits.float()
    facts.loss = float(out.loss) if getattr(out, "loss", None) is not None else None
    lp = F.log_softmax(logits[:, :-1], -1)  # position t predicts token t + 1
    nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    caption = in_caption[:, 1:]
    facts.caption_mean = float(nll[caption].mean()) if bool(caption.any()) else None
    return facts


def label_problems(f: LabelFacts, tol: float = 2e-5) -> list:
    """What is wrong with the labels, one clause each (empty when nothing is). The loss comparison is exact
    arithmetic on the same logits, so ``tol`` is float rounding (relative), not a model's noise."""
    out = []
    if f.prompt_targets:
        out.append(f"{f.prompt_targets} prompt positions are targets (not -100): the loss trains on the prompt")
    if f.image_targets:
        out.append(f"{f.image_targets} image placeholder positions are targets (not -100)")
    if f.pad_targets:
        out.append(f"{f.pad_targets} padding positions are targets (not -100)")
    if f.eos_rows < f.rows:
        out.append(f"EOS is not a target in {f.rows - f.eos_rows} of {f.rows} captions: the model never learns to stop")
    if f.next_input > 0.5 and f.same_as_input < 0.5:
        out.append(f"labels are pre-shifted ({f.next_input:.0%} of targets are the next input token) for a model "
                   "that shifts them itself: every target is one token late")
    if f.loss is not None and f.caption_mean is not None and abs(f.loss - f.caption_mean) > tol * max(1.0, f.caption_mean):
        out.append(f"the model's loss {f.loss:.4f} is not the mean over the caption tokens ({f.caption_mean:.4f})")
    return out


@torch.no_grad()
def padding_side_changes(model, processor, images: list, prompts: list, side: str, max_new_tokens: int = 6) -> int:
    """Rows whose greedy caption, generated in one batch of prompts of different lengths padded on
    ``side``, differs from the caption generated for that image and prompt alone. A decoder-only model
    fed right-padded prompts continues after the pad tokens: its batched captions are garbage."""
    tok = processor.tokenizer
    kept = tok.padding_side
    try:
        alone = [model.generate(**processor(images=[im], text=[p], return_tensors="pt"), max_new_tokens=max_new_tokens,
                                do_sample=False)[0, -max_new_tokens:] for im, p in zip(images, prompts)]
        tok.padding_side = side
        batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        together = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)[:, -max_new_tokens:]
    finally:
        tok.padding_side = kept
    return sum(int(not torch.equal(a, b)) for a, b in zip(alone, together))

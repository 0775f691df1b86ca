"""The labels of a prompted captioner's batch: which positions are targets, whether the collator shifted
them although the model shifts itself, whether the image placeholders match the vision features, and
whether the model's loss is the mean over the caption's tokens only. ``label_facts`` measures,
``label_problems`` says what is wrong in words.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .batches import IGNORE, Split, caption_mask, per_image, spans
from .folder import features_per_image
from .probes import predicting, targets


@dataclass
class LabelFacts:
    rows: int
    targets: int  # label positions that are not IGNORE
    prompt_targets: int  # ... inside the prompt, image placeholders left out
    image_targets: int  # ... at image placeholder positions
    pad_targets: int  # ... at padding (attention mask 0)
    caption_untargeted: int  # caption tokens (EOS left out) whose label is IGNORE
    eos_rows: int  # captions whose EOS is a target
    same_as_input: float  # share of targets whose label is the input id at that position (the model shifts)
    next_input: float  # share whose label is the next input id (the collator shifted)
    image_tokens: tuple = ()  # placeholders per row
    image_features: Optional[int] = None  # features per image the vision side gives (None: no image in the batch)
    loss: Optional[float] = None  # the model's loss on the batch, labels as given
    caption_mean: Optional[float] = None  # next-token cross-entropy averaged over the caption tokens only
    start_rows: int = 0  # encoder-decoder: rows whose labels begin with the decoder start token
    start_id: Optional[int] = None  # ... that token


def label_facts(model, batch: dict, prompt_len: int, image_token_id: int, eos_id: int,
                start_id: Optional[int] = None) -> LabelFacts:
    """Measure the labels of ``batch`` (see ``LabelFacts``); one no-grad forward of ``model`` in its current
    mode compares its loss with the mean over the caption tokens. ``start_id``: an encoder-decoder's decoder
    start token (its labels are the caption alone, see ``decoder_label_facts``)."""
    if isinstance(prompt_len, Split) and prompt_len.decoder:
        return decoder_label_facts(model, batch, prompt_len, image_token_id, eos_id, start_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target = labels != IGNORE
    in_caption = caption_mask(batch, prompt_len)
    in_prompt = torch.zeros_like(target)
    for r, sp in enumerate(spans(batch, prompt_len)):
        in_prompt[r, sp.prompt] = True
    image = ids == image_token_id
    eos = (ids == eos_id) & in_caption
    eos_rows = sum(bool((target[r] & eos[r]).any()) for r in range(ids.shape[0]))
    n = max(int(target.sum()), 1)
    nxt = torch.zeros_like(target)
    nxt[:, :-1] = target[:, :-1] & (labels[:, :-1] == ids[:, 1:])
    facts = LabelFacts(ids.shape[0], int(target.sum()), int((target & in_prompt & ~image).sum()),
                       int((target & image).sum()), int((target & (mask == 0)).sum()),
                       int((~target & in_caption & ~eos & (mask == 1)).sum()), eos_rows,
                       float((target & (labels == ids)).sum()) / n, float(nxt.sum()) / n,
                       tuple(int(x) for x in image.sum(1)))
    return _with_model(facts, model, batch, prompt_len)


def decoder_label_facts(model, batch: dict, split, image_token_id: int, eos_id: int, start_id) -> LabelFacts:
    """``LabelFacts`` of an encoder-decoder's batch: the labels are the caption (BOS, words, EOS) that the
    model shifts right after its decoder start token; padding in them must be -100."""
    ids, labels = batch["input_ids"], batch["labels"]
    target = labels != IGNORE
    pad = target & (labels == split.pad_id)
    rows = ids.shape[0]
    eos_rows = sum(bool((target[r] & (labels[r] == eos_id)).any()) for r in range(rows))
    starts = sum(int(labels[r, 0]) == start_id for r in range(rows)) if start_id is not None else 0
    image = ids == image_token_id
    facts = LabelFacts(rows, int(target.sum()), 0, 0, int(pad.sum()), 0, eos_rows, 1.0, 0.0,
                       tuple(int(x) for x in image.sum(1)), start_rows=starts, start_id=start_id)
    return _with_model(facts, model, batch, split)


@torch.no_grad()
def _with_model(facts: LabelFacts, model, batch: dict, split) -> LabelFacts:
    """The facts only the model tells: the vision side's features per image, and its own loss on the labels as
    given against the mean cross-entropy of the caption tokens, from the same logits."""
    if "pixel_values" in batch:
        facts.image_features = features_per_image(model, per_image(batch)[0])
    out = model(**batch)
    facts.loss = float(out.loss) if getattr(out, "loss", None) is not None else None
    where = predicting(batch, split)
    if bool(where.any()):
        lp = F.log_softmax(out.logits.float()[where], -1)
        facts.caption_mean = float(-lp.gather(-1, targets(batch, split)[where][:, None]).mean())
    return facts


def label_problems(f: LabelFacts, tol: float = 2e-5) -> list:
    """What is wrong with the labels, one clause each (empty when nothing is). The loss comparison is exact
    arithmetic on the same logits, so ``tol`` is float rounding (relative), not a model's noise."""
    out = []
    if f.image_features is None and any(f.image_tokens):
        out.append(f"the rows carry {max(f.image_tokens)} image placeholders but the batch has no pixel_values: the "
                   "model reads the placeholders' embeddings and never sees an image")
    elif f.image_features is not None and any(n % f.image_features for n in f.image_tokens):
        out.append(f"the rows carry {sorted(set(f.image_tokens))} image placeholders but the vision side gives "
                   f"{f.image_features} features per image")
    shifted = f.next_input > 0.5 and f.same_as_input < 0.5
    if f.start_rows and f.start_rows > f.rows // 2:
        out.append(f"labels begin with the decoder start token (id {f.start_id}) in {f.start_rows} of {f.rows} rows: "
                   "the model prepends it again when it shifts them, so every target is one token late")
    if shifted:  # every other clause would describe the shift's side effects (a prompt target, EOS untargeted)
        out.append(f"labels are pre-shifted ({f.next_input:.0%} of targets are the next input token) for a model "
                   "that shifts them itself: every target is one token late")
    if f.prompt_targets and not shifted:
        out.append(f"{f.prompt_targets} prompt positions are targets (not -100): the loss trains on the prompt")
    if f.image_targets:
        out.append(f"{f.image_targets} image placeholder positions are targets (not -100)")
    if f.pad_targets and not shifted:
        out.append(f"{f.pad_targets} padding positions are targets (not -100)")
    if f.caption_untargeted and not shifted:
        out.append(f"{f.caption_untargeted} caption tokens are -100: the loss skips part of the caption")
    if f.eos_rows < f.rows and not shifted:
        out.append(f"EOS is not a target in {f.rows - f.eos_rows} of {f.rows} captions: the model never learns to stop")
    if f.loss is not None and f.caption_mean is not None and abs(f.loss - f.caption_mean) > tol * max(1.0, f.caption_mean):
        out.append(f"the model's loss {f.loss:.4f} is not the mean over the caption tokens ({f.caption_mean:.4f})")
    return out

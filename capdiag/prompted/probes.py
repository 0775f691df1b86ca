"""How much a prompted captioner's caption depends on its image and on its prompt, against a noise floor
measured in the same run.

Every probe compares the log-probabilities the model gives at the positions that predict caption tokens
(teacher-forced, one no-grad forward) with those of the same batch changed in one way: images moved between
rows (or blanked where no two rows share a shape), prompt words replaced. The floor is what the batch's
composition alone changes: the same batch with its rows in reverse order, put back in order, or a rounding
step of the model's dtype at the logits' scale, whichever is larger.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .batches import TEXT_KEYS, Split, caption_mask, join_images, per_image, prompt_replaced, swapped_images

DEPENDS = 4.0  # an effect this many floors above the floor is a dependence; at or under the floor, none


@dataclass
class Effect:
    effect: float  # max |change| of a caption log-probability
    floor: float  # what reordering the batch's rows changes, or a rounding step of the model's dtype
    how: str  # what was changed, in words
    fine: float = 0.0  # a float32 rounding step at the logits' scale: under it, nothing moved at any precision

    @property
    def ratio(self) -> float:
        return self.effect / self.floor if self.floor > 0 else float("inf")

    @property
    def verdict(self) -> str:
        """"none" (nothing moved beyond float32 rounding, nor beyond the floor), "unresolved" (under the floor
        of a coarser dtype, but above float32 rounding: this precision cannot tell), "depends" (DEPENDS floors
        above the floor) or "weak" (between)."""
        if self.effect <= self.floor:
            return "none" if self.effect <= max(self.fine, 0.0) or self.floor <= self.fine * 4 else "unresolved"
        return "depends" if self.effect >= DEPENDS * self.floor else "weak"


def decoder(split) -> bool:
    return isinstance(split, Split) and split.decoder


def predicting(batch: dict, prompt_len: int, within: bool = False) -> torch.Tensor:
    """``(B, T)`` True at the positions whose next-token prediction is a caption token; ``within``: only
    those that are caption tokens themselves (the prompt's last token, which predicts the caption's first,
    left out: it reads its own embedding, not only what attention lets through). Encoder-decoder: the
    decoder positions whose label is a caption token (the decoder never reads the prompt's embeddings)."""
    cap = caption_mask(batch, prompt_len)
    if decoder(prompt_len):
        return cap
    out = torch.zeros_like(cap)
    out[:, :-1] = cap[:, 1:]
    return out & cap if within else out


def targets(batch: dict, prompt_len) -> torch.Tensor:
    """``(B, T)`` the token each position predicts (meaningful where ``predicting``)."""
    if decoder(prompt_len):
        return batch["labels"].clamp(min=0)
    out = torch.zeros_like(batch["input_ids"])
    out[:, :-1] = batch["input_ids"][:, 1:]
    return out


def inputs_of(batch: dict, prompt_len) -> dict:
    """What the forward gets: the batch without its labels (decoder-only), or with the decoder's input ids
    made from them as the model makes them (encoder-decoder: the labels shifted right after the start token)."""
    if not decoder(prompt_len):
        return {k: v for k, v in batch.items() if k != "labels"}
    return dict(batch)


@torch.no_grad()
def caption_logprobs(model, batch: dict, prompt_len: int, within: bool = False) -> torch.Tensor:
    """Log-probabilities (float32) at the caption-predicting positions: ``(N, V)``."""
    logits = model(**inputs_of(batch, prompt_len)).logits.float()
    return torch.log_softmax(logits[predicting(batch, prompt_len, within)], -1)


def reordered(batch: dict, order: list) -> dict:
    """The batch with its rows (text and images) in ``order``."""
    out = {k: v[order] if k in TEXT_KEYS and torch.is_tensor(v) else v for k, v in batch.items()}
    if "pixel_values" in batch:
        parts = per_image(batch)
        if len(parts) == len(order):
            out.update(join_images([parts[i] for i in order]))
    return out


@torch.no_grad()
def noise_floor(model, batch: dict, prompt_len: int, base: torch.Tensor, within: bool = False) -> tuple:
    """Max |change| of the caption log-probabilities when only the rows' order changes, or one rounding
    step of the model's dtype at the logits' scale (eps * max |logit|: a bfloat16 logit of 3 moves in steps
    of 0.016), whichever is larger; and a float32 rounding step at the same scale."""
    n = batch["input_ids"].shape[0]
    back = list(range(n))[::-1]
    split = prompt_len if isinstance(prompt_len, Split) else Split(int(prompt_len))
    split = Split(tuple(split.of(i) for i in back), split.pad_id, split.decoder)
    flipped = reordered(batch, back)
    logits = model(**inputs_of(flipped, split)).logits.float()[predicting(flipped, split, within)]
    again = torch.log_softmax(logits, -1)
    # rows reversed, then each row's positions back in the original order
    sizes = predicting(batch, prompt_len, within).sum(1).tolist()
    pieces = list(again.split([sizes[i] for i in back]))
    again = torch.cat([pieces[back.index(r)] for r in range(n)])
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    scale = 1.0 + float(logits.abs().max())
    rounding = 2 * torch.finfo(dtype).eps * scale  # two logits, each rounded
    return max(float((again - base).abs().max()), rounding), 2 * torch.finfo(torch.float32).eps * scale


def moved_images(batch: dict) -> tuple:
    """``(batch, how)``: each row given another row's image of the same shape, or, where no two rows share
    one, every image blanked."""
    other = swapped_images(batch)
    if other is not None:
        return other, "images swapped between rows"
    return {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}, "images blanked (no two rows share a shape)"


def image_effect(model, batch: dict, prompt_len: int) -> Optional[Effect]:
    """How much the captions' log-probabilities move when each row gets another row's image (or, where no
    two rows share an image shape, a blank image); None when the batch carries no image."""
    if "pixel_values" not in batch:
        return None
    base = caption_logprobs(model, batch, prompt_len)
    floor, fine = noise_floor(model, batch, prompt_len, base)
    other, how = moved_images(batch)
    return Effect(float((caption_logprobs(model, other, prompt_len) - base).abs().max()), floor, how, fine)


def ordinary_ids(tokenizer, rows: int) -> list:
    """Token ids that are neither special nor added tokens (image placeholders, chat markers), below ``rows``."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [i for i in range(min(len(tokenizer), rows)) if i not in special]


def prompt_effect(model, batch: dict, prompt_len: int, tokenizer, image_id: int) -> Optional[Effect]:
    """How much the captions' log-probabilities move when the prompt's words are replaced by other words (the
    image placeholders and special tokens kept); None when the prompt has no word to replace."""
    keep = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | {image_id}
    vocab = ordinary_ids(tokenizer, model.get_input_embeddings().num_embeddings)
    other = prompt_replaced(batch, prompt_len, keep, vocab)
    if torch.equal(other["input_ids"], batch["input_ids"]):
        return None
    # Measured where the queries are caption tokens: they see the prompt only through attention.
    base = caption_logprobs(model, batch, prompt_len, within=True)
    floor, fine = noise_floor(model, batch, prompt_len, base, within=True)
    return Effect(float((caption_logprobs(model, other, prompt_len, within=True) - base).abs().max()), floor,
                  "prompt words replaced by other words", fine)


@torch.no_grad()
def caption_loss(model, batch: dict, prompt_len) -> float:
    """Mean cross-entropy of the caption tokens (teacher-forced), from the logits and the input ids."""
    lp = caption_logprobs(model, batch, prompt_len)
    return float(-lp.gather(-1, targets(batch, prompt_len)[predicting(batch, prompt_len)][:, None]).mean())


def reliance(model, batch: dict, prompt_len) -> Optional[tuple]:
    """``(image reliance, caption loss, loss with the images swapped (or blanked), how)``: the reliance is
    ``1 - L_true / L_swapped`` as image_ablation computes it for captioners (0: the captions ignore the
    image). None when the batch carries no image."""
    if "pixel_values" not in batch:
        return None
    other, how = moved_images(batch)
    true, moved = caption_loss(model, batch, prompt_len), caption_loss(model, other, prompt_len)
    return (1.0 - true / moved if moved > 0 else 0.0), true, moved, how


def pixel_range(image_processor, batch: dict) -> Optional[tuple]:
    """``(low, high)`` of the batch's pixels with the processor's normalization undone (``x * std + mean``,
    per channel): about (0, 1) when each image was rescaled once by 1/255; None when the batch carries no
    image or the processor does not normalize. Channels sit on axis 1 of ``(B, C, H, W)``, axis 2 of
    Idefics3's ``(B, N, C, H, W)``; Qwen2-VL's patch rows hold ``C`` blocks of ``T*P*P`` values."""
    if "pixel_values" not in batch or not getattr(image_processor, "do_normalize", True):
        return None
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        return None
    px = batch["pixel_values"].detach().float()
    c = len(mean)
    if px.dim() == 2:  # rows of flattened patches
        px = px.reshape(px.shape[0], c, -1)
    axis = 2 if px.dim() == 5 else 1
    shape = [1] * px.dim()
    shape[axis] = c
    raw = px * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    if "pixel_attention_mask" in batch and px.dim() == 5:  # Idefics3 pads images to a common size
        keep = batch["pixel_attention_mask"].bool().unsqueeze(2).expand_as(raw)
        raw = raw[keep]
    return float(raw.min()), float(raw.max())


@dataclass
class ImageAttention:
    share: float  # mean attention mass the caption tokens put on the image placeholders (layers, heads averaged)
    uniform: float  # the image placeholders' share of the row's attended tokens
    layers: int
    cross: bool  # an encoder-decoder's cross-attention (else the decoder's self-attention)


@torch.no_grad()
def image_attention(model, batch: dict, prompt_len, image_id: int) -> Optional[ImageAttention]:
    """How much attention the caption tokens pay the image placeholders (None when the model returns no
    attention weights: SDPA or flash attention)."""
    out = model(**inputs_of(batch, prompt_len), output_attentions=True)
    cross = decoder(prompt_len)
    inner = getattr(out, "language_model_outputs", None) or out  # BLIP-2 nests its language model's outputs
    maps = getattr(inner, "cross_attentions" if cross else "attentions", None)
    if not maps or any(m is None for m in maps):
        return None
    image = (batch["input_ids"] == image_id)  # (B, keys)
    queries = predicting(batch, prompt_len, within=not cross)
    shares, seen = [], []
    for a in maps:  # (B, H, queries, keys)
        on_image = (a.float() * image[:, None, None, :]).sum(-1).mean(1)  # (B, queries)
        shares.append(on_image[queries])
    keys = batch["attention_mask"].bool()
    for r in range(image.shape[0]):
        seen.append(float(image[r][keys[r]].sum()) / max(1, int(keys[r].sum())))
    return ImageAttention(float(torch.cat(shares).mean()), sum(seen) / len(seen), len(maps), cross)

"""A captioning fine-tune's pieces for tiny vision-language captioners (``vlm_families``: LLaVA, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL, PaliGemma, BLIP-2, SmolVLM, Florence-2, built offline as transformers' own tests
build them).

``collate(processor, examples, prompt, bug=None)`` is a user's collator: prompt and image positions and
padding are ``-100`` in the labels, the caption and its EOS are targets, and the model shifts the labels
itself (Florence-2: the prompt to the encoder, the caption as labels). Its twins (``BUGS``) are the
collators users write by mistake; ``MODEL_BUGS`` are lines a user adds to ``build_model()``;
``write_model_file`` writes a model file around either, ``save_lora`` a peft adapter.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .vlm_families import FAMILIES, PROMPTS, WORDS, build_folder, tokenizer

__all__ = ["BUGS", "FAMILIES", "MODEL_BUGS", "PROMPTS", "WORDS", "build_folder", "collate", "save_lora", "tokenizer",
           "write_model_file"]

BUGS = {
    "prompt_unmasked": "label_sanity",  # labels = input_ids with only padding masked: the loss trains on the prompt
    "image_tokens_as_targets": "label_sanity",  # the prompt is masked, the image placeholders are not
    "pre_shifted_labels": "label_sanity",  # labels shifted by the collator, and again by the model
    "eos_not_target": "label_sanity",  # the caption's EOS masked with the padding (pad == eos recipes)
    "image_dropped": "image_ablation",  # the texts through processor.tokenizer: placeholders, no pixel_values
    "prompt_hidden": "prompt_ablation",  # attention_mask 0 on the prompt's words "so the loss skips them"
    "image_masked": "image_ablation",  # attention_mask 0 on the image placeholders "because they are not text"
    "pads_as_targets": "label_sanity",  # encoder-decoder: labels = the caption's input ids, padding left in
    "double_rescale": "input_sanity",  # images made 0-1 floats first, then rescaled by 1/255 again by the processor
    "first_image_prompt_length": "label_sanity",  # the prompt's length measured once, on the first image (Qwen2-VL)
}


def collate(processor, examples: list, prompt: str, bug: Optional[str] = None) -> dict:
    """A captioning fine-tune's collator: ``examples`` are ``(image, caption)`` pairs or ``{"image",
    "caption"}`` dicts; the text is ``prompt + " " + caption + EOS``; labels are the input ids with prompt,
    image and padding positions set to -100 (``bug`` plants one of ``BUGS``)."""
    tok = processor.tokenizer
    pairs = [(e["image"], e["caption"]) if isinstance(e, dict) else e for e in examples]
    images = [img for img, _ in pairs]
    if bug == "double_rescale":  # "the model wants floats in [0, 1]"
        images = [np.asarray(img, dtype=np.float32) / 255.0 for img in images]
    if type(processor).__name__.startswith("Florence2"):
        return _collate_encoder_decoder(processor, images, [c for _, c in pairs], prompt, bug)
    texts = [f"{prompt} {cap}{tok.eos_token}" for _, cap in pairs]
    if bug == "image_dropped":  # the texts through the tokenizer alone: one placeholder each, no pixel_values
        batch = processor.tokenizer(texts, return_tensors="pt", padding=True)
    elif "suffix" in inspect.signature(processor.__call__).parameters:  # PaliGemma: the caption is the suffix
        batch = processor(images=[[im] for im in images], text=[prompt] * len(pairs), suffix=[c for _, c in pairs], return_tensors="pt",
                          padding=True)
        del batch["labels"]  # written below, as for the other families
    else:
        batch = processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.clone()
    labels[mask == 0] = -100
    # the prompt's length in each row: its image placeholders are as many as that image needs (Qwen2-VL)
    n_prompt = [len(processor.tokenizer(prompt)["input_ids"]) if bug == "image_dropped" else
                len(processor(images=[[im if bug != "first_image_prompt_length" else images[0]]], text=[prompt],
                              return_tensors="pt")["input_ids"][0]) for im in images]
    starts = (mask == 0).sum(1)  # left padding: the prompt starts after the pad tokens
    if bug != "prompt_unmasked":
        for r, s in enumerate(starts.tolist()):
            labels[r, : s + n_prompt[r]] = -100
        if bug == "image_tokens_as_targets":
            token = processor.image_token
            image_id = processor.tokenizer.convert_tokens_to_ids(str(getattr(token, "content", token)))
            labels[ids == image_id] = image_id
    if bug == "eos_not_target":
        labels[ids == tok.eos_token_id] = -100
    if bug == "pre_shifted_labels":  # "the model predicts the next token": shifted here, and again inside the model
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    if bug == "prompt_hidden":  # the prompt's ordinary words hidden from attention; image and special tokens kept
        special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
        mask = mask.clone()
        for r, s in enumerate(starts.tolist()):
            for t in range(s + n_prompt[r]):  # the pads precede the caption on every family's layout
                if int(ids[r, t]) not in special and mask[r, t]:
                    mask[r, t] = 0
        batch["attention_mask"] = mask
    if bug == "image_masked":
        token = processor.image_token
        batch["attention_mask"] = mask * (ids != tok.convert_tokens_to_ids(str(getattr(token, "content", token))))
    batch["labels"] = labels
    return dict(batch)


def _collate_encoder_decoder(processor, images: list, captions: list, prompt: str, bug: Optional[str]) -> dict:
    """Florence-2's fine-tuning collator: the prompt and image to the encoder, the caption (BOS ... EOS) as the
    labels with padding -100; ``pads_as_targets`` keeps the pad ids (the tutorials' ``labels=input_ids``),
    ``pre_shifted_labels`` prepends the decoder start token the model prepends again."""
    tok = processor.tokenizer
    if bug == "image_dropped":
        batch = dict(tok([prompt] * len(images), return_tensors="pt", padding=True))
    else:
        batch = dict(processor(images=[[im] for im in images], text=[prompt] * len(images), return_tensors="pt",
                               padding=True))
    caps = tok(captions, return_tensors="pt", padding=True)
    labels = caps["input_ids"] if bug == "pads_as_targets" else caps["input_ids"].masked_fill(caps["attention_mask"] == 0, -100)
    if bug == "pre_shifted_labels":
        labels = torch.cat([torch.full_like(labels[:, :1], tok.eos_token_id), labels], 1)
    batch["labels"] = labels
    return batch


MODEL_FILE = """\
# A captioning fine-tune's model file (written by capdiag.testing.vlm.write_model_file)
from transformers import AutoModelForImageTextToText, AutoProcessor

from capdiag.testing import vlm

FOLDER = {folder!r}
PROMPT = vlm.PROMPTS[{family!r}]


def build_model():
    model = AutoModelForImageTextToText.from_pretrained(FOLDER, local_files_only=True, attn_implementation="eager")
{extra}    return model


def build_processor():
    return AutoProcessor.from_pretrained(FOLDER, local_files_only=True)


def collate(examples):
    return vlm.collate(build_processor(), examples, PROMPT, bug={bug!r})
"""

MODEL_BUGS = {  # changes to build_model(), each a line a user writes
    "vision_no_grad": "gradient_flow",  # the vision tower's forward wrapped in torch.no_grad() "to save memory"
}
_MODEL_EXTRA = {
    None: "",
    "vision_no_grad": ("    import torch\n    tower = model.{tower}\n    inner = tower.forward\n\n"
                       "    def frozen(*args, **kwargs):\n        with torch.no_grad():\n"
                       "            return inner(*args, **kwargs)\n\n    tower.forward = frozen\n"),
}


def write_model_file(path, folder, family: str, bug: Optional[str] = None) -> Path:
    """A model file over the tiny ``family`` folder whose ``collate`` is ``collate(..., bug)`` (``BUGS``) or
    whose ``build_model`` plants one of ``MODEL_BUGS``."""
    tower = {"llava": "model.vision_tower", "qwen2_vl": "model.visual", "paligemma": "model.vision_tower",
             "blip-2": "vision_model", "smolvlm": "model.vision_model", "florence2": "model.vision_tower",
             "qwen2_5_vl": "model.visual", "llava_next": "model.vision_tower",
             "idefics3": "model.vision_model"}[family]
    extra = _MODEL_EXTRA[bug if bug in MODEL_BUGS else None].format(tower=tower)
    path = Path(path)
    path.write_text(MODEL_FILE.format(folder=str(folder), family=family, extra=extra,
                                      bug=None if bug in MODEL_BUGS else bug))
    return path


def save_lora(model, folder, target_modules: list, modules_to_save: Optional[list] = None) -> Path:
    """Attach a LoRA adapter (peft) to ``model`` and save the adapter alone into ``folder``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, modules_to_save=modules_to_save,
                        init_lora_weights="gaussian")
    peft = get_peft_model(model, config)
    peft.save_pretrained(folder)
    return Path(folder)

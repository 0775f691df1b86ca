"""The vision-language families capdiag reads, keyed by ``config.json``'s ``model_type``: where each keeps
its vision tower, projector and language model, which side it pads prompts on for batched generation,
and the captioning prompt it is fine-tuned with by default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Family:
    model_type: str
    name: str  # the transformers class, for messages
    vision: tuple  # dotted paths (inside the model, after peft's wrapping is removed) of the vision tower
    projector: tuple  # ... of what maps vision features into the language model
    language: tuple  # ... of the language model (lm_head included)
    prompt: str  # the default captioning prompt; "{image}" stands for the processor's image token
    padding_side: str = "left"  # for batched generation: decoder-only models pad prompts on the left
    encoder_decoder: bool = False  # the caption is the decoder's input (labels), the prompt the encoder's
    suffix: bool = False  # the processor takes the caption as suffix= (and writes token_type_ids)
    notes: tuple = ()  # facts about the family a correct check must not flag
    token_keys: str = "the image processor's patch and merge sizes"  # what sets the processor's image-token count


FAMILIES = {f.model_type: f for f in (
    Family("llava", "LlavaForConditionalGeneration", ("model.vision_tower",), ("model.multi_modal_projector",),
           ("model.language_model", "lm_head"), "{image}describe the image:",
           notes=("reads the second-to-last vision layer: the last one gets no gradient by design",),
           token_keys="patch_size, num_additional_image_tokens and vision_feature_select_strategy"),
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", ("model.visual.patch_embed", "model.visual.blocks"),
           ("model.visual.merger",), ("model.language_model", "lm_head"),
           "<|vision_start|>{image}<|vision_end|>describe the image:",
           notes=("pixel_values are rows of patches with image_grid_thw",),
           token_keys="the image processor's patch_size and merge_size"),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", ("model.visual.patch_embed", "model.visual.blocks"),
           ("model.visual.merger",), ("model.language_model", "lm_head"),
           "<|vision_start|>{image}<|vision_end|>describe the image:",
           notes=("pixel_values are rows of patches with image_grid_thw; windowed vision attention",),
           token_keys="the image processor's patch_size and merge_size"),
    Family("llava_next", "LlavaNextForConditionalGeneration", ("model.vision_tower",),
           ("model.multi_modal_projector", "model.image_newline"), ("model.language_model", "lm_head"),
           "{image}describe the image:",
           notes=("anyres: a base view and tiles per image (5-D pixel_values with image_sizes)",),
           token_keys="patch_size, num_additional_image_tokens, vision_feature_select_strategy and image_grid_pinpoints"),
    Family("paligemma", "PaliGemmaForConditionalGeneration", ("model.vision_tower",), ("model.multi_modal_projector",),
           ("model.language_model", "lm_head"), "{image}caption en", suffix=True,
           notes=("attends bidirectionally over image and prompt (token_type_ids 0)",
                  "tied embeddings: a random model repeats one token"),
           token_keys="the image processor's image_seq_length"),
    Family("blip-2", "Blip2ForConditionalGeneration", ("vision_model",), ("qformer", "query_tokens", "language_projection"),
           ("language_model",), "a photo of",
           notes=("the processor writes the query tokens' placeholders before the prompt, padding between them",
                  "the default vision initializer_range (1e-10) gives a from-scratch tower ~1e-20 gradients"),
           token_keys="num_query_tokens"),
    *(Family(kind, name, ("model.vision_model",), ("model.connector",), ("model.text_model", "lm_head"),
             "{image}describe the image:", notes=("pixel_values are 5-D (batch, images, C, H, W) with a pixel_attention_mask",
                                                 "each image is wrapped in <fake_token_around_image><global-img>"),
             token_keys="image_seq_len and the image processor's splitting")
      for kind, name in (("smolvlm", "SmolVLMForConditionalGeneration"), ("idefics3", "Idefics3ForConditionalGeneration"))),
    Family("florence2", "Florence2ForConditionalGeneration", ("model.vision_tower",), ("model.multi_modal_projector",),
           ("model.language_model", "lm_head"), "<CAPTION>", padding_side="right", encoder_decoder=True,
           notes=("encoder-decoder: the prompt and image go to the encoder, the caption is the labels; pads on the right",),
           token_keys="the image processor's image_seq_length"),
)}


def family_of(model_type: Optional[str]) -> Optional[Family]:
    return FAMILIES.get(model_type or "")


def supported() -> str:
    return ", ".join(FAMILIES)

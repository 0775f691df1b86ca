"""The tiny vision-language families of ``capdiag.testing.vlm``: random weights from small configs, a
byte-level BPE tokenizer trained here on a few words with the family's special and image tokens, the
family's processor, saved in one folder with ``save_pretrained()``. ``build_folder(family, folder)``
writes one; ``bug`` saves a processor (or generation config) that disagrees with the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

WORDS = ("a the one two red green blue yellow circle square cross triangle on in at top left right bottom "
         "corner describe image caption this").split()

def tokenizer(specials: tuple, padding_side: str = "left", vocab_size: int = 300, template: bool = False, **extra):
    """A byte-level BPE tokenizer trained on ``WORDS``, with ``specials`` (pad, bos, eos, unk, image, ...)
    as its first ids; ``template``: it writes ``bos text eos`` as BART's does; ``extra``: more keyword
    arguments of ``PreTrainedTokenizerFast`` (``extra_special_tokens``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=specials[3]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    pad, bos, eos, unk = specials[:4]
    if template:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[
            (bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
                                   padding_side=padding_side, **extra)


def build_llava(folder, seed: int = 0, image_size: int = 32, patch: int = 8, bug: Optional[str] = None) -> Path:
    """A tiny LLaVA folder; ``bug`` saves a processor that disagrees with the model: ``processor_image_tokens``
    (it forgets the CLS position the feature strategy drops), ``processor_vocab`` (a tokenizer with tokens
    the model has no embedding for)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = tokenizer(("<pad>", "<s>", "</s>", "<unk>", "<image>"))
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=0 if bug == "processor_image_tokens" else 1)  # the CLS the "default" strategy drops
    return _save(folder, model, processor, bug)


def build_qwen2_vl(folder, seed: int = 0, image_size: int = 32, patch: int = 8, bug: Optional[str] = None,
                   version: str = "2") -> Path:
    """A tiny Qwen2-VL folder (``version="2.5"``: Qwen2.5-VL, whose vision tower attends in windows):
    ``pixel_values`` are rows of patches with ``image_grid_thw``, 2x2 patches merge into one feature, M-RoPE
    positions; ``bug`` as for ``build_llava``."""
    import transformers
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    name = "Qwen2_5_VL" if version == "2.5" else "Qwen2VL"
    tok = tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<|image_pad|>", "<|vision_start|>",
                     "<|vision_end|>", "<|video_pad|>"))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    vision = dict(depth=2, hidden_size=32, num_heads=4, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3)
    vision.update(dict(intermediate_size=64, window_size=4 * patch, out_hidden_size=32, fullatt_block_indexes=[1])
                  if version == "2.5" else dict(embed_dim=32, mlp_ratio=2))
    config = getattr(transformers, f"{name}Config")(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(config)
    merge = 1 if bug == "processor_image_tokens" else 2  # the twin's processor forgets the 2x2 merge
    pixels = dict(min_pixels=image_size * image_size, max_pixels=4 * image_size * image_size)
    processor = getattr(transformers, f"{name}Processor")(
        image_processor=transformers.Qwen2VLImageProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                                           **pixels),
        video_processor=Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2), tokenizer=tok)
    return _save(folder, model, processor, bug)


def build_qwen2_5_vl(folder, seed: int = 0, bug: Optional[str] = None, **kw) -> Path:
    return build_qwen2_vl(folder, seed, bug=bug, version="2.5", **kw)


def build_llava_next(folder, seed: int = 0, image_size: int = 32, patch: int = 8, bug: Optional[str] = None) -> Path:
    """A tiny LLaVA-NeXT folder: each image is a base view plus "anyres" tiles (5-D ``pixel_values`` with
    ``image_sizes``), a learned newline embedding after each row of tile features; ``bug`` as for
    ``build_llava``."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    tok = tokenizer(("<pad>", "<s>", "</s>", "<unk>", "<image>"))
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    images = LlavaNextImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                     image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=patch,
                                   vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=0 if bug == "processor_image_tokens" else 1)
    return _save(folder, model, processor, bug)


def build_paligemma(folder, seed: int = 0, image_size: int = 32, patch: int = 8, bug: Optional[str] = None) -> Path:
    """A tiny PaliGemma folder: SigLIP vision tower, Gemma text model with tied embeddings, attention
    bidirectional over image and prompt (``token_type_ids`` 0), the caption passed to the processor as
    ``suffix``; ``bug`` as for ``build_llava``."""
    from tokenizers.processors import TemplateProcessing
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    tok = tokenizer(("<pad>", "<bos>", "<eos>", "<unk>", "<image>"))
    tok._tokenizer.post_processor = TemplateProcessing(single="$A", pair="$A $B:1")  # the suffix is type 1
    images = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    n = (image_size // patch) ** 2
    images.image_seq_length = n - 1 if bug == "processor_image_tokens" else n
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok)  # adds PaliGemma's <loc> and <seg> tokens
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=image_size, patch_size=patch)
    text = GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_id, projection_dim=32,
                             hidden_size=32, vocab_size=len(tok))
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    return _save(folder, model, processor, bug)


def build_blip2(folder, seed: int = 0, image_size: int = 32, patch: int = 8, bug: Optional[str] = None) -> Path:
    """A tiny BLIP-2 folder: vision tower, Q-Former with 4 query tokens, OPT language model (bos == eos);
    the processor puts the query tokens' placeholders before the padded text (left padding lands between
    them and the prompt); ``bug`` as for ``build_llava``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, OPTConfig

    tok = tokenizer(("<pad>", "</s>", "</s>", "<unk>", "<image>"))
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer=tok, num_query_tokens=3 if bug == "processor_image_tokens" else 4)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            encoder_hidden_size=32, vocab_size=64),
        text_config=OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=256,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    return _save(folder, Blip2ForConditionalGeneration(config), processor, bug)


def build_smolvlm(folder, seed: int = 0, image_size: int = 32, patch: int = 8, bug: Optional[str] = None,
                  kind: str = "SmolVLM") -> Path:
    """A tiny SmolVLM folder (``kind="Idefics3"``: its parent architecture and processor): SigLIP-style vision
    tower, pixel shuffle by 2 into a connector, Llama text model; ``pixel_values`` are 5-D (batch, images, C,
    H, W) with a ``pixel_attention_mask``; each image is written as ``<fake_token_around_image><global-img>
    <image>*n<fake_token_around_image>``; SmolVLM's processor needs ``num2words``. ``bug`` as for
    ``build_llava``."""
    import transformers

    tok = tokenizer(("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<unk>", "<image>",
                     "<fake_token_around_image>", "<global-img>", "<video>")
                    + tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
    scale = 2
    config = getattr(transformers, f"{kind}Config")(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(config)
    edge = {"longest_edge": image_size}
    seq = (image_size // patch) ** 2 // scale ** 2
    images = getattr(transformers, f"{kind}ImageProcessor")(do_image_splitting=False, size=edge, max_image_size=edge)
    extra = {}
    if kind == "SmolVLM":
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        extra["video_processor"] = SmolVLMVideoProcessor(size=edge, max_image_size=edge)
    processor = getattr(transformers, f"{kind}Processor")(image_processor=images, tokenizer=tok, **extra,
                                                          image_seq_len=seq + 1 if bug == "processor_image_tokens" else seq)
    return _save(folder, model, processor, bug)


def build_idefics3(folder, seed: int = 0, bug: Optional[str] = None, **kw) -> Path:
    return build_smolvlm(folder, seed, bug=bug, kind="Idefics3", **kw)


def build_florence2(folder, seed: int = 0, image_size: int = 16, bug: Optional[str] = None) -> Path:
    """A tiny Florence-2 folder: DaViT vision tower (one stage, stride 4), BART encoder-decoder. The prompt
    (``<CAPTION>``, which the processor writes as a question) and the image go to the encoder; the caption is
    the labels, which the model shifts right behind ``decoder_start_token_id``; padding is on the right.
    ``bug``: ``generation_start`` saves a generation config that starts the decoder from BOS instead."""
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    tok = tokenizer(("<pad>", "<s>", "</s>", "<unk>", "<image>"), padding_side="right", template=True,
                    extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False)
    images.image_seq_length = (image_size // 4) ** 2 + (0 if bug == "processor_image_tokens" else 1)  # + the pooled one
    processor = Florence2Processor(image_processor=images, tokenizer=tok)
    bart = dict(model_type="bart", vocab_size=len(tok), max_position_embeddings=128, encoder_layers=2, encoder_ffn_dim=64,
                decoder_layers=2, decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, d_model=32,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
                forced_eos_token_id=tok.eos_token_id)
    davit = dict(drop_path_rate=0.0, patch_size=[7], depths=[1], patch_stride=[4], patch_padding=[3],
                 patch_prenorm=[False], embed_dim=[32], num_heads=[4], num_groups=[4], window_size=12, projection_dim=32)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(Florence2Config(text_config=bart, vision_config=davit,
                                                              image_token_id=tok.convert_tokens_to_ids("<image>")))
    model.generation_config.decoder_start_token_id = tok.eos_token_id
    if bug == "generation_start":  # "the decoder starts with <s>": set in generation_config.json only
        model.generation_config.decoder_start_token_id = tok.bos_token_id
    return _save(folder, model, processor, bug)


def _save(folder, model, processor, bug: Optional[str]) -> Path:
    """Save a family's model and processor; the ``processor_vocab`` twin's tokenizer gets two tokens the
    model has no embedding for, the ``right_padding`` twin's pads on the right (decoding_consistency)."""
    if bug == "processor_vocab":
        processor.tokenizer.add_tokens(["<extra_0>", "<extra_1>"])
    if bug == "no_rescale":  # do_rescale: false in preprocessor_config.json: 0-255 pixels reach the tower
        processor.image_processor.do_rescale = False
    if bug == "right_padding":  # saved as a training recipe pads, and generate() then reads it the same way
        processor.tokenizer.padding_side = "right"
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


FAMILIES = {"llava": build_llava, "qwen2_vl": build_qwen2_vl, "paligemma": build_paligemma, "blip-2": build_blip2,
            "smolvlm": build_smolvlm, "florence2": build_florence2, "qwen2_5_vl": build_qwen2_5_vl,
            "llava_next": build_llava_next, "idefics3": build_idefics3}
PROMPTS = {"llava": "<image>describe the image:", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>describe the image:",
           "paligemma": "<image>caption en", "blip-2": "a photo of", "smolvlm": "<image>describe the image:",
           "florence2": "<CAPTION>", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>describe the image:",
           "llava_next": "<image>describe the image:", "idefics3": "<image>describe the image:"}


def build_folder(family: str, folder, seed: int = 0, bug: Optional[str] = None) -> Path:
    """Write a tiny random ``family`` captioner with its tokenizer and processor into ``folder``."""
    return FAMILIES[family](folder, seed, bug=bug)



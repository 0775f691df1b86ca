"""Prompted captioners (vision-language models from transformers: an image processor and a tokenizer in
one processor, image placeholder tokens in ``input_ids``): what must hold between a folder's processor
and its model before any check can mean something. Each disagreement is said in the model's own terms
(per image, per token), not as transformers' element counts ("tokens: 32, features: 1088").
"""
from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def features_per_image(model, inputs: dict) -> int:
    """How many feature vectors the model's vision side hands the language model for the one image of
    ``inputs`` (the processor's output: ``pixel_values`` and the family's extras, ``image_grid_thw``...)."""
    import inspect

    accepted = inspect.signature(model.get_image_features).parameters
    out = model.get_image_features(**{k: v for k, v in inputs.items() if k in accepted and k != "input_ids"})
    feats = getattr(out, "pooler_output", out)  # transformers 5: per-image projected features
    if isinstance(feats, (list, tuple)):
        feats = feats[0]
    return int(feats.shape[-2])


def processor_mismatch(model, processor, image) -> Optional[str]:
    """One line naming what the processor and the model disagree on (vocabulary, image tokens), or None.
    ``image`` is any image the processor accepts (an array ``(H, W, 3)``)."""
    tok = processor.tokenizer
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        return (f"the processor's tokenizer has {len(tok)} tokens but the model's embedding has {rows} rows: ids from "
                f"{rows} on index past it; save the processor the model was trained with, or resize the embeddings "
                "(model.resize_token_embeddings) before training")
    image_id = model.config.image_token_id
    inputs = processor(images=[image], text=[processor.image_token], return_tensors="pt")
    n_tokens, n_features = int((inputs["input_ids"][0] == image_id).sum()), features_per_image(model, inputs)
    if n_tokens != n_features:
        strategy = getattr(model.config, "vision_feature_select_strategy", None)
        return (f"the processor writes {n_tokens} image tokens per image but the model's vision side gives {n_features} "
                f"features per image{f' (vision_feature_select_strategy={strategy!r})' if strategy else ''}; make the "
                "processor's config agree with the model (patch_size, merge_size, num_additional_image_tokens, the "
                "feature strategy)")
    return None

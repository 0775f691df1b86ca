"""Load a prompted captioner: a folder saved with ``save_pretrained()`` (model and processor), optionally a
LoRA adapter saved by peft, each read offline. What cannot be checked is one line (``ModelFileError``,
exit code 2): a family capdiag does not read, a missing processor or tokenizer, a processor that disagrees
with the model, an adapter made for another base model.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import ModelFileError
from ..intake.hf_folder import quiet  # noqa: F401 (the room's callers import it from here)
from .families import family_of, supported


def model_type(folder) -> Optional[str]:
    p = Path(folder) / "config.json"
    try:
        return json.loads(p.read_text()).get("model_type") if p.is_file() else None
    except ValueError:
        return None


def is_prompted_folder(folder) -> bool:
    return Path(folder).is_dir() and family_of(model_type(folder)) is not None


def load_folder(folder: str, adapter: Optional[str] = None) -> tuple:
    """``(model, processor, family)`` from ``folder`` (and a peft ``adapter`` folder), in eval mode with eager
    attention (which returns the attention weights), offline."""
    try:
        import transformers
    except ImportError:
        raise ModelFileError(f"{folder} is a Hugging Face folder; reading it needs transformers: "
                             "pip install 'capdiag[vlm]'") from None
    kind = model_type(folder)
    family = family_of(kind)
    if family is None:
        raise ModelFileError(f"{folder}: config.json has model_type {kind!r}; capdiag reads vision-language "
                             f"folders of {supported()} (and vision-encoder-decoder, blip, git captioners)")
    processor = load_processor(folder)
    with quiet():
        try:
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                folder, local_files_only=True, attn_implementation="eager")
        except (OSError, ValueError) as e:
            raise ModelFileError(f"cannot load {family.name} from {folder}: {str(e).splitlines()[0]}") from None
    if adapter:
        model = load_adapter(model, adapter, folder)
    return model.eval(), processor, family


def load_processor(folder: str):
    from transformers import AutoProcessor

    have = {p.name for p in Path(folder).iterdir()}
    if not have & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}:
        raise ModelFileError(f"{folder} has no tokenizer (tokenizer.json); save it beside the model: "
                             "processor.save_pretrained(folder)")
    if not have & {"processor_config.json", "preprocessor_config.json"}:
        raise ModelFileError(f"{folder} has no processor (preprocessor_config.json); save it beside the model: "
                             "processor.save_pretrained(folder)")
    with quiet():
        try:
            return AutoProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ModelFileError(f"cannot load the processor in {folder}: {str(e).splitlines()[0]}") from None


def load_adapter(model, adapter: str, base: str):
    """The model with the peft adapter in ``adapter`` attached, trainable as for fine-tuning."""
    try:
        from peft import PeftConfig, PeftModel
    except ImportError:
        raise ModelFileError("--adapter needs peft: pip install 'capdiag[vlm]'") from None
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelFileError(f"{adapter} holds no adapter_config.json; pass the folder peft's save_pretrained() wrote")
    config = PeftConfig.from_pretrained(adapter)
    names = {n for n, _ in model.named_modules()}
    targets = config.target_modules
    if isinstance(targets, (list, set, tuple)):
        wanted = {t for t in targets}
        hit = {t for t in wanted if any(n == t or n.endswith("." + t) for n in names)}
        if not hit:
            raise ModelFileError(f"the adapter in {adapter} targets modules {sorted(wanted)} that {base} does not have; "
                                 f"it was made for {config.base_model_name_or_path or 'another model'}")
    with quiet():
        try:
            return PeftModel.from_pretrained(model, adapter, is_trainable=True)
        except (RuntimeError, ValueError, KeyError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelFileError(f"the adapter in {adapter} does not fit {base} (made for "
                                 f"{config.base_model_name_or_path or 'another model'}): {msg}") from None


def base_model(model):
    """The transformers model under peft's wrapping (``model`` itself when there is none)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


@torch.no_grad()
def features_per_image(model, inputs: dict) -> int:
    """Feature vectors the vision side hands the language model for the one image of ``inputs``."""
    model = base_model(model)
    accepted = inspect.signature(model.get_image_features).parameters
    out = model.get_image_features(**{k: v for k, v in inputs.items() if k in accepted and k != "input_ids"})
    feats = getattr(out, "pooler_output", out)  # transformers 5: per-image projected features
    if isinstance(feats, (list, tuple)):
        feats = feats[0]
    return int(feats.shape[-2])


def processor_mismatch(model, processor, image, prompt: Optional[str] = None) -> Optional[str]:
    """One line naming what the processor and the model disagree on (vocabulary, image tokens), or None.
    Said per image and per token, not as transformers' element counts ("tokens: 30, features: 1024").
    ``prompt``: the text the processor writes the image into (default: its image token alone)."""
    tok = processor.tokenizer
    rows = base_model(model).get_input_embeddings().num_embeddings
    if len(tok) > rows:
        return (f"the processor's tokenizer has {len(tok)} tokens but the model's embedding has {rows} rows: ids from "
                f"{rows} on index past it; save the processor the model was trained with, or resize the embeddings "
                "(model.resize_token_embeddings) before training")
    image_id = image_token_id(model)
    token = processor.image_token
    text = str(getattr(token, "content", token)) if prompt is None else prompt
    inputs = processor(images=[[image]], text=[text], return_tensors="pt")
    n_tokens, n_features = int((inputs["input_ids"][0] == image_id).sum()), features_per_image(model, inputs)
    if n_tokens != n_features:
        strategy = getattr(base_model(model).config, "vision_feature_select_strategy", None)
        family = family_of(getattr(base_model(model).config, "model_type", None))
        keys = family.token_keys if family else "its image-token settings"
        return (f"the processor writes {n_tokens} image tokens per image but the model's vision side gives {n_features} "
                f"features per image{f' (vision_feature_select_strategy={strategy!r})' if strategy else ''}; make the "
                f"processor's {keys} agree with the model, or save the processor the model was trained with")
    return None


def image_token_id(model) -> int:
    cfg = base_model(model).config
    for key in ("image_token_id", "image_token_index"):
        if getattr(cfg, key, None) is not None:
            return int(getattr(cfg, key))
    raise ModelFileError(f"{type(base_model(model)).__name__}'s config names no image token id")

"""The Hugging Face Trainer callback on a tiny LLaVA fine-tuned with a LoRA adapter (peft): silent on a clean
run, whose captions come to depend on the image, and flags a run whose collator hides the image placeholders
from attention (the loss falls just as well: the captions' prior is learned without the image)."""
from __future__ import annotations

import os
import warnings

import pytest

transformers = pytest.importorskip("transformers", minversion="5.0")
pytest.importorskip("peft")

from capdiag.prompted.subject import synthetic_examples  # noqa: E402
from capdiag.testing import vlm  # noqa: E402

LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"]


def test_trainer_callback_on_a_lora_vlm_flags_the_blind_run_only(tmp_path):
    from peft import LoraConfig, get_peft_model

    from capdiag.callbacks.hf import CapdiagTrainerCallback

    folder = vlm.build_folder("llava", tmp_path / "llava")
    processor = transformers.AutoProcessor.from_pretrained(folder)
    prompt, examples = vlm.PROMPTS["llava"], synthetic_examples(8, seed=3)
    flags, reliance = {}, {}
    for bug in (None, "image_masked"):
        model = transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager")
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA,
                                                 modules_to_save=["multi_modal_projector", "lm_head"]))
        cb = CapdiagTrainerCallback(vlm.collate(processor, examples, prompt, bug), processor=processor, prompt=prompt,
                                    every=10, warmup=40, patience=2)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(bug)), max_steps=120, per_device_train_batch_size=8, learning_rate=1e-2,
            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
            remove_unused_columns=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.Trainer(model=model, args=args, train_dataset=examples, callbacks=[cb],
                                 data_collator=lambda ex, bug=bug: vlm.collate(processor, ex, prompt, bug)).train()
        flags[bug] = [f.kind for f in cb.flags]
        reliance[bug] = [v for _, v in cb.diag.history["image_ablation/image_reliance"]]
        assert os.listdir(tmp_path / str(bug) / "capdiag")  # the TensorBoard run
    assert flags[None] == [] and reliance[None][-1] > 0.5, reliance
    assert flags["image_masked"] == ["image_ignored"] and max(reliance["image_masked"]) < 0.01, reliance

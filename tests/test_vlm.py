"""Prompted captioners (a tiny LLaVA built offline): a processor that disagrees with its model is said in
the model's terms (capdiag/intake/prompted.py); the collator users should write passes the label
measurements, and each collator they write by mistake is named (capdiag/measure/labels.py)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from capdiag.measure.prompted import label_facts, label_problems  # noqa: E402
from capdiag.testing import vlm  # noqa: E402

PROMPT = "<image>describe the image:"
CAPTIONS = ["a red circle", "two blue squares on top", "one green cross in the left corner", "a yellow triangle"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = vlm.build_folder("llava", tmp_path_factory.mktemp("llava"))
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    rng = np.random.RandomState(0)
    examples = [(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8), c) for c in CAPTIONS]
    return model, processor, examples


def facts(llava, bug=None):
    model, processor, examples = llava
    batch = vlm.collate(processor, examples, PROMPT, bug)
    prompt_len = len(processor(images=[examples[0][0]], text=[PROMPT], return_tensors="pt")["input_ids"][0])
    tok = processor.tokenizer
    return label_facts(model, batch, prompt_len, tok.convert_tokens_to_ids("<image>"), tok.eos_token_id)


def test_the_clean_collator_has_no_label_problem(llava):
    f = facts(llava)
    assert label_problems(f) == [], f
    assert f.eos_rows == f.rows == 4 and f.same_as_input == 1.0
    assert abs(f.loss - f.caption_mean) < 1e-4  # the model's loss is the mean over the caption tokens


@pytest.mark.parametrize("bug,says", [
    ("prompt_unmasked", "prompt positions are targets"),
    ("image_tokens_as_targets", "image placeholder positions are targets"),
    ("pre_shifted_labels", "labels are pre-shifted"),
    ("eos_not_target", "EOS is not a target in 4 of 4 captions"),
])
def test_each_collator_mistake_is_named(llava, bug, says):
    problems = label_problems(facts(llava, bug))
    assert any(says in p for p in problems), problems
    # and the measurement that tells them apart from a right collator: the loss is no longer the caption mean
    assert any("is not the mean over the caption tokens" in p for p in problems), problems


@pytest.mark.parametrize("bug,says", [
    (None, None),
    ("processor_image_tokens", "the processor writes 15 image tokens per image but the model's vision side gives 16 features"),
    ("processor_vocab", "the processor's tokenizer has 302 tokens but the model's embedding has 300 rows"),
])
def test_a_processor_that_disagrees_with_its_model_is_one_line_in_the_models_terms(tmp_path, bug, says):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from capdiag.intake.prompted import processor_mismatch

    folder = vlm.build_folder("llava", tmp_path, bug=bug)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    said = processor_mismatch(model, processor, np.zeros((32, 32, 3), dtype=np.uint8))
    assert said == says if says is None else (said is not None and says in said and "\n" not in said), said


def test_right_padded_batched_generation_changes_captions_and_left_padding_does_not(llava):
    from capdiag.measure.prompted import padding_side_changes

    model, processor, examples = llava
    images = [im for im, _ in examples]
    prompts = [PROMPT, "<image>caption this image in a few words:", "<image>describe:", "<image>the image shows"]
    assert padding_side_changes(model, processor, images, prompts, "left") == 0
    assert padding_side_changes(model, processor, images, prompts, "right") >= 1
    assert processor.tokenizer.padding_side == "left"  # the processor is left as it was

"""Prompted captioners (tiny LLaVA and Qwen2-VL folders built offline): a processor that disagrees with
its model is said in the model's terms (capdiag/prompted/folder.py); the collator users should write
passes the label measurements, each collator they write by mistake is named, and right-padded batched
generation is told from left-padded (capdiag/prompted/labels.py, generation.py)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers", minversion="5.0")  # Florence-2, AutoModelForImageTextToText
pytest.importorskip("num2words")  # SmolVLM's processor

from capdiag.prompted.generation import batched_vs_alone  # noqa: E402
from capdiag.prompted.labels import label_facts, label_problems  # noqa: E402
from capdiag.testing import vlm  # noqa: E402

CAPTIONS = ["a red circle", "two blue squares on top", "one green cross in the left corner", "a yellow triangle"]
FAMILIES = sorted(n for n in vlm.FAMILIES if n != "florence2")  # decoder-only; Florence-2: test_vlm_checks.py


def load(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    model, processor = load(vlm.build_folder(request.param, tmp_path_factory.mktemp(request.param)))
    rng = np.random.RandomState(0)
    examples = [(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8), c) for c in CAPTIONS]
    return request.param, model, processor, examples


def facts(family, bug=None):
    name, model, processor, examples = family
    prompt = vlm.PROMPTS[name]
    batch = vlm.collate(processor, examples, prompt, bug)
    prompt_len = len(processor(images=[examples[0][0]], text=[prompt], return_tensors="pt")["input_ids"][0])
    tok = processor.tokenizer
    return label_facts(model, batch, prompt_len, model.config.image_token_id, tok.eos_token_id)


def test_the_clean_collator_has_no_label_problem(family):
    f = facts(family)
    assert label_problems(f) == [], f
    assert f.eos_rows == f.rows == 4 and f.same_as_input == 1.0
    assert abs(f.loss - f.caption_mean) < 1e-4 * f.caption_mean  # the model's loss is the mean over the caption tokens


@pytest.mark.parametrize("bug,says", [
    ("prompt_unmasked", "prompt positions are targets"),
    ("image_tokens_as_targets", "image placeholder positions are targets"),
    ("pre_shifted_labels", "labels are pre-shifted"),
    ("eos_not_target", "EOS is not a target in 4 of 4 captions"),
])
def test_each_collator_mistake_is_named(family, bug, says):
    problems = label_problems(facts(family, bug))
    assert any(says in p for p in problems), problems
    # and the measurement that tells them apart from a right collator: the loss is no longer the caption mean
    assert any("is not the mean over the caption tokens" in p for p in problems), problems


def test_right_padded_batched_generation_changes_captions_and_left_padding_does_not(family):
    name, model, processor, examples = family
    batch = vlm.collate(processor, examples, vlm.PROMPTS[name])
    n = len(processor(images=[examples[0][0]], text=[vlm.PROMPTS[name]], return_tensors="pt")["input_ids"][0])
    left = batched_vs_alone(model, batch, n, processor.tokenizer, "left")
    right = batched_vs_alone(model, batch, n, processor.tokenizer, "right")
    assert left.changed == 0 and left.first_step <= left.floor, left
    assert right.changed >= 1 and right.first_step > 100 * right.floor, right
    assert processor.tokenizer.padding_side == "left"  # the processor is left as it was


@pytest.mark.parametrize("name,bug,says", [
    ("llava", "processor_image_tokens", "the processor writes 15 image tokens per image but the model's vision side gives 16"),
    ("qwen2_vl", "processor_image_tokens", "the processor writes 16 image tokens per image but the model's vision side gives 4"),
    ("llava", "processor_vocab", "the processor's tokenizer has 302 tokens but the model's embedding has 300 rows"),
    ("qwen2_vl", "processor_vocab", "the processor's tokenizer has 302 tokens but the model's embedding has 300 rows"),
    ("llava", None, None),
    ("qwen2_vl", None, None),
])
def test_a_processor_that_disagrees_with_its_model_is_one_line_in_the_models_terms(tmp_path, name, bug, says):
    from capdiag.prompted.folder import processor_mismatch

    model, processor = load(vlm.build_folder(name, tmp_path, bug=bug))
    said = processor_mismatch(model, processor, np.zeros((32, 32, 3), dtype=np.uint8))
    assert said == says if says is None else (said is not None and says in said and "\n" not in said), said

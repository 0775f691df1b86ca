"""Prompted captioners through ``capdiag check``: tiny LLaVA and Qwen2-VL folders (and model files whose
``collate`` is the user's) pass every applicable check; each twin, built from a clean one by the change a
real user makes, fails the check named for it; bad input is one line and exit code 2."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers", minversion="5.0")  # Florence-2, AutoModelForImageTextToText
pytest.importorskip("peft")
pytest.importorskip("num2words")

from capdiag.cli import main  # noqa: E402
from capdiag.testing import vlm  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: vlm.build_folder(name, tmp_path_factory.mktemp(name)) for name in vlm.FAMILIES}


def run(tmp_path, *argv) -> tuple:
    out = tmp_path / "findings.json"
    code = main(["check", *map(str, argv), "--json", str(out)])
    found = {f["check"]: f for f in json.loads(out.read_text())["checks"]} if out.exists() else {}
    return code, found


@pytest.mark.parametrize("name", sorted(vlm.FAMILIES))
def test_a_clean_folder_passes_every_applicable_check(folders, tmp_path, name):
    code, found = run(tmp_path, folders[name])
    assert code == 0, {k: f["summary"] for k, f in found.items()}
    assert {k for k, f in found.items() if f["status"] == "pass"} >= {
        "label_sanity", "prompt_ablation", "gradient_flow", "image_ablation", "decoding_consistency", "input_sanity",
        "attention_maps"}, found
    assert found["adapters"]["status"] == "skip"  # no adapter on the folder
    assert "caption_dependence" not in found  # checks of (images, captions) -> logits captioners do not run


@pytest.mark.parametrize("name", ["llava", "florence2"])
def test_a_clean_folder_in_bfloat16_raises_no_false_alarm(folders, tmp_path, name):
    """bfloat16 rounds a logit of 3 in steps of 0.016: the tiny random models' image and prompt effects
    (0.04-0.09) are then a few rounding steps, which is a warning at most, never a failure."""
    code, found = run(tmp_path, folders[name], "--precision", "bfloat16")
    assert code == 0, {k: f["summary"] for k, f in found.items() if f["status"] == "fail"}


@pytest.mark.parametrize("name", sorted(vlm.FAMILIES))
def test_a_clean_collate_in_a_model_file_passes(folders, tmp_path, name):
    path = vlm.write_model_file(tmp_path / "model.py", folders[name], name)
    code, found = run(tmp_path, path, "--only", "label_sanity,image_ablation,prompt_ablation,gradient_flow")
    assert code == 0, {k: f["summary"] for k, f in found.items()}
    assert "your collate()" in found["label_sanity"]["summary"]


TWINS = [(bug, check, "llava") for bug, check in vlm.BUGS.items()
         if bug not in ("pads_as_targets", "first_image_prompt_length")] + [
    ("pre_shifted_labels", "label_sanity", "qwen2_vl"), ("image_dropped", "image_ablation", "qwen2_vl"),
    ("prompt_unmasked", "label_sanity", "paligemma"), ("image_dropped", "image_ablation", "paligemma"),
    ("prompt_hidden", "prompt_ablation", "paligemma"), ("image_tokens_as_targets", "label_sanity", "blip-2"),
    ("image_dropped", "image_ablation", "blip-2"), ("prompt_hidden", "prompt_ablation", "blip-2"),
    ("pre_shifted_labels", "label_sanity", "smolvlm"), ("image_dropped", "image_ablation", "smolvlm"),
    ("pads_as_targets", "label_sanity", "florence2"), ("pre_shifted_labels", "label_sanity", "florence2"),
    ("image_dropped", "image_ablation", "florence2"), ("double_rescale", "input_sanity", "qwen2_vl"),
    ("double_rescale", "input_sanity", "smolvlm"), ("double_rescale", "input_sanity", "florence2"),
    ("image_masked", "attention_maps", "llava"), ("image_masked", "attention_maps", "qwen2_vl"),
    ("image_masked", "attention_maps", "blip-2")] + [
    ("vision_no_grad", "gradient_flow", name) for name in sorted(vlm.FAMILIES)]


@pytest.mark.parametrize("bug,check,name", TWINS)
def test_each_collator_or_model_twin_fails_its_check(folders, tmp_path, bug, check, name):
    path = vlm.write_model_file(tmp_path / "model.py", folders[name], name, bug)
    code, found = run(tmp_path, path, "--only", check)
    assert code == 1 and found[check]["status"] == "fail", found


def test_a_generation_config_starting_elsewhere_than_training_fails_decoding_consistency(tmp_path):
    folder = vlm.build_folder("florence2", tmp_path / "start", bug="generation_start")
    code, found = run(tmp_path, folder, "--only", "decoding_consistency")
    f = found["decoding_consistency"]
    assert code == 1 and f["status"] == "fail", f
    assert "starts the decoder from token 1" in f["summary"] and "behind token 2" in f["summary"], f["summary"]


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_a_processor_saved_without_its_rescale_fails_input_sanity(tmp_path, name):
    folder = vlm.build_folder(name, tmp_path / name, bug="no_rescale")
    code, found = run(tmp_path, folder, "--only", "input_sanity")
    f = found["input_sanity"]
    assert code == 1 and "0-255 pixels reached the model" in f["summary"], f


def test_right_padded_generation_fails_decoding_consistency_with_the_fix(tmp_path):
    folder = vlm.build_folder("llava", tmp_path / "right", bug="right_padding")
    code, found = run(tmp_path, folder, "--only", "decoding_consistency")
    f = found["decoding_consistency"]
    assert code == 1 and f["status"] == "fail" and "padded on the right" in f["summary"], f
    assert 'padding_side = "left"' in f["hint"]


def test_a_lora_config_that_freezes_everything_image_side_fails_and_one_that_trains_the_projector_passes(folders, tmp_path):
    from capdiag.prompted.folder import load_folder

    model, _, _ = load_folder(str(folders["llava"]))
    language_only = vlm.save_lora(model, tmp_path / "lang", r".*language_model.*\.(q_proj|v_proj)")
    model, _, _ = load_folder(str(folders["llava"]))
    with_projector = vlm.save_lora(model, tmp_path / "proj", ["q_proj", "v_proj"], ["multi_modal_projector"])
    code, found = run(tmp_path, folders["llava"], "--adapter", language_only, "--only", "adapters,gradient_flow")
    assert code == 1 and found["adapters"]["status"] == "fail", found
    assert "nothing image-side can train" in found["adapters"]["summary"]
    code, found = run(tmp_path, folders["llava"], "--adapter", with_projector, "--only", "adapters,gradient_flow")
    assert code == 0, {k: f["summary"] for k, f in found.items()}
    # LLaVA's last vision layer is not read: its adapters get no gradient, by design, and are not failed
    assert "by design" in found["adapters"]["summary"], found["adapters"]["summary"]


def test_an_empty_prompt_captions_from_the_image_alone(folders, tmp_path):
    code, found = run(tmp_path, folders["blip-2"], "--prompt", "")  # BLIP-2's usual captioning: no prompt
    assert code == 0 and found["prompt_ablation"]["status"] == "skip", {k: f["summary"] for k, f in found.items()}
    assert found["image_ablation"]["status"] == "pass" and found["label_sanity"]["status"] == "pass"


def test_data_draws_the_batch_from_the_users_captions_and_images_through_the_processor(folders, tmp_path):
    from capdiag.intake.data import write_coco_folder

    write_coco_folder(tmp_path / "coco", 12, seed=0, image_size=48)
    code, found = run(tmp_path, folders["qwen2_vl"], "--data", tmp_path / "coco", "--only",
                      "label_sanity,image_ablation,input_sanity", "--prompt", "{image}what is shown:")
    assert code == 0, {k: f["summary"] for k, f in found.items()}
    assert "capdiag's own collator on --data" in found["label_sanity"]["summary"]


def test_images_of_different_sizes_give_each_row_its_own_prompt_length(folders):
    """Qwen2-VL writes one placeholder per merged patch: a 32x32 and a 64x64 image give prompts of 16 and 28
    tokens. The reference collator and a collator that measures each row pass; one that measures the
    prompt once, on the first image, trains on the prompts of the larger images."""
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from capdiag.prompted.subject import subject_from_batch
    from capdiag.registry import get_check
    from capdiag.runner import run_check

    model = AutoModelForImageTextToText.from_pretrained(folders["qwen2_vl"], attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(folders["qwen2_vl"])
    rng = np.random.RandomState(0)
    examples = [{"image": Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)), "caption": c}
                for (h, w), c in [((32, 32), "a red circle"), ((64, 64), "two blue squares on top"),
                                  ((32, 64), "one green cross"), ((64, 64), "a yellow triangle")]]
    prompt = vlm.PROMPTS["qwen2_vl"]
    statuses = {}
    for bug in (None, "first_image_prompt_length"):
        s = subject_from_batch(model, processor, vlm.collate(processor, examples, prompt, bug), prompt)
        assert s.prompt_len.tokens == (16, 28, 20, 28)
        statuses[bug] = {n: run_check(s, get_check(n)).status.value for n in (
            "label_sanity", "image_ablation", "prompt_ablation", "gradient_flow", "decoding_consistency", "input_sanity")}
    assert set(statuses[None].values()) == {"pass"}, statuses
    assert statuses["first_image_prompt_length"]["label_sanity"] == "fail", statuses


SAMPLE_BATCH_FILE = """
from transformers import AutoModelForImageTextToText, AutoProcessor

from capdiag.prompted.subject import synthetic_examples
from capdiag.testing import vlm

FOLDER = {folder!r}
PROMPT = vlm.PROMPTS["llava"]


def build_model():
    return AutoModelForImageTextToText.from_pretrained(FOLDER, attn_implementation="eager")


def sample_batch():  # no build_processor(): capdiag reads the processor saved beside the model
    return vlm.collate(AutoProcessor.from_pretrained(FOLDER), synthetic_examples(4, seed=1), PROMPT, bug={bug!r})
"""


@pytest.mark.parametrize("bug,code", [(None, 0), ("pre_shifted_labels", 1)])
def test_a_model_file_with_sample_batch_and_no_build_processor(folders, tmp_path, bug, code):
    path = tmp_path / "model.py"
    path.write_text(SAMPLE_BATCH_FILE.format(folder=str(folders["llava"]), bug=bug))
    got, found = run(tmp_path, path, "--only", "label_sanity,image_ablation")
    assert got == code and "your sample_batch()" in found["label_sanity"]["summary"], found


def _bad(capsys, *argv) -> str:
    capsys.readouterr()  # what building the twins printed
    assert main(["check", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bad_input_is_one_line_and_exit_code_2(folders, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    assert "llava, qwen2_vl" in _bad(capsys, other)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in folders["llava"].iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (bare / f.name).write_bytes(f.read_bytes())
    assert "has no tokenizer" in _bad(capsys, bare)
    (bare / "tokenizer.json").write_bytes((folders["llava"] / "tokenizer.json").read_bytes())
    assert "has no processor" in _bad(capsys, bare)
    mismatched = vlm.build_folder("llava", tmp_path / "tokens", bug="processor_image_tokens")
    assert "15 image tokens per image but the model's vision side gives 16" in _bad(capsys, mismatched)
    from capdiag.prompted.folder import load_folder

    model, _, _ = load_folder(str(folders["qwen2_vl"]))
    foreign = vlm.save_lora(model, tmp_path / "qwen_lora", ["qkv"])  # Qwen2-VL's fused vision attention
    assert "does not have" in _bad(capsys, folders["llava"], "--adapter", foreign)
    assert "--prompt is for vision-language captioners" in _bad(capsys, "capdiag.models.cnn_transformer", "--prompt", "x")
    assert "the processor refuses the prompt 'describe:'" in _bad(capsys, folders["llava"], "--prompt", "describe:")
    capsys.readouterr()
    assert main(["overfit", str(folders["llava"]), "--steps", "5"]) == 2
    assert "run `capdiag check" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(vlm.FAMILIES))
def test_a_processor_writing_another_image_token_count_is_one_line_in_every_family(tmp_path, capsys, name):
    folder = vlm.build_folder(name, tmp_path / name, bug="processor_image_tokens")
    said = _bad(capsys, folder)
    assert "image tokens per image but the model's vision side gives" in said, said


def test_pytest_plugin_collects_the_vision_language_checks_of_a_folder(folders, pytester):
    result = pytester.runpytest_subprocess("--capdiag", str(folders["llava"]), "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7, skipped=1)  # the prompted checks; adapters skips without an adapter


@pytest.mark.parametrize("name", ["llava", "blip-2"])
def test_a_right_padded_training_batch_from_a_fresh_model_passes_every_check_in_a_row(folders, name):
    """A training collator that pads on the right, handed over before the model ever ran: transformers 5
    installs its output-capturing hooks on the first forward, which must not happen inside a check (the
    check's restored attributes would leave the hooks unmarked, and the next forward lose the vision
    tower's hidden states)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from capdiag.prompted.batches import prompt_text, reference_batch
    from capdiag.prompted.families import family_of
    from capdiag.prompted.subject import subject_from_batch, synthetic_examples
    from capdiag.registry import get_check
    from capdiag.runner import run_check

    model = AutoModelForImageTextToText.from_pretrained(folders[name], attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(folders[name])
    family = family_of(model.config.model_type)
    processor.tokenizer.padding_side = "right"
    batch = reference_batch(processor, synthetic_examples(4, 0), prompt_text(family, processor, None), family.suffix)
    processor.tokenizer.padding_side = "left"
    s = subject_from_batch(model, processor, batch)
    got = {n: run_check(s, get_check(n)).status.value for n in (
        "image_ablation", "gradient_flow", "label_sanity", "prompt_ablation", "decoding_consistency", "attention_maps")}
    assert set(got.values()) == {"pass"}, got


def test_a_check_that_runs_a_fresh_transformers_model_first_leaves_it_as_it_was(folders):
    """No warm-up here: the first forward happens inside a check, where transformers 5 installs its
    output-capturing hooks and marks the model; the check's preserved_state takes both away again, so the
    next check (and the user's next call) starts from the model as it was."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from capdiag.prompted.batches import Split, prompt_text, reference_batch
    from capdiag.prompted.families import family_of
    from capdiag.prompted.subject import PromptedSubject, synthetic_examples
    from capdiag.registry import get_check
    from capdiag.runner import run_check
    from capdiag.state import ModelSnapshot

    model = AutoModelForImageTextToText.from_pretrained(folders["llava"], attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(folders["llava"])
    family = family_of("llava")
    text = prompt_text(family, processor, None)
    batch = reference_batch(processor, synthetic_examples(4, 0), text)
    s = PromptedSubject(model, processor, family, batch, text, Split(26, processor.tokenizer.pad_token_id), "capdiag", "x")
    before = ModelSnapshot.take(model)
    got = [run_check(s, get_check(n)).status.value for n in ("image_ablation", "gradient_flow", "attention_maps")]
    assert got == ["pass"] * 3
    assert ModelSnapshot.take(model).differences(before) == []


@pytest.mark.parametrize("bug,says", [("vision_no_grad", "ran outside autograd"),
                                      ("image_dropped", "carries no pixel_values")])
def test_gradient_flow_names_the_cause_its_forward_told_apart(folders, tmp_path, bug, says):
    path = vlm.write_model_file(tmp_path / "model.py", folders["llava"], "llava", bug)
    code, found = run(tmp_path, path, "--only", "gradient_flow")
    assert code == 1 and says in found["gradient_flow"]["hint"], found["gradient_flow"]

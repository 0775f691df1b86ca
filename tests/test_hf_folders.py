"""``capdiag check FOLDER`` on Hugging Face captioners saved with save_pretrained(): tiny random
VisionEncoderDecoder (ViT + GPT-2, pad == bos == eos), BLIP and GIT folders pass every applicable
check; a folder whose generation config starts captions with another token than training fails
decoding_consistency, one whose image processor was saved without its 1/255 rescale fails
input_sanity; --data uses the tokenizer saved in the folder. Offline: tiny configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capdiag.cli import main
from capdiag.intake.data import write_coco_folder

tf = pytest.importorskip("transformers")
V = 64
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
WORDS = "one two a in at the on red green blue yellow magenta cyan circle circles square squares triangle " \
        "triangles cross crosses top bottom left right".split()


def vit_gpt2(path: Path, generation_start: int | None = None, rescale: bool = True) -> Path:
    """The vit-gpt2 recipe in miniature: GPT-2's one special token is BOS, EOS and padding."""
    dec = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=V - 1,
                        eos_token_id=V - 1, pad_token_id=V - 1)
    cfg = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(tf.ViTConfig(**VISION), dec)
    cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = V - 1
    torch.manual_seed(0)
    model = tf.VisionEncoderDecoderModel(cfg)
    if generation_start is not None:  # generate() starts from another token than training did
        model.generation_config.decoder_start_token_id = generation_start
    model.save_pretrained(path)
    # rescale=False: a processor saved without its 1/255 rescale feeds the encoder raw 0-255 pixels.
    tf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                         do_rescale=rescale).save_pretrained(path)
    return path


def blip(path: Path) -> Path:
    # The vision initializer_range of 0.02 instead of BLIP's 1e-10 default: that default is meant for
    # loading pretrained weights; from scratch it leaves the vision layers ~1e-27 gradients, which
    # gradient_flow reports (rightly) for a random BLIP.
    cfg = tf.BlipConfig(text_config=dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0, sep_token_id=2,
                                         **TEXT),
                        vision_config=dict(initializer_range=0.02, **VISION), projection_dim=32)
    torch.manual_seed(0)
    tf.BlipForConditionalGeneration(cfg).save_pretrained(path)
    tf.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def git(path: Path) -> Path:
    cfg = tf.GitConfig(vision_config=VISION, vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0, **TEXT)
    torch.manual_seed(0)
    tf.GitForCausalLM(cfg).save_pretrained(path)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def save_word_tokenizer(path: Path, specials: dict) -> None:
    """A word-level fast tokenizer over the synthetic captions' words, saved into the model folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {w: i + 3 for i, w in enumerate(WORDS)}
    vocab.update({"<unk>": V - 2, "<|endoftext|>": V - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **specials).save_pretrained(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    out = {"vit_gpt2": vit_gpt2(root / "vit_gpt2"), "blip": blip(root / "blip"), "git": git(root / "git"),
           "start_token": vit_gpt2(root / "start_token", generation_start=5),
           "raw_pixels": vit_gpt2(root / "raw_pixels", rescale=False)}
    save_word_tokenizer(out["vit_gpt2"], dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>"))
    return out


@pytest.mark.parametrize("kind", ["vit_gpt2", "blip", "git"])
def test_clean_folder_passes_every_applicable_check(folders, tmp_path, capsys, kind):
    js = tmp_path / "f.json"
    code = main(["check", str(folders[kind]), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0, out
    statuses = {c["check"]: c["status"] for c in json.loads(js.read_text())["checks"]}
    assert set(statuses.values()) <= {"pass", "skip"}, statuses
    ran = {c for c, st in statuses.items() if st == "pass"}
    assert {"causal_leak", "batch_independence", "padding_invariance", "gradient_reachability", "overfit",
            "image_ablation", "decoding_consistency", "attribution"} <= ran
    if kind != "git":  # GIT has no cross-attention: its image tokens share the self-attention
        assert "attention_maps" in ran


def test_folder_hints_read_special_ids_and_preprocessing(folders):
    from capdiag.intake.discover import load_model_file

    ved, blp, gt = (load_model_file(str(folders[k])) for k in ("vit_gpt2", "blip", "git"))
    assert {ved.hints[k] for k in ("bos_id", "eos_id", "pad_id")} == {V - 1}  # pad == bos == eos
    assert ved.hints["image_mean"] == (0.5, 0.5, 0.5) and ved.hints["image_size"] == 32 and not ved.crop
    assert (blp.hints["bos_id"], blp.hints["eos_id"], blp.hints["pad_id"]) == (1, 2, 0)
    assert blp.hints["image_module"] == "inner.vision_model"
    assert ved.hints["attention_modules"] == ["inner.decoder.transformer.h.0.crossattention"]
    assert blp.hints["attention_modules"] == ["inner.text_decoder.bert.encoder.layer.0.crossattention.self"]
    assert gt.hints["attention_modules"] == []
    assert gt.crop and gt.hints["image_module"] == "inner.git.image_encoder"


def test_generation_start_token_differing_from_training_fails_decoding_consistency(folders, capsys):
    code = main(["check", str(folders["start_token"]), "--only", "decoding_consistency"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL  decoding_consistency" in out, out


def test_a_processor_saved_without_its_rescale_fails_input_sanity(folders, capsys):
    code = main(["check", str(folders["raw_pixels"]), "--quick"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL  input_sanity" in out and "raw 0-255 pixels" in out, out


def test_data_uses_the_folders_own_tokenizer(folders, tmp_path, capsys):
    write_coco_folder(tmp_path / "coco", 24, image_size=48)
    js = tmp_path / "f.json"
    code = main(["check", str(folders["vit_gpt2"]), "--quick", "--data", str(tmp_path / "coco"), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads(js.read_text())["data"]
    assert "tokenizer: Hugging Face " in data and data.endswith(str(folders["vit_gpt2"]))


def test_unknown_model_type_is_bad_input(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code = main(["check", str(tmp_path), "--quick"])
    err = capsys.readouterr().err
    assert code == 2 and "model_type 'bert'" in err and len(err.strip().splitlines()) == 1

"""--data and --tokenizer: the user's captions (COCO JSON, Flickr files, CSV) and tokenizers (word
map, the model file's tokenize, a Hugging Face folder) give the checks their batch; CIDEr-D and
beam search; the trained-model checks (caption_collapse, word_grounding) pass on a trained zoo
captioner and fail on its image-blind twin trained the same way."""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from capdiag.captioner import Captioner, CaptionSpec
from capdiag.cli import main
from capdiag.intake.data import write_coco_folder
from capdiag.errors import DataError
from capdiag.intake.discover import load_model_file
from capdiag.intake.subject import make_subject
from capdiag.measure.metrics import cider_d
from capdiag.testing import zoo
from capdiag.registry import get_check
from capdiag.runner import run_checks
from capdiag.intake.tokenizers import WORD, WordMap
from capdiag.intake.userdata import Preprocess, read_captions

MODEL = ("from capdiag.testing import zoo\nCAPDIAG = dict(zoo.HINTS)\n"
         "def build_model(bug=None):\n    return zoo.make('gru', bug)\n")
# A model file that brings its own tokenizer (the third tokenizer kind).
TOKENIZE = '''
import json, re, torch
from pathlib import Path
WM = json.loads((Path(__file__).parent / "data" / "wordmap.json").read_text())
def tokenize(texts):
    rows = [[1] + [WM.get(w, 3) for w in re.findall("[a-z]+", t.lower())] + [2] for t in texts]
    T = max(map(len, rows))
    return torch.tensor([r + [0] * (T - len(r)) for r in rows])
INV = {v: k for k, v in WM.items()}
def decode(ids):
    return " ".join(INV.get(i, "?") for i in ids)
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A COCO-format folder of 200 synthetic 32-px images, a 20-word word map (rare words are
    <unk>, as the tutorial's min-frequency does) and two model files."""
    root = tmp_path_factory.mktemp("user")
    write_coco_folder(root / "data", 200, seed=0, image_size=32)
    data = read_captions(str(root / "data"))
    words = Counter(w for it in data.items for c in it.captions for w in WORD.findall(c.lower()))
    wm = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}
    for w, _ in words.most_common(zoo.VOCAB - 4):
        wm[w] = len(wm)
    (root / "data" / "wordmap.json").write_text(json.dumps(wm))
    (root / "model.py").write_text(MODEL)
    (root / "tok_model.py").write_text(MODEL + TOKENIZE)
    return root


def trained_zoo(folder: Path, bug, steps: int = 300) -> Path:
    """A zoo GRU captioner trained on the folder's captions (a few seconds), saved as a state_dict."""
    path = folder / f"trained_{bug}.pt"
    if path.exists():
        return path
    data = read_captions(str(folder / "data"))
    data.tokenizer = WordMap(str(folder / "data" / "wordmap.json"))
    data.preprocess = Preprocess(32, zoo.HINTS["image_mean"], zoo.HINTS["image_std"])
    images, captions, _ = data.batch(200, 0)
    torch.manual_seed(0)
    model = zoo.make("gru", bug)
    spec = CaptionSpec(**{k: v for k, v in zoo.HINTS.items() if k in CaptionSpec.__dataclass_fields__})
    cap, opt = Captioner(model, spec), torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 200, (32,), generator=g)
        loss = cap.loss(images[idx], captions[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), path)
    return path


# ---- reading captions ----------------------------------------------------------------------

def _images(root: Path, names):
    from PIL import Image

    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "imgs" / n)


def test_coco_json_or_folder_groups_captions_by_image(folder):
    for target in (folder / "data", folder / "data" / "captions_train.json"):
        data = read_captions(str(target))
        assert data.kind == "COCO captions JSON" and len(data.items) == 200
        assert all(len(it.captions) == 3 and it.image.is_file() for it in data.items)


def test_flickr8k_token_file(tmp_path):
    _images(tmp_path, ["1000_a.jpg", "1001_b.jpg"])
    (tmp_path / "Flickr8k.token.txt").write_text(
        "1000_a.jpg#0\tA child in a pink dress .\n1000_a.jpg#1\tA girl going into a building .\n"
        "1001_b.jpg#0\tA black dog and a spotted dog are fighting\n")
    data = read_captions(str(tmp_path))
    assert data.kind == "Flickr captions file"
    assert {it.image.name: it.captions for it in data.items} == {
        "1000_a.jpg": ["A child in a pink dress .", "A girl going into a building ."],
        "1001_b.jpg": ["A black dog and a spotted dog are fighting"]}


def test_kaggle_captions_txt_keeps_commas_and_flickr30k_pipes(tmp_path):
    _images(tmp_path, ["x.jpg"])
    (tmp_path / "captions.txt").write_text("image,caption\nx.jpg,A dog , wet , runs .\n")
    assert read_captions(str(tmp_path / "captions.txt")).items[0].captions == ["A dog , wet , runs ."]
    (tmp_path / "captions.txt").unlink()
    (tmp_path / "results.csv").write_text("image_name| comment_number| comment\nx.jpg| 0| Two men, one ladder .\n")
    data = read_captions(str(tmp_path))
    assert data.kind == "Flickr captions file" and data.items[0].captions == ["Two men, one ladder ."]


def test_folder_with_csv_and_missing_images_left_out(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "labels.csv").write_text('file_name,text\na.png,"a red square, small"\ngone.png,nothing here\n')
    data = read_captions(str(tmp_path))
    assert data.kind == "captions CSV" and [it.captions for it in data.items] == [["a red square, small"]]
    assert data.missing == ["gone.png"] and "1 listed images not found" in data.describe()


@pytest.mark.parametrize("content, message", [
    ('{"images": [], "annotations": [{"caption": "x"}]}', "not a COCO captions JSON"),
    ("name,words\na.png,hello\n", "names no image column"),
    ("image,caption\nmissing.png,hello\n", "none of the 1 images"),
])
def test_unreadable_data_is_one_line_data_error(tmp_path, content, message):
    (tmp_path / ("c.json" if content.startswith("{") else "c.csv")).write_text(content)
    with pytest.raises(DataError, match=message) as e:
        read_captions(str(tmp_path))
    assert "\n" not in str(e.value)


def test_preprocess_crops_the_center_to_the_model_size(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 20))  # a white middle third: the center crop is all white
    img.save(tmp_path / "wide.png")
    x = Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(tmp_path / "wide.png")
    assert x.shape == (3, 16, 16) and float(x.min()) > 0.9
    squashed = Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), crop=False)(tmp_path / "wide.png")
    assert float(squashed[:, :, 0].max()) < 0.1  # the black left third is kept when squashing


# ---- tokenizers ----------------------------------------------------------------------------

def test_word_map_encodes_like_the_tutorial(folder):
    wm = WordMap(str(folder / "data" / "wordmap.json"))
    ids = wm.encode(["Two RED circles, on top left!", "zebra"])
    assert ids[0, 0] == 1 and wm.decode(ids[0, 1:6].tolist()) == "two red circles on top"
    assert ids[1].tolist()[:3] == [1, 3, 2] and ids[1, 3:].eq(0).all()  # <unk>, <end>, padding
    assert wm.special_ids == {"pad_id": 0, "bos_id": 1, "eos_id": 2}


def test_word_map_ids_that_contradict_the_hints_are_bad_input(folder, tmp_path):
    wm = json.loads((folder / "data" / "wordmap.json").read_text())
    wm["<start>"], wm["<end>"] = 2, 1
    (tmp_path / "wm.json").write_text(json.dumps(wm))
    mf = load_model_file(str(folder / "model.py"))
    with pytest.raises(DataError, match="<start> = 2 but CAPDIAG bos_id = 1"):
        make_subject(mf, data=str(folder / "data"), tokenizer=str(tmp_path / "wm.json"))


def hf_tokenizer_folder(folder: Path) -> Path:
    """A Hugging Face fast tokenizer over the word map's words, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, normalizers
    from transformers import PreTrainedTokenizerFast

    wm = json.loads((folder / "data" / "wordmap.json").read_text())
    tok = Tokenizer(models.WordLevel(wm, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<start>", eos_token="<end>")
    out = folder / "hf_tok"
    fast.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", ["word_map", "tokenize_fn", "hf_folder"])
@pytest.mark.parametrize("layout", ["coco", "flickr"])
def test_cli_quick_check_on_user_data_with_each_tokenizer(folder, tmp_path, capsys, kind, layout):
    if kind == "hf_folder":
        pytest.importorskip("transformers")
    data = folder / "data"
    if layout == "flickr":  # the same captions as a Flickr8k token file beside the images
        coco = read_captions(str(data))
        lines = [f"{it.image.name}#{k}\t{c}" for it in coco.items for k, c in enumerate(it.captions)]
        (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
        (tmp_path / "Flicker8k_Dataset").symlink_to(data / "images")
        data = tmp_path
    model = folder / ("tok_model.py" if kind == "tokenize_fn" else "model.py")
    tok = {"word_map": ["--tokenizer", str(folder / "data" / "wordmap.json")], "tokenize_fn": [],
           "hf_folder": ["--tokenizer", str(hf_tokenizer_folder(folder))]}[kind]
    js = tmp_path / "f.json"
    code = main(["check", str(model), "--quick", "--data", str(data), *tok, "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(js.read_text())
    assert ("Flickr captions file" if layout == "flickr" else "COCO captions JSON") in report["data"]
    assert "200 images, 600 captions" in out.splitlines()[1]
    assert {c["status"] for c in report["checks"]} <= {"pass", "skip"}


def test_batch_comes_from_the_data_and_seed_picks_the_images(folder):
    mf = load_model_file(str(folder / "model.py"))
    wm = str(folder / "data" / "wordmap.json")
    a, b, c = (make_subject(mf, data=str(folder / "data"), tokenizer=wm, seed=s) for s in (0, 0, 1))
    assert a.batch_source == "user" and a.images.shape == (8, 3, 32, 32)
    assert torch.equal(a.images, b.images) and torch.equal(a.captions, b.captions)
    assert not torch.equal(a.images, c.images)
    assert a.decode(a.captioner.strip(a.captions[:1])[0]).split()[-1] in ("left", "right")


@pytest.mark.parametrize("argv, message", [
    (["--tokenizer", "wm.json"], "--tokenizer is used with --data"),
    (["--data", "nowhere"], "does not exist"),
    (["--data", "DATA"], "needs a tokenizer"),
    (["--data", "DATA", "--tokenizer", "BIG"], "produced token id 30 but the model's vocabulary has 24"),
])
def test_bad_data_arguments_exit_2_in_one_line(folder, tmp_path, capsys, argv, message):
    wm = json.loads((folder / "data" / "wordmap.json").read_text())
    wm["circle"] = 30  # an id outside the model's vocabulary: not the model's tokenizer
    (tmp_path / "big.json").write_text(json.dumps(wm))
    argv = [a.replace("DATA", str(folder / "data")).replace("BIG", str(tmp_path / "big.json")) for a in argv]
    code = main(["check", str(folder / "model.py"), "--quick", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ---- metrics and beam search ---------------------------------------------------------------

def _corpus():
    random.seed(0)
    words = "a man dog red blue on the of riding wave surfboard two cat".split()
    refs = [[random.choices(words, k=random.randint(3, 9)) for _ in range(random.randint(1, 5))] for _ in range(30)]
    hyps = [random.choices(words, k=random.randint(2, 9)) for _ in range(30)]
    hyps[3] = list(refs[3][0])
    return refs, hyps


def test_cider_d_matches_the_coco_evaluation_code():
    refs, hyps = _corpus()
    # pycocoevalcap 1.2's Cider().compute_score on this corpus (measured once; rerun below when installed).
    assert cider_d(refs, hyps) == pytest.approx(0.7075275415844859, rel=1e-12)
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return
    score, _ = Cider().compute_score({i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)},
                                     {i: [" ".join(h)] for i, h in enumerate(hyps)})
    assert cider_d(refs, hyps) == pytest.approx(float(score), rel=1e-12)


def test_beam_search_width_one_is_greedy_and_wider_scores_no_worse(folder):
    mf = load_model_file(str(folder / "model.py"))
    s = make_subject(mf, data=str(folder / "data"), tokenizer=str(folder / "data" / "wordmap.json"),
                     weights=str(trained_zoo(folder, None)))
    cap = s.captioner
    cap.model.eval()
    greedy = cap.greedy(s.images, 12).tolist()
    one = cap.beam(s.images, 1, 12)
    assert cap.strip(one) == cap.strip(greedy)

    def mean_logp(seqs):
        out = []
        for seq in seqs:
            ids = torch.tensor([seq])
            lp = torch.log_softmax(cap.logits(s.images[len(out):len(out) + 1], ids), -1)[0]
            out.append(float(sum(lp[t, seq[t + 1]] for t in range(len(seq) - 1))) / (len(seq) - 1))
        return out

    with torch.no_grad():
        wide, narrow = mean_logp(cap.beam(s.images, 3, 12)), mean_logp(one)
    assert all(w >= n - 1e-5 for w, n in zip(wide, narrow))


# ---- checks of a trained model -------------------------------------------------------------

def _run(folder, bug, weights):
    mf = load_model_file(str(folder / "model.py"))
    s = make_subject(mf, data=str(folder / "data"), tokenizer=str(folder / "data" / "wordmap.json"),
                     model_kwargs={"bug": bug} if bug else None, weights=str(weights) if weights else None)
    report = run_checks(s, [get_check("caption_collapse"), get_check("word_grounding")])
    return {f.check: f for f in report.findings}


def test_trained_model_passes_and_its_image_blind_twin_collapses(folder):
    good = _run(folder, None, trained_zoo(folder, None))
    assert good["caption_collapse"].status.value == "pass", good["caption_collapse"].summary
    assert good["word_grounding"].status.value == "pass", good["word_grounding"].summary
    assert good["caption_collapse"].metrics["image_reliance"] > 0.3
    grounded = dict((w, r) for w, r, _ in good["word_grounding"].artifacts["word_rise"])
    assert grounded["red"] > 1.0 and abs(grounded["the"]) < 0.5  # colours come from the image, "the" does not

    blind = _run(folder, "image_blind", trained_zoo(folder, "image_blind"))
    f = blind["caption_collapse"]
    assert f.status.value == "fail", f.summary
    n = int(f.metrics["top_caption_count"])
    assert n >= 60 and f.summary.startswith(f"{n} of 64 images get the caption '")
    assert f.metrics["image_reliance"] < 0.05 and "BLEU-4" in f.summary and "CIDEr" in f.summary
    assert blind["word_grounding"].status.value == "fail"


def test_trained_model_checks_skip_untrained_models_and_runs_without_data(folder):
    untrained = _run(folder, None, None)
    assert all(f.status.value == "skip" and "untrained" in f.summary for f in untrained.values())
    mf = load_model_file(str(folder / "model.py"))
    s = make_subject(mf, weights=str(trained_zoo(folder, None)))
    f = run_checks(s, [get_check("caption_collapse")]).findings[0]
    assert f.status.value == "skip" and "--data" in f.summary


def test_captions_mostly_unknown_to_the_word_map_warn_in_input_sanity(folder, tmp_path):
    _images(tmp_path, ["cat.jpg", "cup.jpg"])
    (tmp_path / "captions.csv").write_text("image,caption\ncat.jpg,an orange cat sitting on a wooden floor\n"
                                           "cup.jpg,a white cup of coffee on a saucer\n")
    mf = load_model_file(str(folder / "model.py"))
    s = make_subject(mf, data=str(tmp_path), tokenizer=str(folder / "data" / "wordmap.json"))
    f = run_checks(s, [get_check("input_sanity")]).findings[0]
    assert f.status.value == "warn" and "of the caption words in the batch are unknown" in f.summary
    assert f.metrics["unknown_word_rate"] > 0.6
    clean = make_subject(mf, data=str(folder / "data"), tokenizer=str(folder / "data" / "wordmap.json"))
    g = run_checks(clean, [get_check("input_sanity")]).findings[0]
    assert g.status.value == "pass" and g.metrics["unknown_word_rate"] < 0.2

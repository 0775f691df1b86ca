"""What a trained captioner says about the user's images: the measurements behind the
``caption_collapse`` and ``word_grounding`` checks, computed once per subject.

``quality_sample`` draws ``n`` images of ``--data`` (its own seed, so the probe batch is not
reused), generates one caption per image with the model's ``generate`` (or capdiag's greedy
decoding) and with capdiag's beam search, and scores them against all the references: corpus
BLEU-4 (nltk) and CIDEr-D (``metrics.cider_d``), in words when the tokenizer can decode, in token
ids when it cannot. ``word_reliance`` is the per-word version of image reliance: how much each
reference word's loss rises when the image is swapped for another one.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from .ablation import derangement, image_reliance
from ..intake.subject import check_token_ids
from .metrics import bleu4_multi, cider_d
from ..state import in_mode, seeded
from ..intake.tokenizers import WORD

CHUNK = 32  # images per generate/forward call: bounded memory on a real-sized model


@dataclass
class QualitySample:
    images: torch.Tensor
    captions: torch.Tensor  # one tokenized reference per image (teacher forcing)
    references: list  # per image: every reference caption as a word (or id) list
    greedy: list  # per image: the generated caption as a word (or id) list
    beam: list  # per image: capdiag's beam-3 caption, same units
    greedy_text: list  # per image: the generated caption as shown to the user
    token_losses: dict = field(default_factory=dict)  # "true" / "shuffled_images": (n, T-1) per-token losses
    losses: dict = field(default_factory=dict)  # their means over real targets: image_ablation's two losses

    @property
    def n(self) -> int:
        return len(self.greedy)


def _words(text: str) -> list:
    return WORD.findall(text.lower())


def quality_sample(s, n: int = 64) -> QualitySample:
    """The model as given on ``n`` images of ``s.dataset`` (measured once per subject)."""
    def compute():
        cap, data = s.captioner, s.dataset
        images, captions, refs = data.batch(n, s.seed + 7, None)
        check_token_ids(captions, cap.spec, data.tokenizer.name)
        images, captions = cap.to_inputs(images, captions)
        decodes = getattr(data.tokenizer, "can_decode", True)
        max_len = max(cap.spec.max_len, captions.shape[1] + 2)
        greedy, beam = [], []
        with torch.no_grad(), seeded(s.seed), in_mode(cap.model, False):
            for i in range(0, images.shape[0], CHUNK):
                chunk = images[i:i + CHUNK]
                greedy += cap.strip(cap.generate(chunk, max_len=max_len))
                beam += cap.strip(cap.beam(chunk, 3, max_len))
        # One pass with the true images and one with each image swapped for another: image reliance
        # (ablation's definition, on these images) and word_reliance both come from these losses.
        with torch.no_grad(), seeded(s.seed), in_mode(cap.model, False):
            logits = {"true": cap.logits(images, captions), "shuffled_images": cap.logits(derangement(images), captions)}
        tokens = {k: cap.token_losses(v, captions) for k, v in logits.items()}
        losses = {k: float(cap.loss_from_logits(v, captions)) for k, v in logits.items()}
        text = [data.tokenizer.decode(g) for g in greedy]
        if decodes:
            as_units = lambda ids: _words(data.tokenizer.decode(ids))  # noqa: E731
            references = [[_words(r) for r in rs] for rs in refs]
        else:
            as_units = list
            references = [cap.strip(data.tokenizer.encode(rs)) for rs in refs]
        return QualitySample(images, captions, references, [as_units(g) for g in greedy],
                             [as_units(b) for b in beam], text, tokens, losses)

    return s.measured(("quality_sample", n), compute)


def collapse_metrics(q: QualitySample) -> dict:
    """Diversity, length, vocabulary and reference metrics of the generated captions."""
    counts = Counter(tuple(g) for g in q.greedy)
    top, top_count = counts.most_common(1)[0]
    vocab_refs = {w for rs in q.references for r in rs for w in r}
    vocab_used = {w for g in q.greedy for w in g}
    ref_len = [len(r) for rs in q.references for r in rs]
    return {
        "n_images": float(q.n),
        "distinct_fraction": len(counts) / q.n,
        "top_caption_count": float(top_count),
        "top_caption_share": top_count / q.n,
        "vocab_used": float(len(vocab_used)),
        "vocab_references": float(len(vocab_refs)),
        "mean_length": sum(map(len, q.greedy)) / q.n,
        "mean_reference_length": sum(ref_len) / max(len(ref_len), 1),
        "bleu4": bleu4_multi(q.references, q.greedy),
        "cider": cider_d(q.references, q.greedy),
        "beam_bleu4": bleu4_multi(q.references, q.beam),
        "greedy_beam_agreement": sum(g == b for g, b in zip(q.greedy, q.beam)) / q.n,
        "image_reliance": image_reliance(q.losses),
    }


def top_caption_text(q: QualitySample) -> str:
    """The most frequent generated caption as the user would read it."""
    counts = Counter(tuple(g) for g in q.greedy)
    top = counts.most_common(1)[0][0]
    return next(t for g, t in zip(q.greedy, q.greedy_text) if tuple(g) == top)


def word_reliance(q: QualitySample, cap, decode) -> dict:
    """Per word (as decoded): mean rise of its token loss when each image is swapped for another
    one (``derangement``), over its occurrences as a real target, and the occurrence count.
    Returns ``{word: (mean_rise, count)}``."""
    captions, true, shuffled = q.captions, q.token_losses["true"], q.token_losses["shuffled_images"]
    mask = cap.target_mask(captions)
    rise, n = defaultdict(float), Counter()
    special = cap.spec.special_ids
    for (b, t) in mask.nonzero().tolist():
        tok = int(captions[b, t + 1])
        if tok in special:
            continue
        word = decode([tok])
        rise[word] += float(shuffled[b, t] - true[b, t])
        n[word] += 1
    return {w: (rise[w] / n[w], n[w]) for w in n}

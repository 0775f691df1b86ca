"""metric_sanity: the model file's own ``bleu_fn(references, hypotheses)`` agrees with nltk.

Both take lists of token-id lists as they come out of the model (BOS, EOS and padding
included). capdiag strips BOS/EOS/padding and computes nltk's corpus BLEU-4; the user's
metric must match it (on a 0-1 or 0-100 scale). A BLEU that counts pad tokens as words,
a real bug in published captioning code, inflates or deflates scores with the padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import function_location
from capdiag.measure.metrics import bleu4
from capdiag.registry import register_check


def metric_probe(cap, captions: torch.Tensor, seed: int):
    """References padded one way, hypotheses (half exact, half with one word changed) another."""
    g = torch.Generator().manual_seed(seed)
    refs = [r for r in captions.tolist()]
    hyps = []
    for i, r in enumerate(refs):
        real = r[: int(cap.lengths(captions[i : i + 1])[0])]
        h = list(real)
        if i % 2 and len(h) > 3:
            j = 1 + int(torch.randint(len(h) - 2, (1,), generator=g))
            h[j] = (h[j] + 1) % cap.spec.vocab_size
            while h[j] in cap.spec.special_ids:
                h[j] = (h[j] + 1) % cap.spec.vocab_size
        hyps.append(h + [cap.spec.pad_id] * (3 + i % 3))  # differently padded than the references
    return refs, hyps


@register_check
@dataclass
class MetricSanity(Check):
    name = "metric_sanity"
    calls = "bleu_fn"
    catches = "a BLEU implementation that counts pad/special tokens or disagrees with nltk"
    atol: float = 0.005

    def run(self, s: Subject):
        cap = s.captioner
        if cap.bleu_fn is None:
            return self.skip("the model file defines no bleu_fn(references, hypotheses)")
        refs, hyps = metric_probe(cap, s.captions, s.seed)
        expected = bleu4(cap.strip(refs), cap.strip(hyps))
        got = float(cap.bleu_fn(refs, hyps))
        scaled = got / 100 if got > 1.5 else got
        metrics = {"bleu_user": got, "bleu_nltk": expected}
        if abs(scaled - expected) > self.atol:
            return self.finding(
                Status.FAIL,
                f"bleu_fn gives {got:.4f} where nltk corpus BLEU-4 on stripped tokens gives {expected:.4f}",
                metrics,
                "Strip BOS, EOS and padding (cut at the first EOS) before scoring; padding counted as words "
                "changes BLEU with the batch's padding. Compare with nltk.translate.bleu_score.corpus_bleu.",
                location=function_location(cap.bleu_fn, (refs, hyps), "computes the score"),
            )
        return self.finding(Status.PASS, f"bleu_fn agrees with nltk corpus BLEU-4 ({expected:.4f})", metrics)


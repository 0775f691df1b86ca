"""Caption metrics computed on token lists with BOS/EOS/padding stripped."""
from __future__ import annotations


def bleu4(references: list, hypotheses: list) -> float:
    """Corpus BLEU-4 (nltk) with one reference per hypothesis; smoothing for short captions."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    if not hypotheses:
        return 0.0
    return float(
        corpus_bleu([[r] for r in references], hypotheses, smoothing_function=SmoothingFunction().method1)
    )


def exact_match(references: list, hypotheses: list) -> float:
    if not hypotheses:
        return 0.0
    return sum(list(r) == list(h) for r, h in zip(references, hypotheses)) / len(hypotheses)

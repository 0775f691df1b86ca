"""Caption metrics computed on token lists with BOS/EOS/padding stripped.

``bleu4`` is nltk's corpus BLEU-4; ``cider_d`` is CIDEr-D exactly as the COCO caption evaluation
(``pycocoevalcap``) computes it, reimplemented because that package ships 100 MB of Java jars for
its other metrics; ``tests/test_user_data.py`` compares the two.
"""
from __future__ import annotations

import math
from collections import Counter


def bleu4(references: list, hypotheses: list) -> float:
    """Corpus BLEU-4 (nltk) with one reference per hypothesis; smoothing for short captions."""
    return bleu4_multi([[r] for r in references], hypotheses)


def bleu4_multi(references: list, hypotheses: list) -> float:
    """Corpus BLEU-4 (nltk) with several references per hypothesis (``references[i]``: a list of
    token lists for ``hypotheses[i]``)."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    if not hypotheses:
        return 0.0
    return float(corpus_bleu(references, hypotheses, smoothing_function=SmoothingFunction().method1))


def exact_match(references: list, hypotheses: list) -> float:
    if not hypotheses:
        return 0.0
    return sum(list(r) == list(h) for r, h in zip(references, hypotheses)) / len(hypotheses)


def _ngrams(words: list, n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(references: list, hypotheses: list, n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (x10 scale, as COCO reports it) of ``hypotheses`` (token lists) against
    ``references`` (a list of token lists per hypothesis). Document frequencies come from these
    references, as in ``pycocoevalcap``, whose quirks are kept so the numbers match: the length
    penalty counts bigrams, and n-grams unseen in the references get document frequency 1."""
    if not hypotheses:
        return 0.0
    refs = [[_ngrams(list(r), n) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for g in r})
    log_n = math.log(float(len(refs)))

    def vec(counts: Counter):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    total = 0.0
    for hyp, rs in zip(hypotheses, refs):
        vh, nh, lh = vec(_ngrams(list(hyp), n))
        score = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                score[k] += val * penalty
        total += 10.0 * (sum(score) / n) / len(rs)
    return total / len(hypotheses)

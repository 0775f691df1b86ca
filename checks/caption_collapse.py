"""caption_collapse: does a trained model say different things about different images?

The classic complaint about a trained captioner: "it outputs the same caption for every image".
On ``n`` images of the user's data (``--data``) the model as given generates one caption each;
capdiag counts how many images share the most frequent caption, the fraction of distinct
captions, the words used against the references' vocabulary and the caption lengths, and scores
the captions against every reference (corpus BLEU-4, CIDEr-D) with greedy decoding and with
capdiag's beam-3 search. Image reliance on the same images (as ``image_ablation`` defines it)
tells a decoder that ignores the image from a dataset of look-alike images.

Judged only on a trained model (loss well below ln V on the data): an untrained one says the
same nothing about every image, which is not a bug.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.quality import collapse_metrics, quality_sample, top_caption_text
from capdiag.registry import register_check
from capdiag.measure.training import is_trained


def trained_on_data(check: Check, s: Subject):
    """The skip finding when the trained-model checks cannot judge ``s``, else None."""
    if s.live:
        return check.skip("judges a trained model on --data, not a model in training")
    if s.dataset is None:
        return check.skip("needs your captions and images: --data PATH (COCO JSON, Flickr file or CSV)")
    if not is_trained(s):
        ln_v = math.log(s.captioner.spec.vocab_size)
        return check.skip(f"the model as given is untrained (loss not below {0.5 * ln_v:.2f} = ln V / 2 on the data "
                          "batch); load a trained checkpoint with --weights")
    return None


@register_check
@dataclass
class CaptionCollapse(Check):
    name = "caption_collapse"
    calls = "generate"
    catches = "a trained model giving the same caption to most images (image ignored, decoding stuck)"
    cheap = False
    n_images: int = 64
    max_top_share: float = 0.5  # more images than this sharing one caption fails
    warn_top_share: float = 0.25  # more than this warns: a weak image signal, or look-alike images

    def run(self, s: Subject):
        skip = trained_on_data(self, s)
        if skip is not None:
            return skip
        q = quality_sample(s, self.n_images)
        m = collapse_metrics(q)
        top = top_caption_text(q)
        n, k = int(m["n_images"]), int(m["top_caption_count"])
        scores = (f"BLEU-4 {m['bleu4']:.3f}, CIDEr {m['cider']:.3f} against {m['mean_reference_length']:.1f}-word "
                  f"references; image reliance {m['image_reliance']:.2f}")
        words = f"{int(m['vocab_used'])} of the references' {int(m['vocab_references'])} words used"
        artifacts = {"captions": list(zip(q.greedy_text[:12], [" / ".join(" ".join(map(str, r)) for r in rs[:2])
                                                               for rs in q.references[:12]]))}
        if n >= 4 and k / n > self.max_top_share:
            return self.finding(
                Status.FAIL, f"{k} of {n} images get the caption {top!r} ({m['distinct_fraction']:.0%} distinct); "
                f"{words}; {scores}", m,
                "Captions that do not change with the image: with image reliance near 0 the decoder ignores the "
                "image (a clobbered or frozen-random encoder, features not fed or zeroed; run the full check on "
                "the untrained model and see image_ablation); with reliance high, generate() decodes differently "
                "from training (see decoding_consistency).", artifacts)
        if n >= 4 and k / n > self.warn_top_share:
            return self.finding(
                Status.WARN, f"{k} of {n} images get the caption {top!r} ({m['distinct_fraction']:.0%} distinct); "
                f"{words}; {scores}", m,
                "Few distinct captions: a weak image signal or a dataset of look-alike images; compare the "
                "image reliance with a model you trust.", artifacts)
        return self.finding(
            Status.PASS, f"{m['distinct_fraction']:.0%} of {n} generated captions distinct (most frequent {k} x); "
            f"{words}; {m['mean_length']:.1f} words vs {m['mean_reference_length']:.1f}; {scores}; greedy and beam-3 "
            f"agree on {m['greedy_beam_agreement']:.0%}", m, artifacts=artifacts)

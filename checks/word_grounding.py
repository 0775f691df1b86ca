"""word_grounding: which words of a trained model come from the image?

For the reference captions of ``n`` images of the user's data, capdiag scores every word with
the true image and with another image (a derangement of the batch) and averages, per word, how
much its loss rises: image reliance word by word. "red" and "dog" should depend on the image,
"a" and "of" need not. A model whose words all stay flat with the image swapped fails: its
captions are a language model's, whatever its loss says.
"""
from __future__ import annotations

from dataclasses import dataclass

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.quality import quality_sample, word_reliance
from capdiag.registry import register_check

from .caption_collapse import trained_on_data


@register_check
@dataclass
class WordGrounding(Check):
    name = "word_grounding"
    catches = "a trained model none of whose words depends on the image (per-word loss rise under image swaps)"
    cheap = False
    n_images: int = 64
    grounded_rise: float = 0.5  # nats a word's loss must rise, on average, with the wrong image
    min_count: int = 3  # words seen fewer times are not judged

    def run(self, s: Subject):
        skip = trained_on_data(self, s)
        if skip is not None:
            return skip
        q = quality_sample(s, self.n_images)
        if q.images.shape[0] < 2:
            return self.skip("needs at least 2 images to swap")
        cap = s.captioner
        per_word = word_reliance(q, cap, s.dataset.tokenizer.decode)
        judged = {w: v for w, v in per_word.items() if v[1] >= self.min_count}
        if not judged:
            return self.skip(f"no word occurs {self.min_count} times in the captions of {q.n} images")
        ranked = sorted(judged.items(), key=lambda kv: -kv[1][0])
        grounded = [w for w, (rise, _) in ranked if rise >= self.grounded_rise]
        show = lambda items: ", ".join(f"{w!r} {round(r, 2) + 0.0:+.2f}" for w, (r, _) in items)  # noqa: E731
        metrics = {"words_judged": float(len(judged)), "words_grounded": float(len(grounded)),
                   "max_word_rise": ranked[0][1][0], "grounded_fraction": len(grounded) / len(judged)}
        artifacts = {"word_rise": [(w, r, c) for w, (r, c) in ranked]}
        if not grounded:
            return self.finding(
                Status.FAIL, f"none of {len(judged)} words depends on the image: swapping images raises their loss by "
                f"at most {ranked[0][1][0]:.2f} nats (most: {show(ranked[:4])})", metrics,
                "The trained decoder predicts every word from the text alone: the image features never reached it "
                "or carried nothing (see image_ablation, pretrained_guard and gradient_flow on the untrained model).",
                artifacts)
        return self.finding(
            Status.PASS, f"{len(grounded)} of {len(judged)} words depend on the image (loss rise in nats with another "
            f"image: {show(ranked[:4])}; least: {show(ranked[-2:])})", metrics, artifacts=artifacts)

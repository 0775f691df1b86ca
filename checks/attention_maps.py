"""attention_maps: is the decoder's attention over image regions alive and well formed?

Weights are captured from cross-attention ``nn.MultiheadAttention`` calls and from additive
attention modules returning ``(context, alpha)`` (see ``capdiag.attention``), on a model that
has learned (attention at init is legitimately near uniform). Findings: weights that do not
sum to one over regions (softmax over the wrong dimension), attention uniform over regions
(normalized entropy near 1) in every attention module, or identical for every word and
every image (the query never reaches the scores). Renders per-word overlays of a generated
caption on its image, and per-head maps for transformer decoders.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.attention import attention_modules, captured_attention, judged_rows, normalized_entropy, per_token_maps
from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.registry import register_check
from capdiag.state import mode, seeded
from capdiag.training import learned


def summarize(sel: torch.Tensor) -> dict:
    """Stats of the (N, L) attention rows of real positions."""
    L = sel.shape[-1]
    sums = sel.sum(-1)
    p = sel.clamp_min(0) / sums.clamp_min(1e-12)[:, None]
    ent = normalized_entropy(sel)
    flat = p.view(-1, L)
    idx = torch.linspace(0, len(flat) - 1, min(len(flat), 64)).long()
    sub = flat[idx]
    tv = 0.5 * (sub[:, None] - sub[None]).abs().sum(-1).max() if len(sub) > 1 else torch.tensor(0.0)
    return {"max_sum_error": float((sums - 1).abs().max()), "normalized_entropy": float(ent.mean()),
            "max_pairwise_tv": float(tv), "regions": L}


@register_check
@dataclass
class AttentionMaps(Check):
    name = "attention_maps"
    catches = "attention softmax over the wrong dimension, uniform or query-independent attention"
    cheap = False
    sum_tol: float = 1e-3
    uniform_entropy: float = 0.995
    identical_tv: float = 1e-3

    def run(self, s: Subject):
        hinted = s.captioner.spec.attention_modules
        if hinted == []:
            return self.skip("the model declares no attention over image regions (attention_modules = [])")
        if not attention_modules(s.model, hinted):
            return self.skip("no attention modules found (nn.MultiheadAttention or modules named *att*)")
        cap, images, captions, source = learned(s)
        with torch.no_grad(), seeded(s.seed), mode(cap.model, False), captured_attention(cap.model, hinted) as recs:
            cap.logits(images, captions)
        recs = {n: r for n, r in recs.items() if r.weights}
        if not recs:
            return self.skip("attention modules exist but returned no weights during forward")
        real = cap.real_mask(captions)
        stats = {n: summarize(judged_rows(r, real)) for n, r in recs.items()}
        metrics = {}
        for n, st in stats.items():
            for k in ("max_sum_error", "normalized_entropy", "max_pairwise_tv"):
                metrics[f"{n}.{k}"] = st[k]
        artifacts = {"source": source}
        self._render(s, cap, images, recs, hinted, artifacts)
        wrong_sum = [n for n, st in stats.items() if st["max_sum_error"] > self.sum_tol]
        if wrong_sum:
            n = wrong_sum[0]
            return self.finding(
                Status.FAIL,
                f"attention weights of {n} do not sum to one over the {stats[n]['regions']} regions "
                f"(off by up to {stats[n]['max_sum_error']:.2f})",
                metrics,
                "The softmax runs over the wrong dimension (batch or time instead of regions): use "
                "softmax(scores, dim=-1) over the region axis.", artifacts,
            )
        if all(st["normalized_entropy"] > self.uniform_entropy for st in stats.values()):
            ent = min(st["normalized_entropy"] for st in stats.values())
            return self.finding(
                Status.FAIL, f"attention is uniform over regions in every module (normalized entropy {ent:.3f}) "
                f"after training ({source})", metrics,
                "Scores are constant across regions: a missing tanh/score projection, scores multiplied by "
                "zero, or a temperature so high the softmax flattens.", artifacts,
            )
        if all(st["max_pairwise_tv"] < self.identical_tv for st in stats.values()):
            return self.finding(
                Status.FAIL, "attention is identical for every word and every image in all attention modules",
                metrics,
                "The attention scores ignore the decoder state and the image: check that the hidden state "
                "enters the scoring function and that scores are not broadcast from a constant.", artifacts,
            )
        best = min(stats, key=lambda n: stats[n]["normalized_entropy"])
        return self.finding(
            Status.PASS,
            f"{len(stats)} attention modules well formed; sharpest {best} "
            f"(normalized entropy {stats[best]['normalized_entropy']:.2f} over {stats[best]['regions']} regions)",
            metrics, artifacts=artifacts,
        )

    def _render(self, s, cap, images, recs, hinted, artifacts):
        path = s.output_path("attention_words.png")
        if path is None:
            return
        from capdiag.viz.plots import plot_head_maps, plot_word_maps, save

        img = images[:1]
        with torch.no_grad(), seeded(s.seed), mode(cap.model, False):
            ids = cap.generate(img, max_len=cap.spec.max_len)
            with captured_attention(cap.model, hinted) as r2:
                cap.logits(img, ids)
        words_ids = cap.strip(ids)[0] + [cap.spec.eos_id]
        words = [s.data.decode([t]) if s.data is not None and t != cap.spec.eos_id else ("<eos>" if t == cap.spec.eos_id else str(t)) for t in words_ids]
        name = list(r2)[-1] if r2 else None
        if not name or not r2[name].weights:
            return
        maps = per_token_maps(r2[name])[0, : len(words)]  # query t predicts word t (t+1 in ids)
        L = maps.shape[-1]
        if int(round(L ** 0.5)) ** 2 != L:
            return  # regions are not a square grid: nothing sensible to overlay
        pic = cap.pixels(img)[0]
        save(plot_word_maps(pic, words, list(maps.cpu().numpy()), f"attention per generated word ({name})"), path)
        artifacts["attention_words_png"] = path
        rec = r2[name]
        if rec.kind == "cross" and rec.weights[-1].dim() == 4:
            hp = s.output_path("attention_heads.png")
            heads = rec.weights[-1][0, :, : len(words)].float().cpu().numpy()  # (H, T, L)
            save(plot_head_maps(pic, words, heads, f"cross-attention per head ({name})"), hp)
            artifacts["attention_heads_png"] = hp

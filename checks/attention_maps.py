"""attention_maps: is the decoder's attention over image regions alive and well formed?

Weights are captured from cross-attention ``nn.MultiheadAttention`` calls and from additive
attention modules returning ``(context, alpha)`` (see ``capdiag.measure.attention``), on a model that
has learned (attention at init is legitimately near uniform). Findings: weights that do not
sum to one over regions (softmax over the wrong dimension), attention uniform over regions
(normalized entropy near 1) in every attention module, or identical for every word and
every image (the query never reaches the scores). Its artifacts hold the per-word maps of the
first image's caption (and per-head maps for transformer decoders) for ``capdiag.viz`` to draw.
The weights come from the same teacher-forced pass image_ablation measures its true loss in.
"""
from __future__ import annotations

from dataclasses import dataclass

from capdiag.measure.ablation import true_pass
from capdiag.measure.attention import attention_modules, attention_stats, judged_rows, per_token_maps
from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import locate, where_image_dies
from capdiag.registry import register_check
from capdiag.measure.trace import first_op, in_module, trace_call
from capdiag.measure.training import learned_of


@register_check
@dataclass
class AttentionMaps(Check):
    name = "attention_maps"
    subjects = ("captioner", "prompted")  # prompted: capdiag.prompted.verdicts.attention_maps
    catches = "attention softmax over the wrong dimension, uniform or query-independent attention"
    cheap = False
    live = True
    sum_tol: float = 1e-3
    uniform_entropy: float = 0.995
    identical_tv: float = 1e-3

    def run(self, s: Subject):
        if s.kind == "prompted":
            from capdiag.prompted import verdicts

            return verdicts.attention_maps(self, s)
        hinted = s.captioner.spec.attention_modules
        if hinted == []:
            return self.skip("the model declares no attention over image regions (attention_modules = [])")
        if not attention_modules(s.model, hinted):
            return self.skip("no attention modules found (nn.MultiheadAttention or modules named *att*)")
        learned = learned_of(s)
        if learned.unlearned:  # no verdict on a copy that did not learn
            return self.finding(Status.WARN, learned.inconclusive(), {"learned_loss": learned.loss, "blind_floor": learned.floor})
        cap, images, captions, source = learned
        _, recs = true_pass(s, cap, images, captions)
        if not recs:
            return self.skip("attention modules exist but returned no weights during forward")
        real = cap.real_mask(captions)
        stats = {n: attention_stats(judged_rows(r, real)) for n, r in recs.items()}
        metrics = {"mean_normalized_entropy": sum(st["normalized_entropy"] for st in stats.values()) / len(stats)}
        for n, st in stats.items():
            for k in ("max_sum_error", "normalized_entropy", "max_pairwise_tv"):
                metrics[f"{n}.{k}"] = st[k]
        artifacts = {"source": source} if s.live else {"source": source, **self._maps(cap, images, captions, recs, learned.decode)}
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
                location=locate(first_op(trace_call(cap, images, captions, seed=s.seed),
                                         lambda op: in_module(op, n) and "softmax" in op.func), cap.model,
                                f"normalizes the attention weights of {n}"),
            )
        if s.live:  # attention is legitimately diffuse early in training: only the softmax axis is judged
            return self.finding(Status.PASS, f"{len(stats)} attention modules sum to one ({source})", metrics)
        if all(st["normalized_entropy"] > self.uniform_entropy for st in stats.values()):
            ent = min(st["normalized_entropy"] for st in stats.values())
            return self.finding(
                Status.FAIL, f"attention is uniform over regions in every module (normalized entropy {ent:.3f}) "
                f"after training ({source})", metrics,
                "Scores are constant across regions: a missing tanh/score projection, scores multiplied by "
                "zero, or a temperature so high the softmax flattens.", artifacts,
                location=where_image_dies(cap, images, captions, s.seed, within=tuple(stats)),
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

    def _maps(self, cap, images, captions, recs, decode) -> dict:
        """Per-word maps of the first image's (teacher-forced) caption, from the pass already run."""
        name = list(recs)[-1]
        rec = recs[name]
        if rec.kind == "additive" and len({w.shape[0] for w in rec.weights}) > 1:
            return {}  # a length-sorted decoder recorded fewer rows per step: no per-image map
        ids = cap.strip(captions[:1])[0] + [cap.spec.eos_id]  # query t predicts token t+1 of the caption
        words = [("<eos>" if t == cap.spec.eos_id else decode([t])) for t in ids]
        maps = per_token_maps(rec)[0, : len(words)]
        L = maps.shape[-1]
        if int(round(L ** 0.5)) ** 2 != L:
            return {}  # regions are not a square grid: nothing sensible to overlay
        out = {"map_module": name, "map_words": words[: maps.shape[0]], "word_maps": maps.cpu(),
               "map_image": cap.pixels(images[:1])[0]}
        if rec.kind == "cross" and rec.weights[-1].dim() == 4:
            out["head_maps"] = rec.weights[-1][0, :, : len(words)].float().cpu()  # (H, T, L)
        return out

"""attribution: a gradient-based second opinion on "does it look at the image" (captum).

For one image and the caption the model generates for it, each word's log-probability is
attributed to the image pixels (Integrated Gradients from a zero image) and to the caption
prefix (Layer Integrated Gradients on the token embedding, from padding tokens). The image
share, sum|A_image| / (sum|A_image| + sum|A_prefix|), is reported per word and overall; a
decoder that never uses the image scores ~0. Works for models without explicit attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.registry import register_check
from capdiag.state import mode, seeded
from capdiag.training import learned


def token_embedding(model: nn.Module, vocab_size: int):
    """The caption embedding: the nn.Embedding with one row per vocabulary entry."""
    cands = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size]
    return cands[0] if cands else (None, None)


def _unused_is_zero(attribute, like):
    """An input the output does not depend on has zero attribution (autograd says "unused")."""
    try:
        return attribute()
    except RuntimeError as e:
        if "not have been used in the graph" not in str(e):
            raise
        return torch.zeros_like(like) if like is not None else None


@register_check
@dataclass
class Attribution(Check):
    name = "attribution"
    catches = "generated words owing nothing to the image (Integrated Gradients image share ~0)"
    cheap = False
    n_steps: int = 16
    min_image_share: float = 0.02

    def run(self, s: Subject):
        try:
            from captum.attr import IntegratedGradients, LayerIntegratedGradients
        except ImportError:  # pragma: no cover - captum is a core dependency
            return self.skip("captum is not installed")
        cap, images, captions, source = learned(s)
        emb_name, emb = token_embedding(cap.model, cap.spec.vocab_size)
        img = images[:1]
        with torch.no_grad(), seeded(s.seed), mode(cap.model, False):
            ids = cap.generate(img, max_len=cap.spec.max_len)
        n_words = len(cap.strip(ids)[0]) + 1  # words plus EOS
        n_words = min(n_words, ids.shape[1] - 1)
        if n_words < 1:
            return self.skip("the model generated an empty caption")

        def logp(images_, ids_, t):
            out = cap.logits(images_, ids_.expand(images_.shape[0], -1) if ids_.shape[0] == 1 else ids_)
            return torch.log_softmax(out[:, t].float(), -1).gather(1, ids_[:, t + 1 : t + 2].expand(out.shape[0], 1)).squeeze(1)

        img_shares, pixel_maps = [], []
        with seeded(s.seed), mode(cap.model, False):
            for t in range(n_words):
                ig = IntegratedGradients(lambda x: logp(x, ids, t))
                a_img = _unused_is_zero(lambda: ig.attribute(img.clone(), baselines=torch.zeros_like(img), n_steps=self.n_steps), img)
                img_mass = float(a_img.abs().sum())
                txt_mass = 0.0
                if emb is not None:
                    lig = LayerIntegratedGradients(lambda i, x: logp(x.expand(i.shape[0], -1, -1, -1), i, t), emb)
                    base = ids.clone()
                    base[:, 1:] = cap.spec.pad_id
                    a_txt = _unused_is_zero(lambda: lig.attribute(ids, baselines=base, additional_forward_args=(img,), n_steps=self.n_steps), None)
                    # only the prefix the word may see counts
                    txt_mass = 0.0 if a_txt is None else float(a_txt[:, : t + 1].abs().sum())
                total = img_mass + txt_mass
                img_shares.append(img_mass / total if total > 0 else 0.0)
                pixel_maps.append(a_img[0].abs().sum(0).detach().cpu())
        overall = sum(img_shares) / len(img_shares)
        metrics = {"image_share": overall, "image_share_min": min(img_shares), "image_share_max": max(img_shares)}
        words = [s.data.decode([w]) if s.data is not None else str(w) for w in cap.strip(ids)[0]] + ["<eos>"]
        artifacts = {"image_share_per_word": list(zip(words[:n_words], img_shares)), "source": source}
        path = s.output_path("attribution_pixels.png")
        if path is not None:
            from capdiag.viz.plots import plot_word_maps, save

            pic = cap.pixels(img)[0]
            labels = [f"{w} ({sh:.0%} img)" for w, sh in zip(words, img_shares)]
            maps = [(p / p.max().clamp_min(1e-12)).numpy() for p in pixel_maps]
            save(plot_word_maps(pic, labels, maps, "Integrated Gradients |attribution| per generated word", cmap="inferno", alpha=0.6), path)
            artifacts["attribution_png"] = path
        note = "" if emb is not None else " (no token embedding found: image attribution only)"
        if overall < self.min_image_share:
            return self.finding(
                Status.FAIL,
                f"generated words owe {overall:.1%} of their attribution to the image ({source}){note}",
                metrics,
                "The words come from the caption prefix alone: the image does not reach the decoder in a way "
                "that matters. See image_ablation, pretrained_guard and gradient_flow for where it is lost.", artifacts,
            )
        return self.finding(
            Status.PASS, f"image share of attribution {overall:.0%} (per word {min(img_shares):.0%}-{max(img_shares):.0%}){note}",
            metrics, artifacts=artifacts,
        )

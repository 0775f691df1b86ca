"""gradient_flow: per-layer gradient statistics and the classic bar plot, done right.

For every trainable parameter (biases included, None/zero gradients shown, not dropped as the
widely copied snippet does): mean |g|, max |g|, norm, and the update-to-weight ratio
||dW|| / ||W|| after one Adam step on a copy. Grouped by part (encoder / projection /
embedding / decoder / output). Findings: the image path receiving orders of magnitude less
gradient than the text path (the forum case: the encoder starves while the decoder learns
the caption prior), layers vanishing or exploding relative to the median layer, NaN/inf or
missing gradients, and update ratios far outside the usual band (1e-4 to 1e-1).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.probe import grads_of, param_part, trainable
from capdiag.registry import register_check
from capdiag.state import mode, seeded


def part_of(name: str, image_module: str | None) -> str:
    if image_module and (name == image_module or name.startswith(image_module + ".")):
        return "encoder"
    return param_part(name)


def gradient_stats(s: Subject, lr: float = 1e-3) -> list:
    """One row per trainable parameter: name, part, mean/max |g|, norm, update ratio."""
    cap = s.captioner
    with mode(cap.model, True), seeded(s.seed):
        grads = grads_of(cap, lambda: cap.loss(s.images, s.captions))
    # Update ratio: one Adam step on a copy, so the caller's weights and optimizer stay untouched.
    twin = copy.deepcopy(cap.model)
    named = dict(twin.named_parameters())
    opt = torch.optim.Adam([named[n] for n, _ in trainable(cap.model)], lr=lr)
    for n, p in trainable(cap.model):
        g = grads.get(n)
        named[n].grad = None if g is None else g.detach().clone()
    before = {n: named[n].detach().clone() for n, _ in trainable(cap.model)}
    opt.step()
    rows = []
    for n, p in trainable(cap.model):
        g = grads.get(n)
        w = float(before[n].float().norm())
        dw = float((named[n].detach() - before[n]).float().norm())
        row = {"name": n, "part": part_of(n, cap.spec.image_module), "numel": p.numel(),
               "update_ratio": dw / w if w > 0 else float("nan")}
        if g is None:
            row.update(mean_abs=0.0, max_abs=0.0, norm=0.0, flag="none")
        else:
            g = g.detach().float()
            finite = bool(torch.isfinite(g).all())
            row.update(mean_abs=float(g.abs().mean()), max_abs=float(g.abs().max()), norm=float(g.norm()),
                       flag="" if finite and bool(g.any()) else ("nonfinite" if not finite else "zero"))
        rows.append(row)
    return rows


def by_layer(rows: list) -> list:
    """Aggregate parameter rows per module (weight and bias together)."""
    layers: dict = {}
    for r in rows:
        mod = r["name"].rsplit(".", 1)[0] if "." in r["name"] else r["name"]
        L = layers.setdefault(mod, {"name": mod, "part": r["part"], "sum_abs": 0.0, "numel": 0, "max_abs": 0.0, "flags": []})
        L["sum_abs"] += r["mean_abs"] * r["numel"]
        L["numel"] += r["numel"]
        L["max_abs"] = max(L["max_abs"], r["max_abs"])
        if r["flag"]:
            L["flags"].append(r["flag"])
    out = []
    for L in layers.values():
        L["mean_abs"] = L["sum_abs"] / max(L["numel"], 1)
        L["flag"] = L["flags"][0] if L["flags"] else ""
        out.append(L)
    return out


@register_check
@dataclass
class GradientFlow(Check):
    name = "gradient_flow"
    catches = "encoder starved of gradient vs the decoder, vanishing/exploding layers, odd update ratios"
    starved_ratio: float = 1e-3  # image-path mean |g| over text-path mean |g| below this fails
    vanish: float = 1e-4  # layer mean |g| relative to the median layer
    explode: float = 1e4
    band: tuple = (1e-5, 1.0)  # update/weight ratios outside this warn (usual band ~1e-4..1e-1)

    def run(self, s: Subject):
        rows = gradient_stats(s)
        if not rows:
            return self.skip("the model has no trainable parameters")
        layers = by_layer(rows)
        means = [L["mean_abs"] for L in layers if L["mean_abs"] > 0]
        median = float(torch.tensor(means).median()) if means else 0.0
        for L in layers:
            if not L["flag"] and median > 0:
                rel = L["mean_abs"] / median
                L["flag"] = "vanishing" if rel < self.vanish else ("exploding" if rel > self.explode else "")

        def part_mean(parts):
            sel = [r for r in rows if r["part"] in parts]
            n = sum(r["numel"] for r in sel)
            return sum(r["mean_abs"] * r["numel"] for r in sel) / n if n else None

        img, txt = part_mean({"encoder", "projection"}), part_mean({"decoder", "embedding", "output"})
        metrics = {"median_layer_mean_abs_grad": median, "n_layers": len(layers)}
        for part in ("encoder", "projection", "embedding", "decoder", "output"):
            v = part_mean({part})
            if v is not None:
                metrics[f"mean_abs_grad_{part}"] = v
        ratio = None
        if img is not None and txt:
            ratio = img / txt
            metrics["image_over_text_grad"] = ratio
        ratios = [r["update_ratio"] for r in rows if math.isfinite(r["update_ratio"]) and r["update_ratio"] > 0]
        if ratios:
            metrics["median_log10_update_ratio"] = float(torch.tensor(ratios).log10().median())
        artifacts = {"layers": [{k: L[k] for k in ("name", "part", "mean_abs", "max_abs", "flag")} for L in layers]}
        path = s.output_path("gradient_flow.png")
        if path is not None:
            from capdiag.viz.plots import plot_gradient_flow, save

            save(plot_gradient_flow([L["name"] for L in layers], [L["mean_abs"] for L in layers],
                                    [L["max_abs"] for L in layers], [L["flag"] for L in layers],
                                    [L["part"] for L in layers], f"gradient flow per layer: {s.captioner.name}"), path)
            artifacts["gradient_flow_png"] = path
        bad = [L for L in layers if L["flag"] in ("none", "zero", "nonfinite")]
        if any(L["flag"] == "nonfinite" for L in bad):
            names = [L["name"] for L in bad if L["flag"] == "nonfinite"]
            return self.finding(Status.FAIL, f"NaN/inf gradients in {len(names)} layers: {', '.join(names[:4])}", metrics,
                                "Find the op with torch.autograd.detect_anomaly(); check log/div/sqrt near zero.", artifacts)
        if bad:
            names = [L["name"] for L in bad]
            return self.finding(Status.FAIL, f"{len(bad)} layers get no or all-zero gradient: {', '.join(names[:4])}", metrics,
                                "See gradient_reachability: detached/unused modules or a dead path.", artifacts)
        if ratio is not None and ratio < self.starved_ratio:
            return self.finding(
                Status.FAIL,
                f"the image path gets {ratio:.1e} of the text path's gradient (mean |g| {img:.2e} vs {txt:.2e}): "
                "the encoder is starved",
                metrics,
                "Gradient does not reach the encoder in useful amounts: saturated or clobbered encoder weights "
                "(custom init over pretrained layers), features multiplied by ~0 or detached, a dead ReLU after the "
                "projection. The plot shows where the gradient dies.", artifacts,
            )
        odd = [L["name"] for L in layers if L["flag"] in ("vanishing", "exploding")]
        band_lo, band_hi = self.band
        out_band = [r["name"] for r in rows if math.isfinite(r["update_ratio"]) and r["update_ratio"] > 0
                    and not band_lo <= r["update_ratio"] <= band_hi]
        if odd or out_band:
            parts = []
            if odd:
                parts.append(f"{len(odd)} layers vanish/explode relative to the median layer ({', '.join(odd[:3])})")
            if out_band:
                parts.append(f"{len(out_band)} parameters have update/weight ratios outside [{band_lo:g}, {band_hi:g}]")
            return self.finding(Status.WARN, "; ".join(parts), metrics,
                                "Check init scales and normalization around these layers; tune the learning rate "
                                "if update ratios sit far from ~1e-3.", artifacts)
        summary = f"gradients flow to all {len(layers)} layers"
        if ratio is not None:
            summary += f"; image path gets {ratio:.2g}x the text path's mean |g|"
        return self.finding(Status.PASS, summary, metrics, artifacts=artifacts)

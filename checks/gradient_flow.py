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

import math
from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.distributed import is_sharded
from capdiag.finding import Status
from capdiag.measure.gradients import (IMAGE_PATH, TEXT_PATH, by_layer, frozen_in_effect, gradient_metrics, gradient_rows,
                                part_mean_abs, step_grads, train_step_grads)
from capdiag.measure.gradient_path import owner_module, where_gradient_stops
from capdiag.measure.gradients import trainable
from capdiag.registry import register_check


def update_ratios(s: Subject, grads: dict, lr: float = 1e-3, eps: float = 1e-8) -> dict:
    """||dW|| / ||W|| per parameter for one Adam step from a fresh state, in closed form.

    Adam's first step (bias-corrected moments m = g, v = g^2) moves each weight by
    ``lr * g / (|g| + eps)``: no copy of the model and no optimizer are needed (the first
    ``torch.optim`` use imports torch._dynamo, 1.5 s), and nothing of the caller's is touched.
    """
    out = {}
    for n, p in trainable(s.captioner.model):
        g = grads.get(n)
        w = float(p.detach().float().norm())
        if g is None or w == 0:
            out[n] = 0.0 if g is None and w else float("nan")
            continue
        g = g.detach().float()
        out[n] = lr * float((g / (g.abs() + eps)).norm()) / w
    return out


@register_check
@dataclass
class GradientFlow(Check):
    name = "gradient_flow"
    subjects = ("captioner", "prompted")  # prompted: capdiag.prompted.verdicts.gradient_flow
    catches = "encoder starved of gradient vs the decoder, vanishing/exploding layers, odd update ratios"
    starved_ratio: float = 1e-3  # image-path mean |g| over text-path mean |g| below this fails
    vanish: float = 1e-4  # layer mean |g| relative to the median layer
    explode: float = 1e4
    band: tuple = (1e-5, 1.0)  # update/weight ratios outside this warn (usual band ~1e-4..1e-1)
    live_full: bool = False  # live: also max |g| and norms (two more passes over the gradients; for plots)

    live = True

    def reads_only(self, s: Subject) -> bool:
        return s.live  # live: statistics of the .grad the step left, nothing else

    def run(self, s: Subject):
        if s.kind == "prompted":
            from capdiag.prompted import verdicts

            return verdicts.gradient_flow(self, s)
        cap = s.captioner
        named = trainable(cap.model)
        if not named:
            return self.skip("the model has no trainable parameters")
        if s.live:  # the gradients the training step just produced; no backward of our own
            rows = gradient_rows(named, step_grads(named), cap.spec.image_module, is_sharded(cap.model), self.live_full)
            if all(r["flag"] == "none" for r in rows):
                return self.skip("no parameter has a .grad yet (call after backward, before zero_grad)")
            return self._live(rows)
        rows, layers, metrics = self._measure(s, named)
        artifacts = {"layers": _layer_table(layers), "model_name": cap.name}
        return self._verdict(s, rows, layers, metrics, artifacts)

    def _measure(self, s: Subject, named: list) -> tuple:
        """One training step's gradients: per parameter (``rows``) and per layer, flagged against the
        median layer; the metrics."""
        cap = s.captioner
        grads, _ = train_step_grads(s)
        rows = gradient_rows(named, grads, cap.spec.image_module)
        for r, ratio in zip(rows, update_ratios(s, grads).values()):
            r["update_ratio"] = ratio
        layers = by_layer(rows)
        means = [L["mean_abs"] for L in layers if L["mean_abs"] > 0]
        median = float(torch.tensor(means).median()) if means else 0.0
        for L in layers:
            if not L["flag"] and median > 0:
                rel = L["mean_abs"] / median
                L["flag"] = "vanishing" if rel < self.vanish else ("exploding" if rel > self.explode else "")
        metrics = {"median_layer_mean_abs_grad": median, "n_layers": len(layers), **gradient_metrics(rows)}
        ratios = [r["update_ratio"] for r in rows if math.isfinite(r["update_ratio"]) and r["update_ratio"] > 0]
        if ratios:
            metrics["median_log10_update_ratio"] = float(torch.tensor(ratios).log10().median())
        return rows, layers, metrics

    def _verdict(self, s: Subject, rows: list, layers: list, metrics: dict, artifacts: dict):
        cap = s.captioner
        ratio = metrics.get("image_over_text_grad")
        img, txt = part_mean_abs(rows, IMAGE_PATH), part_mean_abs(rows, TEXT_PATH)
        bad = [L for L in layers if L["flag"] in ("none", "zero", "nonfinite")]
        if any(L["flag"] == "nonfinite" for L in bad):
            names = [L["name"] for L in bad if L["flag"] == "nonfinite"]
            return self.finding(Status.FAIL, f"NaN/inf gradients in {len(names)} layers: {', '.join(names[:4])}", metrics,
                                "Find the op with torch.autograd.detect_anomaly(); check log/div/sqrt near zero.", artifacts)
        # A trunk the model itself keeps out of training (no_grad, or detached and held in eval mode by
        # its train()) gets no gradient by design: named in a warning, as gradient_reachability does.
        frozen = [m for m in frozen_in_effect(s) if m.deliberate]
        by_design = [L for L in bad if L["flag"] == "none" and any(
            L["name"] == m.module or L["name"].startswith(m.module + ".") for m in frozen)]
        bad = [L for L in bad if L not in by_design]
        if by_design:
            metrics["n_layers_frozen_by_design"] = len(by_design)
        if bad:
            names = [L["name"] for L in bad]
            cut = [n for n, p in cap.model.named_parameters() if p.requires_grad and owner_module(n) in names]
            return self.finding(Status.FAIL, f"{len(bad)} layers get no or all-zero gradient: {', '.join(names[:4])}", metrics,
                                "See gradient_reachability: detached/unused modules or a dead path.", artifacts,
                                location=None if s.live or not cut else where_gradient_stops(s, cut))
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
        if by_design:
            return self.finding(
                Status.WARN, f"{len(by_design)} layers get no gradient by design: "
                f"{'; '.join(f'{m.module} {m.how}' for m in frozen[:3])}; the rest of the model gets gradient",
                metrics, "Legal for a fixed feature extractor; if it is meant to fine-tune, remove the no_grad() or "
                ".detach() that cuts it off (see gradient_reachability).", artifacts)
        return self._scales(rows, layers, metrics, artifacts, ratio)

    def _scales(self, rows: list, layers: list, metrics: dict, artifacts: dict, ratio):
        """Every layer gets gradient: are the scales sane (layers against the median, update ratios)?"""
        odd = [L["name"] for L in layers if L["flag"] in ("vanishing", "exploding")]
        band_lo, band_hi = self.band
        # Judged only where there is a gradient to speak of: a bias before a softmax (shift-invariant)
        # gets a gradient of ~1e-11, pure rounding noise, which Adam turns into a step whose size
        # depends on the noise (and on the thread count), not on the model.
        param_means = [r["mean_abs"] for r in rows if r["mean_abs"] > 0 and math.isfinite(r["mean_abs"])]
        noise = 1e-6 * float(torch.tensor(param_means).median()) if param_means else 0.0
        out_band = [r["name"] for r in rows if math.isfinite(r["update_ratio"]) and r["update_ratio"] > 0
                    and r["mean_abs"] > noise and not band_lo <= r["update_ratio"] <= band_hi]
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

    def _live(self, rows: list):
        """During training: the statistics, and a verdict only on what is wrong at any step (NaN/inf)."""
        metrics = gradient_metrics(rows)
        # The per-layer table is only for the figure (live_full); the monitor reads metrics alone.
        artifacts = {"layers": _layer_table(by_layer(rows))} if self.live_full else {}
        bad = [r["name"] for r in rows if r["flag"] == "nonfinite"]
        if bad:
            return self.finding(Status.FAIL, f"NaN/inf gradients in {len(bad)} parameters, first {bad[0]}", metrics,
                                "Find the op with torch.autograd.detect_anomaly(); check log/div/sqrt near zero.", artifacts)
        return self.finding(Status.PASS, f"finite gradients in {len(rows)} parameters", metrics, artifacts=artifacts)


def _layer_table(layers: list) -> list:
    return [{k: L[k] for k in ("name", "part", "mean_abs", "max_abs", "flag")} for L in layers]

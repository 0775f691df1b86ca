"""Finding -> Figure: one ``plot_<check>(finding)`` per check that has something to draw.

Checks only compute; their findings carry the data to draw (detached CPU tensors, small lists)
in ``artifacts``. Front ends decide what to render: the CLI with ``--out``, the HTML report, the
TensorBoard sink. A run that asks for no pictures never imports matplotlib.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import plots


def plot_overfit(f, ax=None):
    a = f.artifacts
    if not a.get("losses"):
        return None
    return plots.plot_loss_curve(a["losses"], a.get("blind_floor"), a.get("pass_loss"),
                                 f"single-batch overfit: {a.get('model_name', '')}", a.get("sweep_curves"), ax=ax)


def plot_gradient_flow(f, ax=None):
    layers = f.artifacts.get("layers")
    if not layers:
        return None
    return plots.plot_gradient_flow([L["name"] for L in layers], [L["mean_abs"] for L in layers],
                                    [L["max_abs"] for L in layers], [L["flag"] for L in layers],
                                    [L["part"] for L in layers], f"gradient flow per layer: {f.artifacts.get('model_name', '')}",
                                    ax=ax)


def plot_image_ablation(f, ax=None):
    losses = f.artifacts.get("losses")
    if not losses:
        return None
    labels = list(losses)
    return plots.plot_bars([k.replace("_", "\n") for k in labels], [losses[k] for k in labels],
                           f"caption loss under image ablation (reliance {f.metrics.get('image_reliance', float('nan')):.2f})",
                           "loss (nats/token)", f.artifacts.get("blind_floor"), ax=ax)


def plot_attention_words(f, ax=None):
    a = f.artifacts
    if "word_maps" not in a:
        return None
    return plots.plot_word_maps(a["map_image"], a["map_words"], list(a["word_maps"].numpy()),
                                f"attention per caption word ({a['map_module']})")


def plot_attention_heads(f, ax=None):
    a = f.artifacts
    if "head_maps" not in a:
        return None
    return plots.plot_head_maps(a["map_image"], a["map_words"], a["head_maps"].numpy(), f"cross-attention per head ({a['map_module']})")


def plot_attribution(f, ax=None):
    a = f.artifacts
    if not a.get("pixel_maps"):
        return None
    labels = [f"{w} ({sh:.0%} img)" for w, sh in a["image_share_per_word"]]
    return plots.plot_word_maps(a["map_image"], labels, [m.numpy() for m in a["pixel_maps"]],
                                "Integrated Gradients |attribution| per generated word", cmap="inferno", alpha=0.6)


def plot_input_sanity(f, ax=None):
    a = f.artifacts
    if a.get("batch_images") is None:
        return None
    return plots.plot_image_grid(np.asarray(a["batch_images"]), a["batch_captions"],
                                 "the exact batch the checks used (de-normalized)")


# check -> [(artifact key of the written file, file name, plot function)]
PLOTS: dict = {
    "overfit": [("loss_curve_png", "overfit_loss.png", plot_overfit)],
    "gradient_flow": [("gradient_flow_png", "gradient_flow.png", plot_gradient_flow)],
    "image_ablation": [("ablation_png", "image_ablation.png", plot_image_ablation)],
    "attention_maps": [("attention_words_png", "attention_words.png", plot_attention_words),
                       ("attention_heads_png", "attention_heads.png", plot_attention_heads)],
    "attribution": [("attribution_png", "attribution_pixels.png", plot_attribution)],
    "input_sanity": [("batch_png", "input_batch.png", plot_input_sanity)],
}


def figures(finding) -> list:
    """``[(artifact key, file name, Figure)]`` for everything this finding can draw."""
    out = []
    for key, filename, fn in PLOTS.get(finding.check, []):
        fig = fn(finding)
        if fig is not None:
            out.append((key, filename, fig))
    return out


def render(finding, out_dir: Optional[Path], prefix: str = ""):
    """Write the finding's figures as PNGs into ``out_dir``; returns the finding with their paths in
    ``artifacts`` (``*_png``). Nothing is drawn when ``out_dir`` is None."""
    if out_dir is None or finding.check not in PLOTS:
        return finding
    paths = {}
    for key, filename, fig in figures(finding):
        paths[key] = plots.save(fig, Path(out_dir) / f"{prefix}{filename}")
    if not paths:
        return finding
    return dataclasses.replace(finding, artifacts={**finding.artifacts, **paths})


def renderer(out_dir: Optional[Path]) -> Callable:
    return lambda finding: render(finding, out_dir)

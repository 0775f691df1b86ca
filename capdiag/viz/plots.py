"""Plot functions: each takes plain data and returns a ``matplotlib.figure.Figure``.

Computing lives in checks; plotting lives here (``findings.py`` maps each check's finding to
these), so reports, TensorBoard and users can re-render findings without re-running anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _axes(w: float, h: float, ax=None):
    """A new one-axes figure, or the figure of the ``ax`` given (drawing into a caller's layout)."""
    if ax is not None:
        return ax.figure, ax
    fig = _figure(w, h)
    return fig, fig.add_subplot()


def save(fig, path: Optional[Path]) -> Optional[Path]:
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_loss_curve(losses: Sequence[float], floor: Optional[float] = None, threshold: Optional[float] = None,
                    title: str = "single-batch overfit", sweep: Optional[dict] = None, ax=None):
    fig, ax = _axes(7, 4, ax)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, np.maximum(np.asarray(losses, dtype=float), 1e-6), lw=1.5, label="train loss (this batch)")
    for lr, curve in (sweep or {}).items():
        ax.plot(np.arange(1, len(curve) + 1), np.maximum(curve, 1e-6), lw=0.8, alpha=0.6, label=f"sweep lr={lr:g}")
    if floor is not None:
        ax.axhline(floor, color="tab:red", ls="--", lw=1.2, label=f"image-blind floor {floor:.3f}")
    if threshold is not None:
        ax.axhline(threshold, color="tab:green", ls=":", lw=1.2, label=f"pass threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_gradient_flow(names: Sequence[str], mean_abs: Sequence[float], max_abs: Sequence[float],
                       flags: Sequence[str], parts: Sequence[str], title: str = "gradient flow per layer", ax=None):
    """Classic max/mean |grad| bars per layer (log scale); zero/None layers shown, not dropped."""
    from matplotlib.patches import Patch

    n = len(names)
    fig, ax = _axes(min(max(8, 0.16 * n + 3), 22), 6, ax)
    x = np.arange(n)
    nonzero = [v for v in list(mean_abs) + list(max_abs) if v and np.isfinite(v) and v > 0]
    floor = max(min(nonzero) / 100, 1e-12) if nonzero else 1e-12  # zero/None layers sit on the floor
    mx = np.maximum(np.nan_to_num(np.asarray(max_abs, float), nan=0.0, posinf=1e6), floor)
    mn = np.maximum(np.nan_to_num(np.asarray(mean_abs, float), nan=0.0, posinf=1e6), floor)
    part_colors = {"encoder": "tab:blue", "projection": "tab:purple", "embedding": "tab:olive",
                   "decoder": "tab:orange", "output": "tab:green"}
    ax.bar(x, mx, color="lightgray", width=0.9, label="max |grad|")
    ax.bar(x, mn, color=[part_colors.get(p, "tab:gray") for p in parts], width=0.6, label="mean |grad|")
    for i, f in enumerate(flags):
        if f:
            color = {"none": "black", "zero": "black", "nonfinite": "red", "vanishing": "tab:red",
                     "exploding": "darkred", "frozen_with_grad": "magenta"}.get(f, "black")
            ax.annotate(f, (i, floor * 3), rotation=90, fontsize=7, color=color, ha="center", va="bottom")
    ax.set_yscale("log")
    ax.set_ylim(floor, max(mx.max() * 10, 1e-6))
    step = max(1, n // 90)  # keep labels legible on deep encoders: label every step-th layer
    ax.set_xticks(x[::step])
    ax.set_xticklabels(list(names)[::step], rotation=90, fontsize=6)
    ax.set_xlim(-1, n)
    ax.set_ylabel("|gradient|")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color="lightgray", label="max |grad|")] + [Patch(color=c, label=f"mean |grad|: {p}") for p, c in part_colors.items() if p in set(parts)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_bars(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str, reference: Optional[float] = None,
              ax=None):
    fig, ax = _axes(6, 3.5, ax)
    colors = ["tab:green"] + ["tab:red"] * (len(values) - 1)
    ax.bar(labels, values, color=colors)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3f}", (i, v), ha="center", va="bottom", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="gray", ls="--", lw=1, label=f"image-blind floor of this batch {reference:.3f}")
        ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def plot_word_maps(image: np.ndarray, words: Sequence[str], maps: Sequence[np.ndarray], title: str = "",
                   cmap: str = "jet", alpha: float = 0.5):
    """The image, then one panel per word with its map upsampled over the image."""
    import torch
    import torch.nn.functional as F

    H, W = image.shape[:2]
    n = len(words) + 1
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig = _figure(2.2 * cols, 2.4 * rows)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    for ax, w, m in zip(axes[1:], words, maps):
        m = torch.as_tensor(np.asarray(m, dtype=np.float32))
        if m.dim() == 1:
            side = int(round(m.numel() ** 0.5))
            m = m[: side * side].view(side, side)
        up = F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
        ax.imshow(image)
        ax.imshow(up, cmap=cmap, alpha=alpha)
        ax.set_title(w, fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_image_grid(images: np.ndarray, captions: Sequence[str], title: str = ""):
    n = len(images)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = _figure(2.6 * cols, 2.8 * rows)
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.clip(images[i], 0, 1))
        ax.set_title(captions[i], fontsize=7, wrap=True)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_head_maps(image: np.ndarray, words: Sequence[str], maps: np.ndarray, title: str = "", cmap: str = "jet"):
    """Per-head cross-attention: one row per head, one column per word; maps (H, T, L)."""
    import torch
    import torch.nn.functional as F

    H, T = maps.shape[0], min(maps.shape[1], len(words))
    side = int(round(maps.shape[-1] ** 0.5))
    h, w = image.shape[:2]
    fig = _figure(1.6 * T + 0.6, 1.6 * H + 0.6)
    for i in range(H):
        for j in range(T):
            ax = fig.add_subplot(H, T, i * T + j + 1)
            m = torch.as_tensor(maps[i, j, : side * side], dtype=torch.float32).view(1, 1, side, side)
            up = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
            ax.imshow(image)
            ax.imshow(up, cmap=cmap, alpha=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(words[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(f"head {i}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_history(series: dict, threshold: Optional[float] = None, title: str = "", ylabel: str = "", ax=None):
    """Metric histories over training steps: ``{label: [(step, value), ...]}``."""
    fig, ax = _axes(6, 3.5, ax)
    for (label, points), marker in zip(series.items(), "osd^v"):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=marker, label=label)
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", ls="--", label="flag threshold")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig

"""input_sanity: what reaches the network is what the network expects.

Images are inspected where they enter the image module (after any preprocessing the model
does itself): 0-255 values, unnormalized 0-1 values, or normalization applied twice
(mean near -2, std near 4 for ImageNet statistics) all show in per-channel statistics.
Captions must start with BOS, contain an EOS, hold only padding after it, and stay inside
the vocabulary. A grid of the exact batch, de-normalized, with its decoded captions is saved.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.registry import register_check
from capdiag.state import mode


def image_entry_stats(s: Subject) -> dict:
    """Per-channel stats of the tensor entering the image module (or the model)."""
    cap = s.captioner
    seen = []
    target = cap.image_module() or cap.model
    handle = target.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()) if args else None)
    try:
        with torch.no_grad(), mode(cap.model, False):
            cap.logits(s.images, s.captions)
    finally:
        handle.remove()
    x = (seen[0] if seen else s.images).float()
    dims = (0, 2, 3) if x.dim() == 4 else tuple(range(x.dim()))
    return {"mean": x.mean(dims), "std": x.std(), "min": float(x.min()), "max": float(x.max()), "tensor": x}


def normalized_again(entry: torch.Tensor, given: torch.Tensor, spec) -> bool:
    """Whether the encoder sees ``(given - mean) / std``: the batch normalized a second time."""
    if entry.shape != given.shape or entry.dim() != 4 or entry.shape[1] != 3:
        return False
    m = torch.tensor(spec.image_mean, device=given.device).view(1, 3, 1, 1)
    sd = torch.tensor(spec.image_std, device=given.device).view(1, 3, 1, 1)
    if bool((m == 0).all()) and bool((sd == 1).all()):
        return False
    again = (given.float() - m) / sd
    return bool(torch.allclose(entry, again, atol=1e-3, rtol=1e-3)) and not torch.allclose(entry, given.float(), atol=1e-3)


def caption_problems(cap, captions: torch.Tensor) -> list:
    spec = cap.spec
    out = []
    if bool((captions < 0).any()) or bool((captions >= spec.vocab_size).any()):
        bad = captions[(captions < 0) | (captions >= spec.vocab_size)]
        out.append(f"token ids outside the vocabulary [0, {spec.vocab_size}): e.g. {int(bad[0])}")
    if not bool((captions[:, 0] == spec.bos_id).all()):
        n = int((captions[:, 0] != spec.bos_id).sum())
        out.append(f"{n} captions do not start with BOS ({spec.bos_id})")
    pos = torch.arange(captions.shape[1], device=captions.device)
    has_eos = ((captions == spec.eos_id) & (pos >= 1)).any(1)
    if not bool(has_eos.all()):
        out.append(f"{int((~has_eos).sum())} captions have no EOS ({spec.eos_id}) after BOS")
    if spec.pad_id != spec.eos_id:
        after = ~cap.real_mask(captions) & has_eos[:, None]
        if bool((captions[after] != spec.pad_id).any()):
            out.append("tokens other than padding follow EOS")
    return out


@register_check
@dataclass
class InputSanity(Check):
    name = "input_sanity"
    catches = "0-255 or unnormalized images, double normalization, malformed captions (no BOS/EOS, ids out of range)"

    def run(self, s: Subject):
        cap = s.captioner
        st = image_entry_stats(s)
        mean = st["mean"].abs().max().item() if st["mean"].dim() else abs(float(st["mean"]))
        std = float(st["std"])
        metrics = {"image_min": st["min"], "image_max": st["max"], "image_std": std, "image_abs_mean_max": mean}
        problems = []
        if st["max"] > 20:
            problems.append(f"images reach {st['max']:.0f}: raw 0-255 pixels (divide by 255 and normalize)")
        elif st["min"] >= 0 and st["max"] <= 1.0 and cap.spec.image_mean != (0.0, 0.0, 0.0):
            problems.append(f"images lie in [{st['min']:.2f}, {st['max']:.2f}]: not normalized with the encoder's mean/std")
        elif normalized_again(st["tensor"], s.images, cap.spec):
            problems.append(f"the encoder receives the batch normalized a second time (std {std:.2f}, range "
                            f"[{st['min']:.1f}, {st['max']:.1f}]): normalization applied twice")
        elif std > 3 or mean > 2:
            problems.append(f"image std {std:.1f} and channel mean up to {mean:.1f}: far from normalized inputs")
        problems += caption_problems(cap, s.captions)
        artifacts = {}
        path = s.output_path("input_batch.png")
        if path is not None:
            artifacts["batch_png"] = save_batch_grid(s, path)
        if problems:
            return self.finding(
                Status.FAIL, "; ".join(problems), metrics,
                "Feed the network what it was built for: float images normalized once with the encoder's "
                "mean/std (ImageNet for torchvision weights), captions as BOS ... EOS pad pad.", artifacts,
            )
        return self.finding(
            Status.PASS, f"images at the encoder: std {std:.2f}, range [{st['min']:.2f}, {st['max']:.2f}]; captions well formed",
            metrics, artifacts=artifacts,
        )


def save_batch_grid(s: Subject, path, n: int = 8):
    from capdiag.viz.plots import plot_image_grid, save

    imgs = s.captioner.pixels(s.images[:n])
    if s.data is not None:
        caps = [s.data.decode(c) for c in s.captioner.strip(s.captions[:n])]
    else:
        caps = [" ".join(map(str, c)) for c in s.captioner.strip(s.captions[:n])]
    return save(plot_image_grid(imgs, caps, "the exact batch the checks used (de-normalized)"), path)

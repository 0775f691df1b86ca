"""input_sanity: what reaches the network is what the network expects.

Pixel statistics are judged only on pixel tensors: the input of the first convolution (or
patch embedding) that receives a ``(B, 3, H, W)`` tensor, i.e. what the network sees after any
preprocessing the model does itself (``/ 255``, normalization inside ``forward``). The input of
``image_module`` is not a pixel tensor in general (a projection after pooled features sees ReLU
features). 0-255 values, unnormalized 0-1 values, or normalization applied twice (mean near -2,
std near 4 for ImageNet statistics) all show in per-channel statistics there.

capdiag never blames the user for its own batch: when the batch is capdiag's synthetic one, built
from *assumed* (not declared) normalization hints, a mismatch is a warning that says which hint
to declare; with declared hints it is a contradiction between the hints and the model, and fails.
Captions must start with BOS, contain an EOS, hold only padding after it, and stay inside the
vocabulary. A grid of the exact batch, de-normalized, with its decoded captions is saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.hooks import hooked
from capdiag.measure.localize import locate
from capdiag.registry import register_check
from capdiag.state import in_mode
from capdiag.measure.trace import first_op, trace_call


def pixel_entry(s: Subject) -> tuple[Optional[torch.Tensor], str]:
    """The tensor entering the first convolution that takes a (B, 3, H, W) input, and its module
    name; ``(None, "")`` when the forward runs no such convolution."""
    cap = s.captioner
    seen: list = []

    def hook(name):
        def fn(m, args):
            if not seen and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and args[0].shape[1] == 3:
                seen.append((args[0].detach().float().clone(), name))
        return fn

    convs = [(m, hook(name)) for name, m in cap.model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3]
    with hooked(convs, pre=True), torch.no_grad(), in_mode(cap.model, False):
        cap.logits(s.images, s.captions)
    return seen[0] if seen else (None, "")


def channel_stats(x: torch.Tensor) -> dict:
    return {"mean": x.mean((0, 2, 3)), "std": x.std(), "min": float(x.min()), "max": float(x.max()), "tensor": x}


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


def pixel_problems(st: dict, given: torch.Tensor, spec) -> list:
    mean = st["mean"].abs().max().item()
    std = float(st["std"])
    if st["max"] > 20:
        return [f"the network receives values up to {st['max']:.0f}: raw 0-255 pixels (divide by 255 and normalize)"]
    if st["min"] >= 0 and st["max"] <= 1.0 and spec.image_mean != (0.0, 0.0, 0.0):
        return [f"the network receives values in [{st['min']:.2f}, {st['max']:.2f}]: not normalized with the encoder's "
                f"mean/std"]
    if normalized_again(st["tensor"], given, spec):
        return [f"the network receives the batch normalized a second time (std {std:.2f}, range "
                f"[{st['min']:.1f}, {st['max']:.1f}]): normalization applied twice"]
    if std > 3 or mean > 2:
        return [f"image std {std:.1f} and channel mean up to {mean:.1f} at the network's input: far from normalized"]
    return []


@register_check
@dataclass
class InputSanity(Check):
    name = "input_sanity"
    subjects = ("captioner", "prompted")  # prompted: capdiag.prompted.verdicts.input_sanity
    catches = "0-255 or unnormalized images, double normalization, malformed captions (no BOS/EOS, ids out of range)"
    max_unknown: float = 0.2  # --data captions: more words than this mapped to the unknown token warns

    def run(self, s: Subject):
        if s.kind == "prompted":
            from capdiag.prompted import verdicts

            return verdicts.input_sanity(self, s)
        cap = s.captioner
        entry, where = pixel_entry(s)
        synthetic = s.batch_source == "synthetic"
        if entry is None and not synthetic:
            entry, where = s.images.detach().float(), "the images passed to the model"
        metrics, problems, notes = {}, [], []
        if entry is not None:
            st = channel_stats(entry)
            metrics = {"image_min": st["min"], "image_max": st["max"], "image_std": float(st["std"]),
                       "image_abs_mean_max": st["mean"].abs().max().item()}
            found = pixel_problems(st, s.images, cap.spec)
            if found and synthetic and not cap.spec.normalization_declared:
                return self.finding(
                    Status.WARN,
                    f"with capdiag's synthetic batch (normalized with ImageNet mean/std, assumed: no image_mean/image_std "
                    f"hints), at {where}: {found[0]}", metrics,
                    "capdiag built this batch, so this says nothing about your data yet: declare how your model wants "
                    "its images (CAPDIAG image_mean/image_std; (0, 0, 0)/(1, 1, 1) when forward normalizes itself, "
                    "pixel_scale=255 when it divides by 255) or give sample_batch().",
                )
            problems += [f"{p} (at {where})" for p in found]
        else:
            notes.append(" (no convolution takes a (B, 3, H, W) input: capdiag's own synthetic images are not judged)")
        if not synthetic:  # capdiag's own captions are well formed by construction
            problems += caption_problems(cap, s.captions)
        artifacts = batch_preview(s)
        if problems:
            where_from = None
            if any("normalization applied twice" in p for p in problems):  # the model's own code does it again
                trace = trace_call(cap, s.images.clone(), s.captions.clone(), seed=s.seed, protect=False)
                where_from = locate(first_op(trace, lambda op: ("input", "images") in op.inputs
                                             and not op.func.startswith("new_")), cap.model,
                                    "the model's first operation on the already normalized images")
            return self.finding(
                Status.FAIL, "; ".join(problems), metrics,
                "Feed the network what it was built for: float images normalized once with the encoder's "
                "mean/std (ImageNet for torchvision weights), captions as BOS ... EOS pad pad.", artifacts,
                location=where_from,
            )
        unknown = unknown_rate(s)
        if unknown is not None:
            metrics["unknown_word_rate"] = unknown
            if unknown > self.max_unknown:
                return self.finding(
                    Status.WARN, f"{unknown:.0%} of the caption words in the batch are unknown to {s.dataset.tokenizer.name} "
                    f"(its unknown token): the model cannot learn or be judged on words it never sees", metrics,
                    "Pass the tokenizer the model was trained with (--tokenizer), or rebuild the word map from these "
                    "captions; a word map from another dataset maps most words to <unk>.", artifacts)
        if entry is None:
            return self.finding(Status.PASS, "captions well formed" + notes[0], metrics, artifacts=artifacts)
        return self.finding(
            Status.PASS, f"images at {where}: std {metrics['image_std']:.2f}, range [{metrics['image_min']:.2f}, "
                         f"{metrics['image_max']:.2f}]; captions well formed",
            metrics, artifacts=artifacts,
        )


def unknown_rate(s: Subject) -> Optional[float]:
    """Fraction of the batch's real target tokens that are the tokenizer's unknown token (``--data``
    only, and only for tokenizers that have one); None otherwise."""
    unk = getattr(s.dataset.tokenizer, "unk_id", None) if s.dataset is not None else None
    if unk is None or unk in s.captioner.spec.special_ids:
        return None
    targets, mask = s.captions[:, 1:], s.captioner.target_mask(s.captions)
    return float(((targets == unk) & mask).sum()) / max(int(mask.sum()), 1)


def batch_preview(s: Subject, n: int = 8) -> dict:
    """The first ``n`` images (de-normalized, (n, H, W, 3)) and captions, for ``viz`` to draw."""
    imgs = s.captioner.pixels(s.images[:n])
    caps = [s.decode(c) for c in s.captioner.strip(s.captions[:n])]
    return {"batch_images": imgs, "batch_captions": caps}

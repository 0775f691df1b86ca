"""How well does the image-reliance score separate image-using from image-blind captioners?

Trains N pairs of small captioners on fresh synthetic batches (each pair: the same
architecture, seed and recipe; one reads the image, its twin cannot: the decoder receives
zeroed or vanishingly scaled features), then scores each on a held-out batch with
``1 - L_true / L_shuffled`` and reports the AUROC over all pairs, plus the score's cost
relative to one evaluation pass, measured side by side in this run.

    python benchmarks/reliance_auroc.py --pairs 24 --steps 150
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from capdiag.captioner import Captioner, CaptionSpec
from capdiag.measure.ablation import derangement
from capdiag.intake.data import SyntheticCaptions
from capdiag.testing import zoo
from capdiag.state import in_mode


def auroc(pos: list, neg: list) -> float:
    """Mann-Whitney U / (|pos| |neg|): P(score of a positive > score of a negative), ties half."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def train(model, data, steps: int, seed: int, batch: int = 32):
    cap = Captioner(model, CaptionSpec(zoo.VOCAB, zoo.PAD, zoo.BOS, zoo.EOS, image_size=32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        images, captions = data.batch(batch, seed=seed * 10_000 + step)
        loss = cap.loss(images, captions)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cap


@torch.no_grad()
def reliance(cap, images, captions) -> float:
    with in_mode(cap.model, False):
        true = float(cap.loss(images, captions))
        shuffled = float(cap.loss(derangement(images), captions))
    return 1 - true / shuffled


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = SyntheticCaptions(zoo.VOCAB, zoo.PAD, zoo.BOS, zoo.EOS, image_size=32)
    held_images, held_captions = data.batch(64, seed=999_999)
    using, blind, rows = [], [], []
    t0 = time.perf_counter()
    for i in range(args.pairs):
        arch = zoo.ARCHS[i % 3]
        blind_bug = ("image_blind", "starved_image")[i % 2]
        scores = []
        for bug in (None, blind_bug):
            torch.manual_seed(i)
            cap = train(zoo.ZooCaptioner(arch, bug), data, args.steps, seed=i)
            scores.append(reliance(cap, held_images, held_captions))
        using.append(scores[0])
        blind.append(scores[1])
        rows.append((i, arch, blind_bug, scores[0], scores[1]))
        print(f"pair {i:2d} {arch:<11} twin={blind_bug:<14} reliance using={scores[0]:.3f} blind={scores[1]:.3f}", flush=True)
    # Cost of the score vs one evaluation pass, side by side on the same trained model.
    cap = train(zoo.ZooCaptioner("transformer"), data, 20, seed=0)
    def eval_pass():
        with torch.no_grad(), in_mode(cap.model, False):
            cap.loss(held_images, held_captions)
    def score_pass():
        reliance(cap, held_images, held_captions)
    ratios = []
    for _ in range(7):
        a = time.perf_counter(); [eval_pass() for _ in range(10)]; b = time.perf_counter()
        [score_pass() for _ in range(10)]; c = time.perf_counter()
        ratios.append((c - b) / (b - a))
    print()
    print(f"pairs: {args.pairs}, training steps per model: {args.steps}, wall time {time.perf_counter() - t0:.0f}s")
    print(f"image-using reliance: median {statistics.median(using):.3f}, min {min(using):.3f}")
    print(f"image-blind reliance: median {statistics.median(blind):.3f}, max {max(blind):.3f}")
    print(f"AUROC: {auroc(using, blind):.4f}")
    print(f"cost of the score (true + shuffled forward) / one evaluation pass: {statistics.median(ratios):.2f}x "
          f"(1 extra forward pass)")


if __name__ == "__main__":
    main()

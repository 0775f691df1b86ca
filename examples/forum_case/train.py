"""Train the forum-case captioner with capdiag watching, then zero the image as its author did.

    python examples/forum_case/train.py [--fixed] [--steps 300]

The buggy model's loss falls, yet zeroing the images changes nothing; capdiag's hook flags the
image-ignoring decoder during training. The fixed model's loss falls further and depends on
the image.
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch

import capdiag
from capdiag.captioner import IMAGENET_MEAN, IMAGENET_STD, Captioner, CaptionSpec
from capdiag.intake.data import SyntheticCaptions

sys.path.insert(0, str(Path(__file__).parent))
from model import CAPDIAG, build_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixed", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--log-dir", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(fixed=args.fixed)
    data = SyntheticCaptions(CAPDIAG["vocab_size"], image_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    cap = Captioner(model, CaptionSpec(CAPDIAG["vocab_size"]))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    probe = data.batch(16, seed=12345)
    diag = capdiag.TrainingDiagnostics(model, probe, every=25, warmup=100, image_module="encoder",
                                       log_dir=args.log_dir, action="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", capdiag.CapdiagWarning)
        for step in range(args.steps):
            images, captions = data.batch(16, seed=step)
            loss = cap.loss(images, captions)
            opt.zero_grad()
            loss.backward()
            diag.after_backward(step)
            opt.step()
            diag.after_step(step, loss.detach())
            if step % 50 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.3f}")
    diag.close()
    for w in caught:
        print(f"WARNING {w.message}")
    images, captions = probe
    model.eval()
    with torch.no_grad():
        real = cap.loss(images, captions).item()
        zeroed = cap.loss(torch.zeros_like(images), captions).item()
    print(f"probe loss with the images {real:.3f}, with zeroed images {zeroed:.3f}")
    print("flags:", [f"{kind} at step {step}" for step, kind, _ in diag.flags] or "none")
    return diag.flags


if __name__ == "__main__":
    main()

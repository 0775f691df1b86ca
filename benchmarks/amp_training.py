"""Train reference captioners with TrainingDiagnostics under mixed precision (CUDA bf16 autocast
or CPU) and report whether the image-ignoring flag fires: it must for the clobbered twin only.

    python benchmarks/amp_training.py --steps 300
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import capdiag
from capdiag.captioner import Captioner, CaptionSpec, IMAGENET_MEAN, IMAGENET_STD
from capdiag.intake.data import SyntheticCaptions
from capdiag.models import cnn_transformer, show_attend_tell


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = SyntheticCaptions(32, image_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    probe = tuple(t.to(dev) for t in data.batch(16, seed=12345))
    runs = [
        ("cnn_transformer (efficientnet_lite0)", lambda: cnn_transformer.build_model(encoder="efficientnet_lite0")),
        ("cnn_transformer xavier twin", lambda: cnn_transformer.build_model(bug="xavier_init_clobbers_encoder")),
        ("show_attend_tell (efficientnet_lite0)", lambda: show_attend_tell.build_model(encoder="efficientnet_lite0")),
        ("show_attend_tell xavier twin", lambda: show_attend_tell.build_model(bug="xavier_init_clobbers_encoder")),
    ]
    print(f"device {dev}, bf16 autocast, batch {args.batch}, {args.steps} steps")
    for name, build in runs:
        torch.manual_seed(0)
        model = build().to(dev)
        cap = Captioner(model, CaptionSpec(32))
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        diag = capdiag.TrainingDiagnostics(model, probe, every=25, warmup=100, image_module="encoder")
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(args.steps):
                images, captions = (x.to(dev) for x in data.batch(args.batch, seed=step))
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    loss = cap.loss(images, captions)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                diag.after_backward(step)
                opt.step()
                diag.after_step(step, loss.detach())
        rel = diag.history["image_ablation/image_reliance"][-1][1]
        flags = [(s, k) for s, k, _ in diag.flags]
        print(f"{name:<40} final loss {float(loss):.3f}  reliance {rel:8.3f}  flags {flags}  {time.perf_counter() - t:.1f}s")
        diag.close()


if __name__ == "__main__":
    main()

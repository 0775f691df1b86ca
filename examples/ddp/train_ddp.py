"""capdiag's training hook inside a DDP job (gloo on CPU, nccl on GPUs).

    torchrun --standalone --nproc_per_node 2 examples/ddp/train_ddp.py --out runs/ddp --bug starved_image

Every rank trains on its own data; gradients are synchronized by DDP, probe metrics are
averaged over ranks by capdiag, only rank 0 writes TensorBoard files, and a stop decision
reaches every rank. Each rank writes a small JSON summary so tests can compare ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import capdiag
from capdiag.captioner import Captioner, CaptionSpec
from capdiag.intake.data import SyntheticCaptions
from capdiag.testing import zoo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bug", default=None)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)  # same initial weights on every rank
    model = zoo.ZooCaptioner("gru", args.bug).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    data = SyntheticCaptions(zoo.VOCAB, image_size=32)
    probe = [t.to(device) for t in data.batch(16, seed=10_000 + rank)]  # each rank probes its own images
    diag = capdiag.TrainingDiagnostics(ddp, probe, every=20, warmup=60, action="stop", image_module="encoder",
                                       log_dir=str(Path(args.out) / "tb"))
    cap = Captioner(ddp, CaptionSpec(zoo.VOCAB))
    opt = torch.optim.Adam(ddp.parameters(), 3e-3)
    step = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(args.steps):
            images, captions = (t.to(device) for t in data.batch(16, seed=step * world + rank))
            loss = cap.loss(images, captions)
            opt.zero_grad()
            loss.backward()
            diag.after_backward(step)
            opt.step()
            diag.after_step(step, loss.detach())
            if diag.should_stop:
                break
    diag.close()
    summary = {
        "rank": rank, "stopped_at": step, "should_stop": diag.should_stop, "wrote": diag.writer is not None,
        "reliance": [v for _, v in diag.history["image_ablation/image_reliance"]],
        "grad_norm_decoder": [v for _, v in diag.history["gradient_flow/rms_grad_decoder"]],
        "flags": [k for _, k, _ in diag.flags],
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(summary))
    dist.barrier()  # no rank tears down gloo's connections while another is still using them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

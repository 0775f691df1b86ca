"""capdiag's training hook under fully sharded data parallelism (FSDP2 ``fully_shard``, or FSDP1),
gloo on CPU and nccl on GPUs, on the CLIP-conditioned reference captioner.

    torchrun --standalone --nproc_per_node 2 examples/fsdp/train_fsdp.py --out runs/fsdp
    torchrun --standalone --nproc_per_node 2 examples/fsdp/train_fsdp.py --out runs/fsdp1 --fsdp 1
    python examples/fsdp/train_fsdp.py --out runs/single      # the same training in one process

Every decoder layer and the root are sharded with ``fully_shard``. Each step draws
one global batch; rank r trains on its contiguous share, and the single-process run averages the
per-share losses, so both compute the same gradients (dropout is off and the model has no
BatchNorm, so nothing else differs). Every rank probes the same probe batch. Each rank writes a
JSON summary (the monitor's history and flags) and its local parameter shards, so tests can
compare ranks, processes, and runs with and without the monitor.
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
from capdiag.distributed import local_shard, sharding_state
from capdiag.models import clip_decoder


def shard(model, fsdp: int):
    if fsdp == 2:
        from torch.distributed.fsdp import fully_shard

        for layer in model.text.decoder.layers:
            fully_shard(layer)
        # The CLIP tower stays with the root: forward calls its post_layernorm and visual_projection
        # outside the vision transformer's own forward, where a separately sharded tower is resharded.
        fully_shard(model)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    # FSDP1 needs an accelerator: on CPU, torch 2.14.1 refuses ("FSDP needs a non-CPU accelerator device").
    return FSDP(model, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({torch.nn.TransformerDecoderLayer}),
                device_id=next(model.parameters()).device)


def train(args, distributed, rank, world, device, monitored):
    """One training run from the same initial weights; returns (model, diagnostics or None)."""
    torch.manual_seed(0)  # the same initial weights everywhere
    model = clip_decoder.build_model(bug=args.bug, dropout=0.0).to(device)
    hints = {**clip_decoder.CAPDIAG, "image_module": "clip.vision_model"}
    if distributed:
        model = shard(model, args.fsdp)
    data = SyntheticCaptions(hints["vocab_size"], hints["pad_id"], hints["bos_id"], hints["eos_id"], hints["image_size"],
                             hints["image_mean"], hints["image_std"])
    probe = [t.to(device) for t in data.batch(16, seed=10_000)]  # the same probe batch on every rank
    diag = None
    if monitored:
        diag = capdiag.TrainingDiagnostics(model, probe, every=args.every, warmup=args.warmup, action="warn",
                                           log_dir=str(Path(args.out) / "tb"), figures=False,
                                           **{k: v for k, v in hints.items() if k not in ("image_size",)})
    cap = Captioner(model, CaptionSpec(hints["vocab_size"], hints["pad_id"], hints["bos_id"], hints["eos_id"]))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    share = args.batch // 2  # two shares: the two ranks, or the two halves of the single-process loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(args.steps):
            images, captions = (t.to(device) for t in data.batch(args.batch, seed=step))
            if distributed:
                part = slice(rank * share, (rank + 1) * share)
                loss = cap.loss(images[part], captions[part])
                global_loss = loss.detach().clone()
                dist.all_reduce(global_loss)
                global_loss /= world
            else:
                loss = sum(cap.loss(images[i * share:(i + 1) * share], captions[i * share:(i + 1) * share])
                           for i in range(2)) / 2
                global_loss = loss.detach()
            opt.zero_grad()
            loss.backward()
            if diag:
                diag.after_backward(step)
            opt.step()
            if diag:
                before = sharding_state(model)
                diag.after_step(step, global_loss)
                if sharding_state(model) != before:  # the probe must leave no parameters unsharded
                    diag.sharding_changed = getattr(diag, "sharding_changed", 0) + 1
    return model, diag



def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bug", default=None)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--fsdp", type=int, choices=(1, 2), default=2)
    ap.add_argument("--also-without-monitor", action="store_true",
                    help="train a second time without capdiag and save those shards too (bitwise comparison)")
    args = ap.parse_args(argv)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for monitored in (True, False) if args.also_without_monitor else (True,):
        model, diag = train(args, distributed, rank, world, device, monitored)
        summary = {"rank": rank, "world": world, "flags": [], "history": {}}
        if diag:
            diag.close()
            summary.update(flags=[(s, k) for s, k, _ in diag.flags], wrote=diag.writer is not None,
                           sharding_changed_by_probe=getattr(diag, "sharding_changed", 0), sharded=sharding_state(model),
                           history={k: list(v) for k, v in diag.history.items()})
            (out / f"rank{rank}.json").write_text(json.dumps(summary))
        shards = {n: local_shard(p.detach()).cpu().clone() for n, p in model.named_parameters()}
        torch.save(shards, out / f"params{rank}{'' if monitored else '_unmonitored'}.pt")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

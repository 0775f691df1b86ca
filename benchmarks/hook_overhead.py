"""Per-step overhead of capdiag's training hooks, measured side by side in one run.

For each reference model, the same training loop runs in interleaved rounds under each
configuration; the table reports median step time relative to the plain loop:

  default cadence   TrainingDiagnostics(every=100): gradient norms and probes every 100 steps
  grads every step  grad_every=1, probes every 100 steps (the cheapest every-step mode)
  probe every step  every=1: reliance probe (2-3 eval forwards) and gradient norms each step
  TB histograms     SummaryWriter.add_histogram of every gradient each step (common practice)
  classic loop      the widely copied named_parameters() loop: mean/max |grad| per layer via .item()

Ratios compare mean step times of separate runs (noisy on shared machines: +-5 %); for the
capdiag configurations the time spent inside the hook calls is also reported as a share of
the remaining step time of the same run, which is the precise overhead.

    python benchmarks/hook_overhead.py --steps 40 --rounds 5 [--device cuda] [--amp]
    python benchmarks/hook_overhead.py --fsdp2 --steps 100 --rounds 3   # 2 gloo processes, FSDP2

``--fsdp2`` relaunches itself under torchrun: the CLIP-conditioned reference sharded with
``fully_shard`` (per decoder layer and the root), plain vs the default cadence, interleaved; rank 0
prints the ratio and the share of step time spent inside the hooks (max over ranks).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

import capdiag
from capdiag.captioner import Captioner, CaptionSpec
from capdiag.intake.data import SyntheticCaptions
from capdiag.models import cnn_transformer, show_attend_tell
from capdiag.testing import zoo

MODELS = {
    "zoo_gru": (lambda: zoo.ZooCaptioner("gru"), 32, zoo.VOCAB),
    "zoo_transformer": (lambda: zoo.ZooCaptioner("transformer"), 32, zoo.VOCAB),
    "show_attend_tell": (lambda: show_attend_tell.build_model(), 64, 32),
    "cnn_transformer": (lambda: cnn_transformer.build_model(), 64, 32),
}
CONFIGS = ("plain", "default cadence", "grads every step", "probe every step", "TB histograms", "classic loop")


def classic_grad_stats(model):
    ave, mx = [], []
    for n, p in model.named_parameters():
        if p.requires_grad and "bias" not in n and p.grad is not None:
            ave.append(p.grad.abs().mean().item())
            mx.append(p.grad.abs().max().item())
    return ave, mx


def run(config, build, image_size, vocab, steps, device, amp, batches, probe, tmp):
    torch.manual_seed(0)
    model = build().to(device)
    cap = Captioner(model, CaptionSpec(vocab))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    scaler = torch.amp.GradScaler(enabled=amp)
    diag = writer = None
    if config == "default cadence":
        diag = capdiag.TrainingDiagnostics(model, probe, every=100, warmup=10**9, image_module="encoder", log_dir=tmp)
    elif config == "grads every step":
        diag = capdiag.TrainingDiagnostics(model, probe, every=100, grad_every=1, warmup=10**9, image_module="encoder", log_dir=tmp)
    elif config == "probe every step":
        diag = capdiag.TrainingDiagnostics(model, probe, every=1, warmup=10**9, image_module="encoder", log_dir=tmp, figures=False)
    elif config == "TB histograms":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(tmp)
    model.train()
    times, hook_times = [], []
    for step in range(steps):
        images, captions = batches[step % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cuda" else torch.bfloat16, enabled=amp):
            loss = cap.loss(images, captions)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        h = 0.0
        if diag:
            t_h = time.perf_counter()
            diag.after_backward(step + 1)  # +1: the probe at step 0 would land in every config's first step
            h += time.perf_counter() - t_h
        elif writer is not None:
            for n, p in model.named_parameters():
                if p.grad is not None:
                    writer.add_histogram(n, p.grad, step)
        elif config == "classic loop":
            classic_grad_stats(model)
        scaler.step(opt)
        scaler.update()
        if diag:
            t_h = time.perf_counter()
            diag.after_step(step + 1, loss.detach())
            if device.type == "cuda":
                torch.cuda.synchronize()
            h += time.perf_counter() - t_h
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        hook_times.append(h)
    if diag:
        diag.close()
    if writer:
        writer.close()
    return times[3:], hook_times[3:]  # drop warm-up steps


def fsdp2_worker(steps, rounds, every):
    """One rank of the FSDP2 measurement (started by torchrun)."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from capdiag.models import clip_decoder

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    h = clip_decoder.CAPDIAG
    data = SyntheticCaptions(h["vocab_size"], h["pad_id"], h["bos_id"], h["eos_id"], h["image_size"], h["image_mean"], h["image_std"])
    batches = [data.batch(8, seed=s * world + rank) for s in range(8)]
    probe = data.batch(16, seed=999)
    per, share = {"plain": [], "default cadence": []}, [0.0, 0.0]
    for _ in range(rounds):
        for config in per:
            torch.manual_seed(0)
            model = clip_decoder.build_model()
            for layer in model.text.decoder.layers:
                fully_shard(layer)
            fully_shard(model)
            cap = Captioner(model, CaptionSpec(h["vocab_size"], h["pad_id"], h["bos_id"], h["eos_id"]))
            opt = torch.optim.AdamW(model.parameters(), 1e-3)
            diag = None
            if config != "plain":
                diag = capdiag.TrainingDiagnostics(model, probe, every=every, warmup=10**9, figures=False,
                                                   **{k: v for k, v in h.items() if k != "image_size"})
            for step in range(steps):
                images, captions = batches[step % len(batches)]
                dist.barrier()
                t = time.perf_counter()
                loss = cap.loss(images, captions)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                hook = 0.0
                if diag:
                    t_h = time.perf_counter()
                    diag.after_backward(step + 1)
                    hook += time.perf_counter() - t_h
                opt.step()
                if diag:
                    t_h = time.perf_counter()
                    diag.after_step(step + 1, loss.detach())
                    hook += time.perf_counter() - t_h
                dt = time.perf_counter() - t
                if step >= 3:
                    per[config].append(dt)
                    if diag:
                        share[0] += hook
                        share[1] += dt - hook
                        if hook > 0.005 and os.environ.get("CAPDIAG_DEBUG_HOOKS"):
                            print(f"rank {rank} step {step} hook {hook * 1e3:.1f} ms", flush=True)
            if diag:
                diag.close()
    t = torch.tensor([statistics.mean(per["plain"]), statistics.mean(per["default cadence"]), share[0] / share[1]],
                     dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"FSDP2, {world} gloo processes, CLIP-conditioned reference, batch 8 per rank, {steps} steps x {rounds} rounds")
        print("| model | step (ms) | default cadence (every %d) |" % every)
        print("|---|---|---|")
        print(f"| clip_decoder, FSDP2 x{world} | {t[0] * 1e3:.1f} | {t[1] / t[0]:.3f}x ({100 * t[2]:.2f}% in hooks) |")
    dist.destroy_process_group()


def main():
    import os
    import sys

    if os.environ.get("CAPDIAG_FSDP2_WORKER"):
        steps, rounds, every = map(int, os.environ["CAPDIAG_FSDP2_WORKER"].split(","))
        warnings.simplefilter("ignore")
        return fsdp2_worker(steps, rounds, every)
    ap = argparse.ArgumentParser()
    ap.add_argument("--fsdp2", action="store_true", help="measure under FSDP2 with 2 gloo processes (CPU)")
    ap.add_argument("--every", type=int, default=100, help="probe cadence for --fsdp2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    if args.fsdp2:
        import subprocess

        env = {**os.environ, "CAPDIAG_FSDP2_WORKER": f"{args.steps},{args.rounds},{args.every}", "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               __file__], env=env, check=True).returncode
    device = torch.device(args.device)
    warnings.simplefilter("ignore")
    print(f"device {device}, amp {args.amp}, batch {args.batch}, {args.steps} steps x {args.rounds} interleaved rounds")
    print("| model | step (ms) | " + " | ".join(CONFIGS[1:]) + " |")
    print("|---|---|" + "---|" * (len(CONFIGS) - 1))
    for name in args.models.split(","):
        build, size, vocab = MODELS[name]
        data = SyntheticCaptions(vocab, image_size=size)
        batches = [tuple(t.to(device) for t in data.batch(args.batch, seed=s)) for s in range(8)]
        probe = tuple(t.to(device) for t in data.batch(16, seed=999))
        per = {c: [] for c in CONFIGS}
        share = {c: [0.0, 0.0] for c in CONFIGS}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.rounds):  # interleave configs so machine noise hits them alike
                for c in CONFIGS:
                    ts, hs = run(c, build, size, vocab, args.steps, device, args.amp, batches, probe, f"{tmp}/{c}")
                    per[c] += ts
                    share[c][0] += sum(hs)
                    share[c][1] += sum(ts) - sum(hs)
        base = statistics.median(per["plain"])
        # Mean, not median, for hooked configs: a probe every 100 steps is an outlier a median would hide.
        cells = [f"{statistics.mean(per[c]) / statistics.mean(per['plain']):.3f}x" for c in CONFIGS[1:]]
        # The time spent inside the hook calls over the rest of the same steps: the overhead
        # measured within one loop, free of the run-to-run noise of the ratios above.
        for i, c in enumerate(CONFIGS[1:4]):
            cells[i] += f" ({100 * share[c][0] / share[c][1]:.2f}% in hooks)"
        print(f"| {name} | {base * 1e3:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

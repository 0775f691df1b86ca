"""The CLIP-conditioned reference trained with Lightning's FSDP2 strategy (``ModelParallelStrategy``,
``fully_shard`` in ``configure_model``), watched by capdiag's callback; runs on CPU with 2 processes.

    python examples/lightning/train_fsdp.py --out runs/lightning_fsdp [--bug image_not_fed]

(``strategy="fsdp"`` is FSDP1, which needs an accelerator in torch 2.14.1.) Lightning starts the
second process itself; each rank writes a JSON summary of the callback's flags and history.
"""
import argparse
import json
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from capdiag.callbacks.lightning import CapdiagCallback
from capdiag.captioner import Captioner, CaptionSpec
from capdiag.intake.data import SyntheticCaptions
from capdiag.models import clip_decoder

H = clip_decoder.CAPDIAG


class ClipModule(L.LightningModule):
    def __init__(self, bug=None):
        super().__init__()
        torch.manual_seed(0)
        self.model = clip_decoder.build_model(bug=bug, dropout=0.0)
        self.cap = Captioner(self.model, CaptionSpec(H["vocab_size"], H["pad_id"], H["bos_id"], H["eos_id"]))

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.text.decoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return self.cap.loss(*batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bug", default=None)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    data = SyntheticCaptions(H["vocab_size"], H["pad_id"], H["bos_id"], H["eos_id"], H["image_size"], H["image_mean"],
                             H["image_std"])
    loader = torch.utils.data.DataLoader([data.batch(8, seed=s) for s in range(args.steps)], batch_size=None)
    callback = CapdiagCallback(data.batch(16, seed=10_000), every=10, warmup=20, figures=False,
                               image_module="clip.vision_model", **{k: v for k, v in H.items() if k not in ("image_size", "image_module")})
    trainer = L.Trainer(max_steps=args.steps, callbacks=[callback], accelerator="cpu", devices=2,
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        default_root_dir=args.out, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ClipModule(args.bug), loader)
    summary = {"rank": trainer.global_rank, "flags": [[s, k] for s, k, _ in callback.flags],
               "wrote": callback.diag.writer is not None,
               "history": {k: list(v) for k, v in callback.diag.history.items()}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Show, Attend and Tell trained with PyTorch Lightning, watched by capdiag's callback.

    python examples/lightning/train_sat.py --steps 300 [--bug image_not_fed]

TensorBoard: tensorboard --logdir lightning_logs (capdiag's scalars under capdiag/).
"""
import argparse
import warnings

import lightning.pytorch as L
import torch

from capdiag.callbacks.lightning import CapdiagCallback
from capdiag.captioner import IMAGENET_MEAN, IMAGENET_STD
from capdiag.intake.data import SyntheticCaptions
from capdiag.models import show_attend_tell


class SATModule(L.LightningModule):
    def __init__(self, bug=None, lr=1e-3):
        super().__init__()
        self.model = show_attend_tell.build_model(bug=bug)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model.training_loss(*batch)  # label-smoothed CE + doubly stochastic attention term
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), self.lr)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bug", default=None)
    ap.add_argument("--root", default=".")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = SyntheticCaptions(32, image_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    loader = torch.utils.data.DataLoader([data.batch(16, seed=s) for s in range(args.steps)], batch_size=None)
    callback = CapdiagCallback(data.batch(16, seed=12345), vocab_size=32, image_module="encoder",
                               attention_modules=["attention"], every=25, warmup=100)
    trainer = L.Trainer(max_steps=args.steps, callbacks=[callback], default_root_dir=args.root, accelerator="auto",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(SATModule(args.bug), loader)
    rel = callback.diag.history["image_ablation/image_reliance"]
    print("image reliance on the probe batch:", [(s, round(v, 2)) for s, v in rel])
    print("flags:", [f"{k} at step {s}" for s, k, _ in callback.flags] or "none")
    return callback.flags


if __name__ == "__main__":
    main()

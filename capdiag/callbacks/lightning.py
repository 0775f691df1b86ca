"""PyTorch Lightning callback: a thin adapter over ``TrainingDiagnostics``.

    trainer = L.Trainer(callbacks=[CapdiagCallback(probe_batch, vocab_size=V, image_module="encoder")])

The captioner is ``pl_module.<model_attr>`` (default: ``pl_module.model`` when it exists,
else the LightningModule itself), called ``captioner(images, captions)``.
"""
from __future__ import annotations

from typing import Optional

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the extra
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError("capdiag's Lightning callback needs `pip install capdiag[lightning]`") from e

from ..monitor import TrainingDiagnostics


class CapdiagCallback(pl.Callback):
    def __init__(self, probe_batch, model_attr: Optional[str] = None, **kwargs):
        super().__init__()
        self.probe_batch, self.model_attr, self.kwargs = probe_batch, model_attr, kwargs
        self.diag: Optional[TrainingDiagnostics] = None

    def _captioner(self, pl_module):
        if self.model_attr:
            return getattr(pl_module, self.model_attr)
        return getattr(pl_module, "model", pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        # After configure_model and the strategy's setup: under FSDP (ModelParallelStrategy) the
        # parameters are sharded by now, so drift references and gradients are the local shards.
        if self.diag is None:
            kwargs = dict(self.kwargs)
            if "log_dir" not in kwargs and trainer.log_dir is not None:
                kwargs["log_dir"] = f"{trainer.log_dir}/capdiag"
            images, captions = self.probe_batch
            self.diag = TrainingDiagnostics(self._captioner(pl_module), (images.to(pl_module.device), captions.to(pl_module.device)), **kwargs)

    def on_after_backward(self, trainer, pl_module) -> None:
        self.diag.after_backward(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.diag.after_step(trainer.global_step - 1, loss)
        if self.diag.should_stop:
            trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.diag is not None:
            self.diag.close()

    @property
    def flags(self) -> list:
        return self.diag.flags if self.diag else []

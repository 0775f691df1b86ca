"""Hugging Face ``transformers.TrainerCallback``: a thin adapter over ``TrainingDiagnostics``.

    trainer = Trainer(model=..., callbacks=[CapdiagTrainerCallback(probe_batch, vocab_size=V)])

The Trainer's model is called ``model(images, captions)`` by the probes; a model returning a
dict or ``ModelOutput`` with ``logits`` works. For a vision-language captioner (LLaVA, Qwen2-VL, ...,
with or without a peft adapter) the probe batch is the dict your collator writes, with the processor:

    CapdiagTrainerCallback(collate(examples), processor=processor, prompt=PROMPT)
"""
from __future__ import annotations

from typing import Mapping, Optional

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("capdiag's transformers callback needs `pip install capdiag[hf]`") from e

from ..monitor import TrainingDiagnostics


class CapdiagTrainerCallback(TrainerCallback):
    def __init__(self, probe_batch, **kwargs):
        self.probe_batch, self.kwargs = probe_batch, kwargs
        self.diag: Optional[TrainingDiagnostics] = None
        self._loss = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.diag is None:
            kw = dict(self.kwargs)
            kw.setdefault("log_dir", f"{getattr(args, 'logging_dir', None) or args.output_dir}/capdiag")
            device = next(model.parameters()).device
            if isinstance(self.probe_batch, Mapping):  # a vision-language collator's dict
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in self.probe_batch.items()}
                self.diag = TrainingDiagnostics(model, batch, **kw)
                return
            images, captions = self.probe_batch
            self.diag = TrainingDiagnostics(model, (images.to(device), captions.to(device)), **kw)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.diag.after_backward(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._loss = logs["loss"]

    def on_step_end(self, args, state, control, **kwargs):
        self.diag.after_step(state.global_step - 1, self._loss)
        if self.diag.should_stop:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.diag is not None:
            self.diag.close()

    @property
    def flags(self) -> list:
        return self.diag.flags if self.diag else []

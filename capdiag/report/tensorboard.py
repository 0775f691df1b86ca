"""The training monitor's findings -> TensorBoard: scalars tagged ``capdiag/<check>/<metric>`` (the
registry key and the metric name, as in the CLI's JSON), flags as text, figures drawn by
``capdiag.viz``.

``torch.utils.tensorboard`` (and with it the tensorboard package) is imported only when a sink
is created.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping


class TensorBoardSink:
    """Write the training monitor's scalars, flags and figures to a run directory."""

    def __init__(self, log_dir, prefix: str = "capdiag"):
        from torch.utils.tensorboard import SummaryWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(log_dir))
        self.prefix = prefix

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{self.prefix}/{k}", v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(f"{self.prefix}/{tag}", text, step)

    def figure(self, tag: str, fig, step: int) -> None:
        self.writer.add_figure(f"{self.prefix}/{tag}", fig, step)

    def gradient_histograms(self, model, step: int) -> None:
        """A histogram of every ``.grad`` (expensive: about 2x a training step)."""
        for n, p in model.named_parameters():
            if p.grad is not None:
                self.writer.add_histogram(f"{self.prefix}/grad/{n}", p.grad.detach().float().cpu(), step)

    def history(self, metric: str, points: list, threshold, step: int) -> None:
        """The history of one ``<check>/<metric>`` as a line figure, tagged ``<check>/<name>_history``."""
        from ..viz.plots import plot_history

        check, name = metric.split("/", 1)
        fig = plot_history({name: points}, threshold, f"{name} on the probe batch", name)
        self.figure(f"{check}/{name.removeprefix('image_')}_history", fig, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

"""A rich progress bar that counts optimizer steps and shows nanochat's step line: loss, tok/s, MFU.

Lightning's ``RichProgressBar`` shows ``Epoch 0/-2`` for step-based runs (``max_epochs=-1``) and a ``v_num``;
here the description is the step count and the metrics are read from sibling callbacks (duck-typed, so the
bar adds no host sync of its own): ``smooth_loss`` (``EMALossLogger``), ``tok_per_sec`` and ``mfu``
(``TokenThroughputMonitor``). Works with any LightningModule; metrics that no callback provides are omitted.
"""
from __future__ import annotations

import lightning.pytorch as L
from lightning.pytorch.callbacks import RichProgressBar

_SHOWN = (("smooth_loss", "loss", "{:.4f}"), ("tok_per_sec", "tok/s", "{:,.0f}"), ("mfu", "mfu %", "{:.2f}"))


class NanoProgressBar(RichProgressBar):
    """``RichProgressBar`` with ``Step`` instead of ``Epoch`` and nanochat's loss / tok/s / MFU."""

    def __init__(self, refresh_rate: int = 1, leave: bool = True):
        super().__init__(refresh_rate=refresh_rate, leave=leave)

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the bar's label
        return "Step"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        shown: dict[str, str] = {}
        for cb in trainer.callbacks:
            for attr, label, fmt in _SHOWN:
                value = getattr(cb, attr, None)
                if isinstance(value, (int, float)) and label not in shown:
                    shown[label] = fmt.format(value)
        return shown

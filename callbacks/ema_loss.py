"""The train loss nanochat prints: an exponential moving average, debiased (spec §4.10 step 7, §5.7 step 6)."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch

from nanolit.callbacks.periodic import log_to_loggers
from nanolit.common import NanolitError


class EMALossLogger(L.Callback):
    """Smooth the train loss like nanochat and log ``train/loss`` (debiased EMA) and ``train/loss_raw``.

    ``smooth = beta * smooth + (1 - beta) * loss``, reported as ``smooth / (1 - beta ** (step + 1 +
    debias_offset))`` where ``step`` is the optimizer step just taken, counted from 0 (nanochat base's ``step``).
    mid_train increments ``step`` before logging, so its debias term is one step later: ``debias_offset=1``
    reproduces it (spec §5.7 step 6).

    Protocol: the LightningModule sets ``last_train_loss`` (a scalar tensor: nanochat smooths the last
    micro-step's loss of rank zero, not the mean) in ``training_step``; without it the step's returned
    ``{"loss": ...}`` is used. The module must not log ``train/loss`` itself.

    ``smooth_loss`` (debiased, as of the last logging step) is available for progress bars and reports; the raw
    EMA state is checkpointed, so a resumed run continues the exact same curve. Losses are read from the device on
    logging steps only (``log_every_n_steps``), all at once, so the callback adds no host sync to other steps.
    """

    def __init__(self, beta: float = 0.9, debias_offset: int = 0) -> None:
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise NanolitError(f"EMA beta must be a number in [0, 1), got {beta!r}")
        if isinstance(debias_offset, bool) or not isinstance(debias_offset, int) or debias_offset < 0:
            raise NanolitError(f"debias_offset must be a whole number >= 0 (0 as base_train, 1 as mid_train), "
                               f"got {debias_offset!r}")
        self.beta = float(beta)
        self.debias_offset = debias_offset
        self.smooth = 0.0  # nanochat's smooth_train_loss, not debiased
        self.smooth_loss: float | None = None  # debiased, what gets logged
        self.last_loss: float | None = None
        self._pending: list[tuple[torch.Tensor, int]] = []  # (loss on the device, step) not yet folded in

    def update(self, loss: float, step: int) -> float:
        """Fold ``loss`` from optimizer step ``step`` (0-based) into the EMA; return the debiased value."""
        self.smooth = self.beta * self.smooth + (1.0 - self.beta) * loss
        self.last_loss = loss
        self.smooth_loss = self.smooth / (1.0 - self.beta ** (step + 1 + self.debias_offset))
        return self.smooth_loss

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = getattr(pl_module, "last_train_loss", None)
        if loss is None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return  # the module skipped this step (returned None): nothing to fold in
        # global_step already counts the step just taken; nanochat's `step` is the index before the increment.
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self._pending.append((loss, trainer.global_step - 1))
        # Reading a loss is a host sync; the losses wait on the device until a logging step reads them all at once
        # (issue 7). The EMA is the same as folding each step in as it comes.
        if trainer._logger_connector.should_update_logs:
            self.flush()
            # straight to the loggers: pl_module.log costs ~0.5 ms a value in Lightning's bookkeeping (issue 7)
            log_to_loggers(trainer, {"train/loss": self.smooth_loss, "train/loss_raw": self.last_loss},
                           step=trainer.global_step - 1)

    def flush(self) -> None:
        """Fold the losses of the steps since the last logging step into the EMA (one host sync)."""
        if not self._pending:
            return
        values = torch.stack([loss.float().reshape(()) for loss, _ in self._pending]).tolist()
        for value, (_, step) in zip(values, self._pending):
            self.update(value, step)
        self._pending = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()  # the final steps after the last logging step, for the report and the exported meta

    def state_dict(self) -> dict[str, Any]:
        self.flush()  # a checkpoint holds the EMA up to its own step, so a resumed run continues it exactly
        return {"smooth": self.smooth, "smooth_loss": self.smooth_loss, "last_loss": self.last_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.smooth = state_dict["smooth"]
        self.smooth_loss = state_dict["smooth_loss"]
        self.last_loss = state_dict["last_loss"]

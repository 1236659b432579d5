"""The train loss nanochat prints: an exponential moving average of the step losses, debiased.

nanochat d575940 ``scripts/base_train.py``: ``smooth = 0.9 * smooth + 0.1 * loss`` every step, printed as
``smooth / (1 - 0.9 ** (step + 1))``; ``scripts/mid_train.py`` increments ``step`` before printing, so its debias
term is one step later.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch

from nanolit.common import NanolitError
from nanolit.lightning_adapter import StepBoundary, is_logging_step, log_to_loggers
from nanolit.runstate import RunState


class EMALossLogger(L.Callback):
    """Smooth the train loss like nanochat and log ``train/loss`` (the debiased EMA) and ``train/loss_raw``.

    One value per optimizer step: ``smooth = beta * smooth + (1 - beta) * loss``, reported as
    ``smooth / (1 - beta ** (step + 1 + debias_offset))`` where ``step`` is the optimizer step just taken, counted
    from 0. ``debias_offset=1`` reproduces mid_train's later debias term.

    The step's loss: the module's ``last_train_loss`` if it sets one (a scalar tensor; nanolit's modules set the
    last micro-step's loss, which is what nanochat smooths), else the step's mean loss: the sum of what
    ``training_step`` returned over the step's micro-batches (under ``accumulate_grad_batches = N`` Lightning
    returns each micro-batch's loss divided by N). The module must not log ``train/loss`` itself.

    The EMA lives in the run state (``smooth_train_loss``, ``train_loss``, ``last_train_loss``), which is
    checkpointed, so a resumed run continues the same curve. Losses are read from the device on logging steps
    only (``log_every_n_steps``), all at once, so the callback adds no host sync to other steps.
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
        self.run_state = RunState()  # replaced by the trainer's in setup
        self._boundary = StepBoundary()
        self._step_sum: torch.Tensor | None = None  # the returned losses of the current step's micro-batches
        self._pending: list[tuple[torch.Tensor, int]] = []  # (loss on the device, step) not yet folded in

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run_state = RunState.of(trainer)
        self.run_state.add_flusher(self.flush)

    def update(self, loss: float, step: int) -> float:
        """Fold ``loss`` from optimizer step ``step`` (0-based) into the EMA; return the debiased value."""
        state = self.run_state
        state.smooth_train_loss = self.beta * state.smooth_train_loss + (1.0 - self.beta) * loss
        state.last_train_loss = loss
        state.train_loss = state.smooth_train_loss / (1.0 - self.beta ** (step + 1 + self.debias_offset))
        return state.train_loss

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._boundary.start(trainer)
        self._step_sum = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        returned = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(returned, torch.Tensor):
            returned = returned.detach().float().reshape(())
            self._step_sum = returned if self._step_sum is None else self._step_sum + returned
        if not self._boundary.batch_ends(trainer):
            return  # a micro-batch inside an accumulating step
        loss = getattr(pl_module, "last_train_loss", None)
        loss = loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else self._step_sum
        self._step_sum = None
        if loss is None:
            return  # nothing was returned for this step
        step = trainer.global_step - 1  # global_step already counts the step just taken
        self._pending.append((loss, step))
        if is_logging_step(trainer, step):
            self.flush()
            log_to_loggers(trainer, {"train/loss": self.run_state.train_loss,
                                     "train/loss_raw": self.run_state.last_train_loss}, step=step)

    def flush(self) -> None:
        """Fold the losses of the steps since the last logging step into the EMA (one host sync)."""
        if not self._pending:
            return
        values = torch.stack([loss for loss, _ in self._pending]).tolist()
        for value, (_, step) in zip(values, self._pending):
            self.update(value, step)
        self._pending = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()  # the final steps after the last logging step, for the report and the exported meta

"""Validation loss during training, SFT's validation metric (nanochat d575940 ``scripts/chat_sft.py``).

Why a loss and not bits per byte: SFT scores only what the assistant writes, and chat_sft measures it the way it
trains on it, as the mean cross-entropy (nats) per supervised token. Bits per byte would leave out the special tokens
that end each reply (0 bytes), and would not be the ``val_loss`` chat_sft logs and saves in its checkpoint meta.

chat_sft averages the mean loss of each of its ``eval_steps`` val batches (each batch's mean over its own supervised
tokens, as the model's ``loss_reduction="mean"`` gives it), then averages over ranks; so does this callback.
"""
from __future__ import annotations

import math

import lightning.pytorch as L
import torch

from nanolit.callbacks.periodic import PeriodicEvaluation, check_interval, evaluation_mode
from nanolit.callbacks.protocols import LossPerToken, ValBatches, require
from nanolit.common import NanolitError
from nanolit.lightning_adapter import log_to_loggers


class ValidationLoss(PeriodicEvaluation):
    """Evaluate the val loss at step 0, every ``eval_every`` steps and on the final model (-1: never), as chat_sft.

    Protocol (``nanolit.callbacks.protocols``): the module is a :class:`LossPerToken`, the DataModule
    :class:`ValBatches` (``val_dataloader()`` gives the same batches at every evaluation; ``SFTDataModule``'s are
    chat_sft's ``eval_steps`` first batches of SmolTalk test).

    Every rank takes part (the mean is all-reduced). Logs ``val/loss``; prints chat_sft's
    ``Step 00100 | Validation loss: 1.234567`` on rank zero; the value goes into the run state's ``val_loss``.
    """

    def __init__(self, eval_every: int = 100) -> None:
        super().__init__(check_interval("eval_every", eval_every), at_step_zero=True)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.enabled:
            return
        require(pl_module, LossPerToken, "ValidationLoss", "module")
        require(trainer.datamodule, ValBatches, "ValidationLoss", "DataModule")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        device = pl_module.device
        means = []
        with evaluation_mode(trainer, pl_module):
            for x, y in trainer.datamodule.val_dataloader():
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                nats = pl_module.loss_per_token(x, y).float()
                means.append(nats.sum() / (y >= 0).sum())  # the batch's mean over its supervised tokens
        if not means:
            raise NanolitError("the DataModule's val_dataloader() gave no batches; give it some (SFTDataModule: "
                               "eval_steps >= 1) or set the val loss's eval_every to -1")
        local = torch.stack(means).mean()
        val_loss = float(trainer.strategy.reduce(local, reduce_op="mean"))  # all ranks: a collective
        if not math.isfinite(val_loss):
            raise NanolitError(f"validation loss is {val_loss} at step {step}: a val batch has no supervised target "
                               "(check the val data) or the model diverged")
        self.run_state.val_loss = val_loss
        if trainer.is_global_zero:
            print(f"Step {step:05d} | Validation loss: {val_loss:.6f}")
        log_to_loggers(trainer, {"val/loss": val_loss}, step)

"""Validation bits per byte during training, as a torchmetrics metric plus a callback (nanochat d575940
``scripts/base_train.py`` evaluates it with ``nanochat/loss_eval.py``)."""
from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import torch
from torchmetrics import Metric

from nanolit.callbacks.periodic import PeriodicEvaluation, check_interval, evaluation_mode
from nanolit.callbacks.protocols import LossPerToken, TokenData, require
from nanolit.common import NanolitError
from nanolit.eval.bpb import bits_per_byte, bpb_sums
from nanolit.lightning_adapter import log_to_loggers


class BitsPerByte(Metric):
    """``sum(nats) / (ln 2 * sum(bytes))`` over all target tokens seen, on every rank.

    The states are sums (``dist_reduce_fx="sum"``), so ``compute()`` is the same all-reduce nanochat does, and
    partial states from several ranks or several shards merge exactly. ``compute()`` is a collective under DDP:
    call it on every rank. Special tokens (0 bytes) and ignored targets (-1) count neither nats nor bytes.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total_nats", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("total_bytes", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, target: torch.Tensor, token_bytes: torch.Tensor) -> None:
        """Add one batch: per-token losses in nats (any shape), their targets, and bytes per token id [V]."""
        nats, num_bytes = bpb_sums(loss, target, token_bytes)
        self.total_nats += nats.to(self.total_nats.device)
        self.total_bytes += num_bytes.to(self.total_bytes.device)

    def compute(self) -> torch.Tensor:
        return torch.tensor(bits_per_byte(self.total_nats, self.total_bytes))


class BPBValidation(PeriodicEvaluation):
    """Evaluate val bits per byte at step 0, every ``eval_every`` steps and on the final model (-1: never).

    Protocol (``nanolit.callbacks.protocols``): the module is a :class:`LossPerToken`, the DataModule a
    :class:`TokenData` (its ``val_dataloader()`` must give the same tokens at every evaluation, as nanochat rebuilds
    its val loader each time).

    Every rank must take part (the metric is all-reduced). Logs ``val/bpb``; prints nanochat's
    ``Step 00250 | Validation bpb: 0.8119`` line on rank zero. The value, its minimum and the ``(step, bpb)``
    history go into the run state (:class:`nanolit.runstate.RunState`), which is checkpointed.
    """

    def __init__(self, eval_every: int = 250) -> None:
        super().__init__(check_interval("eval_every", eval_every), at_step_zero=True)
        self.metric = BitsPerByte()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.enabled:
            return
        require(pl_module, LossPerToken, "BPBValidation", "module")
        require(trainer.datamodule, TokenData, "BPBValidation", "DataModule")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        datamodule = trainer.datamodule
        device = pl_module.device
        token_bytes = datamodule.token_bytes
        token_bytes = (token_bytes() if callable(token_bytes) else token_bytes).to(device)
        self.metric.to(device)
        self.metric.reset()
        with evaluation_mode(trainer, pl_module):
            for x, y in datamodule.val_dataloader():
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                self.metric.update(pl_module.loss_per_token(x, y), y, token_bytes)
        val_bpb = float(self.metric.compute())  # all ranks: a collective
        self.metric.reset()
        if not math.isfinite(val_bpb):
            # no scored byte (all targets special or ignored) or a diverged model: never a result to keep
            raise NanolitError(f"validation bpb is {val_bpb} at step {step}: the val tokens have no bytes to score "
                               "(check the val shard) or the model diverged")
        self.run_state.record_val_bpb(step, val_bpb)
        if trainer.is_global_zero:
            print(f"Step {step:05d} | Validation bpb: {val_bpb:.4f}")
        log_to_loggers(trainer, {"val/bpb": val_bpb}, step)

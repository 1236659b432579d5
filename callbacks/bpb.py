"""Validation bits per byte during training (spec §4.10 step 1, §6), as a torchmetrics metric plus a callback."""
from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import torch
from torchmetrics import Metric

from nanolit.callbacks.periodic import PeriodicEvaluation, check_interval, log_to_loggers
from nanolit.callbacks.periodic import evaluation_mode
from nanolit.common import NanolitError
from nanolit.eval.bpb import bits_per_byte, bpb_sums


class BitsPerByte(Metric):
    """``sum(nats) / (ln 2 * sum(bytes))`` over all target tokens seen, on every rank (spec §6).

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

    Protocol:

    * ``pl_module.loss_per_token(x, y) -> Tensor[B*T]``: per-token cross-entropy in nats (``reduction='none'``,
      ``ignore_index=-1``);
    * ``trainer.datamodule.val_dataloader()`` yields ``(x, y)`` batches, this rank's share of the eval tokens
      (the datamodule's ``eval_tokens`` sets how many; nanochat rebuilds the loader at each eval so every eval
      scores the same tokens), and ``trainer.datamodule.token_bytes`` is an int tensor [V] of bytes per token.

    Every rank must take part (the metric is all-reduced). Logs ``val/bpb``; prints nanochat's
    ``Step 00250 | Validation bpb: 0.8119`` line on rank zero. ``min_val_bpb``, ``last_val_bpb`` and the
    ``history`` of ``(step, bpb)`` are checkpointed for the report and resumed runs.
    """

    def __init__(self, eval_every: int = 250) -> None:
        super().__init__(check_interval("eval_every", eval_every), at_step_zero=True)
        self.metric = BitsPerByte()
        self.min_val_bpb = math.inf
        self.last_val_bpb: float | None = None
        self.history: list[tuple[int, float]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        if not callable(getattr(pl_module, "loss_per_token", None)):
            raise NanolitError(f"BPBValidation needs {type(pl_module).__name__}.loss_per_token(x, y) returning "
                               "per-token losses in nats; add it or remove the callback")
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "token_bytes"):
            raise NanolitError("BPBValidation needs a DataModule with val_dataloader() and token_bytes; "
                               "pass one to fit() or remove the callback")

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
        self.last_val_bpb = val_bpb
        self.min_val_bpb = min(self.min_val_bpb, val_bpb)
        self.history.append((step, val_bpb))
        if trainer.is_global_zero:
            print(f"Step {step:05d} | Validation bpb: {val_bpb:.4f}")
        log_to_loggers(trainer, {"val/bpb": val_bpb}, step)

    def state_dict(self) -> dict[str, Any]:
        return {"min_val_bpb": self.min_val_bpb, "last_val_bpb": self.last_val_bpb,
                "history": [list(item) for item in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.min_val_bpb = state_dict["min_val_bpb"]
        self.last_val_bpb = state_dict["last_val_bpb"]
        self.history = [(int(step), float(bpb)) for step, bpb in state_dict["history"]]

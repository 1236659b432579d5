"""The one place nanolit touches Lightning beyond its documented API, plus the step rules every callback shares.

Lightning changes its internals between minor versions. Everything here that reaches into them (the fit loop's
``max_steps`` and progress counters, the module attribute kept out of ``nn.Module``'s registry) is checked against
the versions in :data:`CHECKED_VERSIONS` by ``tests/test_lightning_adapter.py``, so an upgrade fails in one place.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch

# Lightning releases whose internals the functions below were read against (fit loop layout, progress counters).
CHECKED_VERSIONS = ("2.6.",)


# ------------------------------------------------------------------------------------------------ step rules
def is_logging_step(trainer: L.Trainer, step: int) -> bool:
    """Whether optimizer step ``step`` (0-based, the step just taken) is a logging step: every
    ``log_every_n_steps``-th, counted like Lightning's own logging (``(step + 1) % n == 0``)."""
    every = trainer.log_every_n_steps
    return every > 0 and (step + 1) % every == 0


class StepBoundary:
    """Tells per-step callbacks which batches finish an optimizer step.

    Under gradient accumulation (automatic optimization, ``accumulate_grad_batches > 1``) the batch hooks run once
    per micro-batch and only the last one moves ``global_step``; with manual optimization (one ``training_step`` per
    optimizer step, as nanolit's modules) every batch moves it. Comparing ``global_step`` with the value at the last
    boundary covers both, through the public API.
    """

    def __init__(self) -> None:
        self.seen: int | None = None  # global_step at the last boundary (or at train start)
        self.open = False  # a step's first micro-batch has started and its last has not ended

    def start(self, trainer: L.Trainer) -> None:
        """Call in ``on_train_start``: a resumed run starts at the restored step."""
        self.seen, self.open = trainer.global_step, False

    def batch_starts(self) -> bool:
        """Call in ``on_train_batch_start``; True for the first micro-batch of a step."""
        first, self.open = not self.open, True
        return first

    def batch_ends(self, trainer: L.Trainer) -> bool:
        """Call in ``on_train_batch_end``; True when this batch finished an optimizer step."""
        if self.seen is None:
            self.seen = trainer.global_step - 1  # used without on_train_start (a test calling hooks directly)
        if trainer.global_step == self.seen:
            return False
        self.seen, self.open = trainer.global_step, False
        return True


def log_to_loggers(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send ``metrics`` straight to every logger at ``step``, and expose them in ``trainer.callback_metrics``.

    ``LightningModule.log`` would hold them until the next logging boundary, drop values logged in between, is not
    allowed in ``on_train_end``, and costs ~0.5 ms a value in its bookkeeping; rank zero alone writes.
    """
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(value)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


# ------------------------------------------------------------------------------------------ loop internals
def set_max_steps(trainer: L.Trainer, steps: int) -> None:
    """Set the horizon after the Trainer exists (``Trainer.max_steps`` has no setter): the module derives it."""
    trainer.fit_loop.epoch_loop.max_steps = steps


def fit_loop_state_at(trainer: L.Trainer, step: int) -> dict[str, Any]:
    """The fit loop's ``state_dict`` as Lightning saves it from ``on_train_batch_end`` of step ``step - 1`` when
    every batch is one optimizer step (manual optimization): what a checkpoint written there holds."""
    state = trainer.fit_loop.state_dict()  # a fresh loop: Lightning's own layout with every counter at 0
    # the batch of the checkpoint's step has been processed but is not marked completed yet
    batch = {"ready": step, "started": step, "processed": step, "completed": step - 1}
    state["epoch_loop.batch_progress"].update(total=dict(batch), current=dict(batch))
    optim = {"ready": step, "completed": step}  # global_step under manual optimization
    state["epoch_loop.manual_optimization.optim_step_progress"].update(total=dict(optim), current=dict(optim))
    state["epoch_loop.state_dict"]["_batches_that_stepped"] = step - 1
    epoch = {"ready": 1, "started": 1, "processed": 0, "completed": 0}  # inside the first (endless) epoch
    state["epoch_progress"].update(total=dict(epoch), current=dict(epoch))
    return state


def stop_rich_progress(bar) -> None:
    """Close a ``RichProgressBar``'s live display now (Lightning closes it at ``teardown``, after everything printed
    at the end of fit, so its last frame would come after the closing lines)."""
    bar._stop_progress()


def keep_unregistered(module: torch.nn.Module, name: str, value: Any) -> None:
    """Set ``module.<name>`` without registering it as a submodule: a compiled copy of a registered model must not
    add ``_orig_mod.`` keys to the state_dict, nor be moved or counted twice by Lightning."""
    module.__dict__[name] = value




def lr_names(optimizers: list) -> list[list[str]]:
    """The names ``LearningRateMonitor`` logs each param group's LR under (``lr-AdamW/lm_head``, ``lr-Muon/pg2``,
    ``lr-SGD-1``...), per optimizer, so a report and the loggers call every series the same. Lightning builds them in
    a private method."""
    from collections import defaultdict

    from lightning.pytorch.callbacks import LearningRateMonitor

    names, _ = LearningRateMonitor()._find_names_from_optimizers(list(optimizers), [], defaultdict(int))
    return names


__all__ = ["CHECKED_VERSIONS", "StepBoundary", "fit_loop_state_at", "is_logging_step", "keep_unregistered",
           "log_to_loggers", "lr_names", "set_max_steps", "stop_rich_progress"]

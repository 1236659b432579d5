"""The schedule nanochat's evaluations share: every N steps, and once more on the final model.

nanochat's loop runs steps 0..N and, at the top of step ``s`` (before that step's optimizer update), evaluates
when ``s % every == 0`` or ``s == N``. In Lightning terms ``s`` is ``trainer.global_step`` in
``on_train_batch_start`` (optimizer steps completed so far), and ``s == N`` is ``on_train_end``: there is no
batch after the last one. Doing the periodic work at the *start* of a batch also means a checkpoint saved at the
end of the previous batch is already on disk before a long CORE run (karpathy/nanochat issue #446 asks for that).
Under gradient accumulation the first micro-batch of step ``s`` runs the evaluations, once.
"""
from __future__ import annotations

import abc
import contextlib
import time
from typing import Any, Iterator

import lightning.pytorch as L
import torch

from nanolit.common import NanolitError, synchronize
from nanolit.runstate import RunState


def check_interval(name: str, value: Any) -> int:
    """``value`` as a step interval: a positive int, or -1 to disable. Anything else is a user error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise NanolitError(f"{name} must be a whole number of steps (or -1 to disable), got {value!r}")
    if value == 0 or value < -1:
        raise NanolitError(f"{name} must be a positive number of steps or -1 to disable, got {value}")
    return value


def check_positive(name: str, value: Any, allow_all: bool = False) -> int:
    """A positive int; with ``allow_all``, -1 means "no limit" (nanochat's ``max_per_task=-1``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise NanolitError(f"{name} must be a whole number, got {value!r}")
    if value > 0 or (allow_all and value == -1):
        return value
    hint = " or -1 for no limit" if allow_all else ""
    raise NanolitError(f"{name} must be a positive number{hint}, got {value}")


@contextlib.contextmanager
def evaluation_mode(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
    """Eval mode, no autograd and the trainer's precision (bf16 autocast like nanochat's evals); train mode after."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            yield
    finally:
        pl_module.train(was_training)


class PeriodicEvaluation(L.Callback, abc.ABC):
    """Base class: calls :meth:`evaluate` on nanochat's schedule and times it.

    ``every``: -1 never; otherwise at every ``global_step % every == 0`` (step 0 only when ``at_step_zero``, as
    nanochat's val bpb does and CORE and sampling do not) and once on the final model in ``on_train_end``.
    ``rank_zero_only``: only global rank zero evaluates (sampling); otherwise every rank takes part, because the
    evaluation runs collectives.

    The wall time spent evaluating is added to the run state's ``eval_seconds``; ``TokenThroughputMonitor``
    subtracts it from step times, so evaluations never count as training time (as in nanochat, whose timer stops
    around them), whatever the callback order.
    """

    def __init__(self, every: int, at_step_zero: bool, rank_zero_only: bool = False) -> None:
        super().__init__()
        self.every = every
        self.at_step_zero = at_step_zero
        self.rank_zero_only = rank_zero_only
        self.run_state = RunState()  # replaced by the trainer's in setup
        self._last_eval_step: int | None = None

    @property
    def enabled(self) -> bool:
        return self.every != -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run_state = RunState.of(trainer)

    @abc.abstractmethod
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Do the evaluation at optimizer step ``step`` (every rank, or rank zero alone if ``rank_zero_only``)."""

    def fires_at(self, step: int) -> bool:
        """Whether the periodic part of the schedule fires at ``step`` (the final evaluation is separate)."""
        if not self.enabled or step % self.every != 0:
            return False
        return step > 0 or self.at_step_zero

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if self.fires_at(step) and step != self._last_eval_step:
            self._run(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # nanochat's `last_step`: the final model is always evaluated, unless this very step already was.
        step = trainer.global_step
        if self.enabled and step != self._last_eval_step:
            self._run(trainer, pl_module, step)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self._last_eval_step = step
        if self.rank_zero_only and not trainer.is_global_zero:
            return
        synchronize(pl_module.device)
        t0 = time.perf_counter()
        self.evaluate(trainer, pl_module, step)
        synchronize(pl_module.device)
        self.run_state.eval_seconds += time.perf_counter() - t0

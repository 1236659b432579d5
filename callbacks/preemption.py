"""Save a checkpoint and stop cleanly when the job is preempted: SIGTERM, or SLURM's warning signal SIGUSR1.

Runs lost to preemption are what nanochat's users complain about most (spec §15.2). A signal only sets a flag.
The save happens at the next step boundary, where the weights, the optimizers, the data position and every
callback describe the same step, so ``--ckpt_path last`` continues exactly where the run stopped.

Lightning's own handlers do not give that. Its SIGTERM handler runs a collective inside the signal handler and
stops without saving. Its SLURM auto-requeue handler (SIGUSR1) saves ``hpc_ckpt_N.ckpt`` in the middle of a
step, which can be between the AdamW and Muon updates. So while training runs, this callback owns the signals.
It installs its handlers in ``on_train_start``, after Lightning has installed its own, and puts the previous
ones back when training ends. Under SLURM with auto-requeue (Lightning's default there), the SLURM requeue signal
also requeues the job after the save, as Lightning does (``scontrol requeue``).

Protocol: the trainer has a ``StepCheckpoint`` (the nanolit CLI always adds one).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Any

import lightning.pytorch as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nanolit.callbacks.checkpoint import StepCheckpoint, step_loss_is_finite
from nanolit.common import NanolitError


class PreemptionCheckpoint(L.Callback):
    """On any of ``signals``, write ``step=NNNNNN.ckpt`` and ``last.ckpt`` at the end of the current step and exit.

    Every rank takes the same decision: the flag is OR-reduced over ranks at each step end, so a signal delivered
    to a single rank still stops all of them at the same step. The run then raises Lightning's
    ``SIGTERMException`` (a ``SystemExit`` with status 0), as Lightning does for SIGTERM. No final evaluation
    runs, so the job is out within one step of the signal.

    Args:
        signals: signal names to handle (SLURM sends ``SIGUSR1`` with ``#SBATCH --signal=SIGUSR1@90``).
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1")) -> None:
        unknown = [name for name in signals if not isinstance(getattr(signal, str(name), None), signal.Signals)]
        if unknown or not signals:
            raise NanolitError(f"signals must be signal names such as SIGTERM or SIGUSR1, got {list(signals)!r}")
        self.signals = [signal.Signals[name] for name in signals]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._checkpoint: StepCheckpoint | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        found = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, StepCheckpoint)]
        if not found:
            raise NanolitError("PreemptionCheckpoint saves through a StepCheckpoint; add one to the callbacks "
                               "(nanolit.callbacks.StepCheckpoint) or remove PreemptionCheckpoint")
        self._checkpoint = found[0]

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A signal handler may interrupt any line of the training step: it records the signal and nothing else.
        self.received = signal.Signals(signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint is inactive: Python only lets the main thread handle signals")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Collective, on every rank every step: the ranks agree whether any of them was signalled.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        if not step_loss_is_finite(trainer, outputs):
            return  # never save a NaN step: the module stops the run over it and the last good file stays
        # Runs before the StepCheckpoint's own hook (Lightning orders checkpoint callbacks last), so this step is
        # saved exactly once.
        path = self._checkpoint.save(trainer)
        name = self.received.name if self.received is not None else "a signal on another rank"
        rank_zero_info(f"received {name}: saved {path} at step {trainer.global_step}; stopping "
                       "(relaunch with --ckpt_path last to continue)")
        if self.received is not None and self._requeue_signal(trainer) == self.received:
            requeue_slurm_job(trainer)
        raise SIGTERMException()

    @staticmethod
    def _requeue_signal(trainer: L.Trainer) -> signal.Signals | None:
        """SLURM's requeue signal when Lightning would auto-requeue this job, else None."""
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment):
            return environment.requeue_signal if environment.auto_requeue else None
        if environment is None and SLURMEnvironment.detect():
            return signal.SIGUSR1  # single-device strategies keep no environment: Lightning's SLURM default
        return None


def requeue_slurm_job(trainer: L.Trainer) -> None:
    """``scontrol requeue`` this SLURM job (array jobs as ``<array id>_<task id>``), from global rank zero only."""
    if not trainer.is_global_zero:
        return
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_id else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    except FileNotFoundError:
        rank_zero_warn(f"cannot requeue SLURM job {job_id}: scontrol is not on PATH")
        return
    if result.returncode == 0:
        rank_zero_info(f"requeued SLURM job {job_id}")
    else:
        rank_zero_warn(f"scontrol requeue {job_id} failed ({result.returncode}): {result.stderr.strip()}")

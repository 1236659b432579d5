"""Save a checkpoint and stop cleanly when the job is preempted: SIGTERM, or SLURM's warning signal SIGUSR1.

Runs lost to preemption are what people training on shared clusters lose most. A signal only sets a flag. The save
happens at a step boundary, where the weights, the optimizers, the data position and every callback describe the
same step, so resuming from ``last.ckpt`` continues exactly where the run stopped.

Lightning's own handlers do not give that. Its SIGTERM handler runs a collective inside the signal handler and
stops without saving. Its SLURM auto-requeue handler (SIGUSR1) saves ``hpc_ckpt_N.ckpt`` in the middle of a
step, which can be between two optimizers' updates. So while training runs, this callback owns the signals.
It installs its handlers in ``on_train_start``, after Lightning has installed its own, and puts the previous
ones back when training ends. Under SLURM with auto-requeue (Lightning's default there), the SLURM requeue signal
also requeues the job after the save, as Lightning does (``scontrol requeue``).

Protocol: the trainer has a ``StepCheckpoint``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nanolit.callbacks.checkpoint import StepCheckpoint
from nanolit.common import NanolitError
from nanolit.lightning_adapter import StepBoundary


class PreemptionCheckpoint(L.Callback):
    """On any of ``signals``, write ``step=NNNNNN.ckpt`` and ``last.ckpt`` at a step boundary and exit.

    One process: the flag is read at the end of every step. Several ranks must stop at the same step, even when the
    signal reached one of them only, and must agree without a collective (and a host sync) every step: every
    ``check_every`` steps each rank starts an all-reduce (MAX) of its flag without waiting for it, and reads the
    result of the previous one, long finished, at the next check. So all ranks stop together, within
    ``2 * check_every`` steps of the signal. The run then raises Lightning's ``SIGTERMException`` (a ``SystemExit``
    with status 0), as Lightning does for SIGTERM. No final evaluation runs.

    Args:
        signals: signal names to handle (SLURM sends ``SIGUSR1`` with ``#SBATCH --signal=SIGUSR1@90``).
        check_every: steps between two agreements of the ranks (unused on one process).
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1"), check_every: int = 10) -> None:
        unknown = [name for name in signals if not isinstance(getattr(signal, str(name), None), signal.Signals)]
        if unknown or not signals:
            raise NanolitError(f"signals must be signal names such as SIGTERM or SIGUSR1, got {list(signals)!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise NanolitError(f"check_every must be a positive number of steps, got {check_every!r}")
        self.signals = [signal.Signals[name] for name in signals]
        self.check_every = check_every
        self.resume_hint = "ckpt_path='last'"  # the nanolit CLI says --ckpt_path last
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._checkpoint: StepCheckpoint | None = None
        self._boundary = StepBoundary()
        self._vote: tuple[torch.Tensor, Any] | None = None  # (flag tensor, async all-reduce work) in flight

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
        self.received, self._vote = None, None
        self._boundary.start(trainer)
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
        if self._vote is not None:
            self._vote[1].wait()  # no collective may be left in flight when the process group goes
            self._vote = None
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _any_rank_signalled(self, trainer: L.Trainer, step: int) -> bool:
        """Whether to stop after step ``step``; the same answer on every rank at the same step."""
        if trainer.world_size == 1 or not dist.is_available() or not dist.is_initialized():
            return self.received is not None
        if (step + 1) % self.check_every:
            return False
        stop = False
        if self._vote is not None:  # started check_every steps ago: long finished, waiting costs nothing
            flag, work = self._vote
            work.wait()
            stop = bool(flag.item())
        if not stop:
            flag = torch.tensor([int(self.received is not None)], device=trainer.strategy.root_device)
            self._vote = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True))
        else:
            self._vote = None
        return stop

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._boundary.batch_ends(trainer) or not self._any_rank_signalled(trainer, trainer.global_step - 1):
            return
        # Runs before the StepCheckpoint's own hook (Lightning orders checkpoint callbacks last), so this step is
        # saved exactly once; a NaN step is refused there, and the last good file stays.
        path = self._checkpoint.save(trainer)
        name = self.received.name if self.received is not None else "a signal on another rank"
        rank_zero_info(f"received {name}: saved {path} at step {trainer.global_step}; stopping "
                       f"(relaunch with {self.resume_hint} to continue)")
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

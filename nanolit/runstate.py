"""The run's loop state in one object: what nanochat keeps in local variables of its training loop.

nanochat's ``base_train`` carries ``min_val_bpb``, ``smooth_train_loss`` and ``total_training_time`` from step to
step, saves them in the checkpoint meta as ``loop_state``, and prints them at the end. Here the callbacks that
measure a figure write it into the run's :class:`RunState`, everyone else reads it from there (the nanochat export,
the resume from nanochat, the report, the progress bar and the step line), and it is checkpointed once, as its
own callback state. The non-finite-loss policy lives here too, because the module that sees the loss and the
callbacks that save checkpoints must apply the same rule.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning.pytorch as L
import torch

from nanolit.common import NanolitError


@dataclass(eq=False)
class RunState(L.Callback):
    """The figures of one run, written by the callbacks that measure them and checkpointed here, once.

    Writers: the training module (``lrm``, ``grad_norm`` on logging steps; ``progress``, the fraction of the run
    done, where it is not ``step / num_iterations``), ``BPBValidation`` (``val_bpb``, ``min_val_bpb``, ``val_bpb_history``), ``EMALossLogger``
    (``smooth_train_loss``, the raw EMA nanochat saves; ``train_loss``, its debiased value; ``last_train_loss``),
    ``TokenThroughputMonitor`` (``dt``, ``tok_per_sec``, ``mfu``, ``total_training_time``, ``total_training_flops``),
    every periodic evaluation (``eval_seconds``), ``COREEvaluation`` (``core``), ``Sampler`` (``samples``).
    A callback used alone in another project finds or creates the state with :meth:`of` in its ``setup``.
    """

    val_bpb: float | None = None
    min_val_bpb: float = math.inf
    val_bpb_history: list[tuple[int, float]] = field(default_factory=list)
    smooth_train_loss: float = 0.0
    train_loss: float | None = None
    last_train_loss: float | None = None
    lrm: float | None = None
    grad_norm: float | None = None
    progress: float | None = None
    dt: float | None = None
    tok_per_sec: float | None = None
    mfu: float | None = None
    total_training_time: float = 0.0
    total_training_flops: float = 0.0
    eval_seconds: float = 0.0
    core: dict[str, Any] | None = None
    samples: dict[str, Any] | None = None
    val_loss: float | None = None  # written by ValidationLoss (SFT's val metric, chat_sft's val_loss)
    chat: dict[str, Any] | None = None  # written by ChatEvaluation: {"step", "results", "counts", "chatcore"}
    # writers that keep figures on the device or in an open window bring them up to date before anyone reads
    _flushers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _pending_finite: tuple | None = field(default=None, repr=False)  # CUDA: (flag, event, loss, step)

    @classmethod
    def of(cls, trainer: L.Trainer) -> "RunState":
        """The trainer's run state; one is created and added to ``trainer.callbacks`` if there is none yet.

        Call it in ``setup``: Lightning restores callback states after ``setup``, so a state created later would
        miss the checkpoint's figures.
        """
        for callback in trainer.callbacks:
            if isinstance(callback, cls):
                return callback
        state = cls()
        trainer.callbacks.append(state)  # appended: Lightning may be iterating the list (callbacks' setup)
        return state

    # --------------------------------------------------------------------------------------------- writers
    def add_flusher(self, flush: Callable[[], None]) -> None:
        """Register ``flush``, called before the figures are read or checkpointed (once per function)."""
        if flush not in self._flushers:
            self._flushers.append(flush)

    def flush(self) -> "RunState":
        for flush in self._flushers:
            flush()
        return self

    def record_val_bpb(self, step: int, bpb: float) -> None:
        self.val_bpb = bpb
        self.min_val_bpb = min(self.min_val_bpb, bpb)
        self.val_bpb_history.append((step, bpb))

    # ---------------------------------------------------------------------------------- nanochat's meta
    def loop_state(self) -> dict[str, float]:
        """nanochat's checkpoint ``loop_state`` (``base_train``'s meta)."""
        self.flush()
        return {"min_val_bpb": self.min_val_bpb, "smooth_train_loss": self.smooth_train_loss,
                "total_training_time": self.total_training_time}

    @classmethod
    def from_nanochat(cls, loop_state: dict[str, Any], val_bpb: float | None) -> dict[str, Any]:
        """The checkpointed state of a run that nanochat's meta describes (its ``loop_state`` and ``val_bpb``)."""
        state = cls()
        state.min_val_bpb = float(loop_state.get("min_val_bpb", math.inf))
        state.smooth_train_loss = float(loop_state.get("smooth_train_loss", 0.0))
        state.total_training_time = float(loop_state.get("total_training_time", 0.0))
        state.val_bpb = val_bpb
        return state.state_dict()

    # ---------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if not f.name.startswith("_") and f.name in state_dict:
                setattr(self, f.name, state_dict[f.name])
        self.val_bpb_history = [(int(step), float(bpb)) for step, bpb in self.val_bpb_history]

    # ---------------------------------------------------------------------------------- non-finite losses
    def watch_loss(self, loss: torch.Tensor, step: int) -> None:
        """Stop the run when the loss of optimizer step ``step`` is NaN or inf.

        Off CUDA reading the loss is free, so it is checked at once. On CUDA reading it would stop the host every
        step: its finite flag is copied to pinned memory without blocking and read at the next call (or before the
        next checkpoint), when the copy is long done.
        """
        previous, self._pending_finite = self._pending_finite, None
        if loss.device.type == "cuda":
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(torch.isfinite(loss.detach()).all(), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending_finite = (flag, done, loss, step)
        else:
            _raise_if_nonfinite(bool(torch.isfinite(loss.detach()).all()), loss, step)
        if previous is not None:
            self._resolve(previous)

    def check_before_save(self, trainer: L.Trainer, loss: Any, step: int) -> None:
        """Before a checkpoint of step ``step``: stop the run (on every rank together) if that step's loss, or a
        watched one not read yet, is not finite, so that the last checkpoint on disk is always a good one.

        Collective: every rank must call it.
        """
        pending, self._pending_finite = self._pending_finite, None
        finite = not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss.detach()).all())
        if pending is not None:
            flag, done, pending_loss, pending_step = pending
            done.synchronize()
            if not bool(flag):
                finite, loss, step = False, pending_loss, pending_step
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            value = loss.item() if isinstance(loss, torch.Tensor) and not finite else "not finite on another rank"
            raise NanolitError(_nonfinite_message(value, step))

    def resolve_pending(self) -> None:
        """Read the last watched loss now (at the end of training)."""
        pending, self._pending_finite = self._pending_finite, None
        if pending is not None:
            self._resolve(pending)

    @staticmethod
    def _resolve(pending: tuple) -> None:
        flag, done, loss, step = pending
        done.synchronize()
        _raise_if_nonfinite(bool(flag), loss, step)


def _raise_if_nonfinite(finite: bool, loss: torch.Tensor, step: int) -> None:
    if not finite:
        raise NanolitError(_nonfinite_message(loss.float().mean().item(), step))


def _nonfinite_message(value: Any, step: int) -> str:
    return (f"training loss is {value} at step {step}; the run stopped and the last good checkpoint is kept: "
            "resume from it with a lower LR or check the data")


def _plain(value: Any) -> Any:
    """Checkpoint-friendly copies: lists of tuples become lists of lists (``weights_only`` loads them back)."""
    if isinstance(value, list):
        return [list(item) if isinstance(item, tuple) else item for item in value]
    return value


__all__ = ["RunState"]

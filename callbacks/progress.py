"""What a person watching the run sees: nanochat's line per step, its closing lines, and a rich progress bar.

nanochat d575940 ``scripts/base_train.py`` prints, every step::

    step 00012/00050 (24.00%) | loss: 5.123456 | grad norm: 0.4321 | lrm: 1.00 | dt: 123.45ms | tok/sec: 33,177 |
    mfu: 12.34 | total time: 0.02m

and after the loop ``Peak memory usage``, ``Total training time`` and ``Minimum validation bpb``. ``StepLine`` prints
the same from the run state, also when stdout is a log file (SLURM), where a live progress bar is useless.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from nanolit.lightning_adapter import StepBoundary, is_logging_step, stop_rich_progress
from nanolit.runstate import RunState


class StepLine(L.Callback):
    """Print nanochat's step line every ``log_every_n_steps`` steps, and its closing lines, on global rank zero.

    The figures come from the run state: the loss (``EMALossLogger``), ``dt``, tok/s, MFU and total time
    (``TokenThroughputMonitor``), and the module's ``lrm`` and ``grad_norm`` where it writes them (each field is left
    out when nobody measures it; MFU reads ``n/a`` off GPUs). ``step / num_iterations`` comes from the module's
    ``num_iterations`` when it has one (else the run state's ``progress``). Nothing is read off the device here.

    A step's line is printed when the step after it starts (or training ends), so the monitors have measured it
    whatever the callback order; put this callback before the evaluation callbacks so that the line comes before
    their output, as in nanochat. ``step_offset=1`` numbers steps as mid_train prints them (after its increment).
    """

    def __init__(self, step_offset: int = 0) -> None:
        self.step_offset = step_offset
        self.run_state = RunState()  # replaced by the trainer's in setup
        self._boundary = StepBoundary()
        self._due: int | None = None  # a logged step whose line is not printed yet
        self._trained = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run_state = RunState.of(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._boundary.start(trainer)
        self._due, self._trained = None, False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._boundary.batch_ends(trainer):
            self._trained = True
            step = trainer.global_step - 1
            if is_logging_step(trainer, step) or trainer.global_step == trainer.max_steps:
                self._due = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._print_due(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_due(trainer, pl_module)

    def _print_due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, self._due = self._due, None
        if step is not None and trainer.is_global_zero:
            print(self.line(step, getattr(pl_module, "num_iterations", -1)), flush=True)

    def line(self, step: int, num_iterations: int) -> str:
        """nanochat's line for optimizer step ``step`` (0-based) of ``num_iterations`` (-1: unknown)."""
        state = self.run_state.flush()
        shown = step + self.step_offset
        if num_iterations and num_iterations > 0:
            head = f"step {shown:05d}/{num_iterations:05d} ({100 * shown / num_iterations:.2f}%)"
        elif state.progress is not None:
            head = f"step {shown:05d} ({100 * state.progress:.2f}%)"
        else:
            head = f"step {shown:05d}"
        fields = [head]
        if state.train_loss is not None:
            fields.append(f"loss: {state.train_loss:.6f}")
        if state.grad_norm is not None:
            fields.append(f"grad norm: {state.grad_norm:.4f}")
        if state.lrm is not None:
            fields.append(f"lrm: {state.lrm:.2f}")
        if state.dt is not None:
            mfu = f"{state.mfu:.2f}" if state.mfu is not None else "n/a"
            fields += [f"dt: {state.dt * 1000:.2f}ms", f"tok/sec: {int(state.tok_per_sec):,}", f"mfu: {mfu}",
                       f"total time: {state.total_training_time / 60:.2f}m"]
        return " | ".join(fields)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (trainer.is_global_zero and self._trained):
            return
        state = self.run_state.flush()
        device = trainer.strategy.root_device
        if device.type == "cuda":
            print(f"Peak memory usage: {torch.cuda.max_memory_allocated(device) / 1024 / 1024:.2f}MiB")
        print(f"Total training time: {state.total_training_time / 60:.2f}m")
        if state.val_bpb is not None:
            print(f"Minimum validation bpb: {state.min_val_bpb:.4f}")


class NanoProgressBar(RichProgressBar):
    """``RichProgressBar`` labelled ``Step`` (nanolit counts optimizer steps), showing the run state's loss (the
    debiased EMA), tok/s and MFU. Works with any LightningModule; figures no callback measures are left out."""

    def __init__(self, refresh_rate: int = 1, leave: bool = True):
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.run_state = RunState()  # replaced by the trainer's in setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.run_state = RunState.of(trainer)

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the bar's label
        return "Step"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        stop_rich_progress(self)  # the bar's last frame before the closing lines and the report's, not after

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
        state, shown = self.run_state, {}
        if state.train_loss is not None:
            shown["loss"] = f"{state.train_loss:.4f}"
        if state.tok_per_sec is not None:
            shown["tok/s"] = f"{state.tok_per_sec:,.0f}"
        if state.mfu is not None:
            shown["mfu %"] = f"{state.mfu:.2f}"
        return shown

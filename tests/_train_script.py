"""``nanolit fit`` (the real CLI) for the subprocess tests, plus test-only callbacks that the tests add by config.

    python tests/_train_script.py fit -c CONFIG [--ckpt_path last] ...

Faults are made deterministic by callbacks: ``KillAt`` SIGKILLs the process at the start of a step,
``KillDuringSave`` SIGKILLs it while a checkpoint is being written, ``SignalAt`` sends it a signal, and ``StepLog``
appends the run's state after every step to a JSON-lines file that survives a kill.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import torch

from nanolit.runstate import RunState

TESTS_DIR = Path(__file__).resolve().parent


def write_config(path: Path, base_dir: Path, root: Path, num_iterations: int, save_every: int,
                 callbacks: list[dict] = ()) -> Path:
    """A tiny d1 run (64 tokens per step, 2 micro-batches of 2 x 16, val bpb every 4 steps) as a config file.

    JSON is valid YAML, so ``-c`` reads it.
    """
    config = {
        "model": {"class_path": "nanolit.module.GPTModule",
                  "init_args": {"depth": 1, "max_seq_len": 16, "device_batch_size": 2, "total_batch_size": 64,
                                "num_iterations": num_iterations, "export": False,
                                "compile": False}},  # eager: these runs are about processes and files, not kernels
        "data": {"init_args": {"base_dir": str(base_dir), "eval_tokens": 64, "tokenizer_threads": 1}},
        "trainer": {"accelerator": "cpu", "devices": 1, "default_root_dir": str(root),
                    "enable_progress_bar": False, "enable_model_summary": False, "callbacks": list(callbacks)},
        "bpb": {"eval_every": 4},
        "core": {"core_metric_every": -1},
        "sample": {"sample_every": -1},
        "checkpoint": {"save_every": save_every},
    }
    path.write_text(json.dumps(config, indent=1))
    return path


def command(*args: str) -> list[str]:
    """The command line that runs this script with ``args``."""
    return [sys.executable, str(TESTS_DIR / "_train_script.py"), *args]


def callback(name: str, **init_args: object) -> dict:
    """A config entry for one of this file's callbacks."""
    return {"class_path": f"_train_script.{name}", "init_args": init_args}


class KillAt(L.Callback):
    """SIGKILL this process at the start of step ``step``: no handler, no cleanup, like a node dying."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(L.Callback):
    """SIGKILL this process while the checkpoint of step ``step`` is being saved.

    The kill comes after the checkpoint's temporary file is written and before it is renamed; with
    ``truncate`` the temporary file is first cut to half its size, as if the kill came mid-write.
    """

    def __init__(self, step: int, truncate: bool = False) -> None:
        self.step, self.truncate = step, truncate

    def setup(self, trainer, pl_module, stage) -> None:
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def save_then_die(checkpoint, path, storage_options=None):
            save(checkpoint, path, storage_options)
            if checkpoint["global_step"] == self.step:
                if self.truncate:
                    os.truncate(path, os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        io.save_checkpoint = save_then_die


class PauseAt(L.Callback):
    """At the start of step ``step``, create ``ready`` and wait until ``go`` exists (another process's turn)."""

    def __init__(self, step: int, ready: str, go: str) -> None:
        self.step, self.ready, self.go = step, ready, go

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.ready).touch()
            while not Path(self.go).exists():
                time.sleep(0.05)


class DiskFullAt(L.Callback):
    """The save of step ``step`` fails like a full disk: half the file is written, then ENOSPC."""

    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer, pl_module, stage) -> None:
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def save_until_full(checkpoint, path, storage_options=None):
            if checkpoint["global_step"] != self.step:
                return save(checkpoint, path, storage_options)
            save(checkpoint, path, storage_options)
            os.truncate(path, os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        io.save_checkpoint = save_until_full


class SignalAt(L.Callback):
    """Send ``signal`` (a name) to this process at the start of step ``step``, on global rank ``rank`` (-1: all)."""

    def __init__(self, step: int, signal: str, rank: int = -1) -> None:
        self.step, self.signal, self.rank = step, signal, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (-1, trainer.global_rank):
            os.kill(os.getpid(), signal.Signals[self.signal])


class StepLog(L.Callback):
    """Append ``{step, loss, total_training_time, smooth}`` after every step to ``path`` (global rank zero).

    Written at the start of the next step (and at the end of training), once every callback has updated.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or pl_module.last_train_loss is None:
            return
        state = RunState.of(trainer).flush()
        row = {"step": trainer.global_step, "loss": float(pl_module.last_train_loss),
               "total_training_time": state.total_training_time, "smooth": state.smooth_train_loss}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps({"start": trainer.global_step,
                                    "total_training_time": RunState.of(trainer).total_training_time}) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)


def read_log(path: Path) -> tuple[list[dict], dict[int, dict]]:
    """``(start records, {step: state after that step})`` from a ``StepLog`` file."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if "start" in r], {r["step"]: r for r in rows if "step" in r}


if __name__ == "__main__":
    torch.set_num_threads(1)  # the same in every run (bitwise comparisons), and the tests share 2 cores
    from nanolit.cli import main

    main()

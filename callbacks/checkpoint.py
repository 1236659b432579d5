"""Step checkpoints with nanochat's knob (``save_every``), a final save, ``last.ckpt`` and keep-last-k rotation, and
the guarantees that no run is ever lost: one run per folder, atomic files, clear errors for unreadable ones.

Why not plain ``ModelCheckpoint``: with manual optimization (Lightning 2.6) it warns at every save, ignores the final
step unless ``max_steps % every_n_train_steps == 0``, and writes ``last.ckpt`` in place. This subclass keeps what
``ckpt_path="last"`` needs (a ``ModelCheckpoint`` whose folder holds a ``last.ckpt``) and adds:

* every file is written to a temporary name and renamed, so a crash mid-save never clobbers a good one; temporary
  files a killed save left behind are removed when the next run takes the folder;
* a run holds a lock on its folder (an OS file lock, released by the OS if the process dies, so a killed run's lock
  is recognised as stale); a second run into the same folder stops with one line;
* a new run into a folder that holds checkpoints stops with one line naming the ways out (resume, another folder,
  ``overwrite``), instead of replacing them as it goes;
* an unreadable checkpoint to resume from, or a disk that fills during a save, stops the run with one line (for the
  latter: the folder, the bytes needed and free, the partial file removed, the previous checkpoint intact);
* a step whose loss is NaN or inf is never saved (the run state's policy), so the last checkpoint is a good one.

Protocol: none beyond a Trainer; works with any LightningModule, manual or automatic optimization, with gradient
accumulation (a step is saved once, after its last micro-batch).
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import re
import shutil
import socket
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from filelock import FileLock, Timeout
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from nanolit.common import NanolitError
from nanolit.lightning_adapter import StepBoundary
from nanolit.runstate import RunState

_STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")
LAST = "last.ckpt"

# How the one-line errors name the ways out; the nanolit CLI replaces them with its flags.
PLAIN_HINTS = {"resume": "fit(..., ckpt_path='last')", "new_root": "another checkpoint dirpath",
               "overwrite": "StepCheckpoint(overwrite=True)"}


def step_files(dirpath: Path) -> list[Path]:
    """``step=*.ckpt`` files in ``dirpath``, oldest step first."""
    if not dirpath.is_dir():
        return []
    return sorted((p for p in dirpath.iterdir() if _STEP_FILE.match(p.name)),
                  key=lambda p: int(_STEP_FILE.match(p.name).group(1)))


def readable(path: Path) -> str | None:
    """None if ``path`` opens as a torch zip checkpoint, else the reason. Reads only the zip directory at the end of
    the file, which a truncated or foreign file lacks (a full load would read every tensor)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "not a torch checkpoint"
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return str(e) or type(e).__name__
    return None


def newest_readable(dirpath: Path) -> Path | None:
    return next((p for p in reversed(step_files(dirpath)) if readable(p) is None), None)


class StepCheckpoint(ModelCheckpoint):
    """Save ``step=NNNNNN.ckpt`` (and ``last.ckpt``, a hard link to it) every ``save_every`` optimizer steps and at
    the end of training.

    Args:
        dirpath: folder for the checkpoints (fixed, so ``ckpt_path="last"`` finds them on relaunch).
        save_every: interval in optimizer steps; ``-1`` saves only at the end (nanochat's default).
        keep_last: keep only the newest ``k`` step files (``-1`` keeps all); ``last.ckpt`` always stays.
        overwrite: a new run may start in a folder that holds another run's checkpoints: they are removed first.
    """

    def __init__(self, dirpath: str | None = None, save_every: int = -1, keep_last: int = -1,
                 overwrite: bool = False):
        if isinstance(save_every, bool) or not isinstance(save_every, int) or (save_every < 1 and save_every != -1):
            raise NanolitError(f"save_every must be a positive number of steps or -1 (got {save_every!r})")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or (keep_last < 1 and keep_last != -1):
            raise NanolitError(f"keep_last must be a positive count or -1 (got {keep_last!r})")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=False)
        self.save_every = save_every
        self.keep_last = keep_last
        self.overwrite = overwrite
        self.hints = dict(PLAIN_HINTS)
        self.run_state = RunState()  # replaced by the trainer's in setup
        self._boundary = StepBoundary()
        self._last_saved_step: int | None = None
        self._last_loss: Any = None
        self._lock: FileLock | None = None
        self._created: list[Path] = []  # the folder and lock file this run made, removed if it saves nothing
        self._io: GuardedCheckpointIO | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(save_every=self.save_every)

    # ------------------------------------------------------------------------------------- the folder
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.run_state = RunState.of(trainer)
        if stage != "fit" or self.dirpath is None:
            return
        self._on_rank_zero(trainer, self._lock_folder)
        if not isinstance(trainer.strategy.checkpoint_io, GuardedCheckpointIO):
            trainer.strategy.checkpoint_io = GuardedCheckpointIO(trainer.strategy.checkpoint_io, Path(self.dirpath))
        self._io = trainer.strategy.checkpoint_io

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has loaded the checkpoint to resume from by now, and trainer.ckpt_path says which it was.
        if self.dirpath is not None:
            self._on_rank_zero(trainer, lambda: self._check_new_run(Path(self.dirpath), trainer.ckpt_path))

    def _on_rank_zero(self, trainer: L.Trainer, check) -> None:
        """Run ``check`` on rank zero; every rank stops with its error, if any (collective)."""
        problem = None
        if trainer.is_global_zero:
            try:
                check()
            except NanolitError as e:
                problem = str(e)
        problem = trainer.strategy.broadcast(problem)
        if problem:
            self._release()
            raise NanolitError(problem)

    def _lock_folder(self) -> None:
        """Lock the folder for this run and clear the temporaries of killed saves."""
        dirpath = Path(self.dirpath)
        self._created = [p for p in (dirpath, dirpath / ".lock") if not p.exists()]
        dirpath.mkdir(parents=True, exist_ok=True)
        lock, owner = FileLock(dirpath / ".lock", timeout=0), dirpath / ".lock.owner"
        try:
            lock.acquire()
        except Timeout:
            raise NanolitError(f"another run ({_owner(owner)}) is writing checkpoints to {dirpath}; wait for it to "
                               f"end, or start this one in {self.hints['new_root']}") from None
        self._lock = lock
        owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        for tmp in dirpath.glob(".*.tmp"):  # a save killed before its rename: never a usable file
            tmp.unlink()

    def _check_new_run(self, dirpath: Path, ckpt_path: str | os.PathLike | None) -> None:
        """A run that did not resume from this folder must not replace the checkpoints in it."""
        if ckpt_path is not None and Path(ckpt_path).resolve().parent == dirpath.resolve():
            return
        existing = step_files(dirpath) + ([dirpath / LAST] if (dirpath / LAST).exists() else [])
        if not existing:
            return
        if self.overwrite:
            for path in existing:
                path.unlink()
            print(f"overwrite: removed {len(existing)} checkpoint file(s) of an earlier run from {dirpath}")
            return
        raise NanolitError(f"{dirpath} already holds checkpoints of another run ({existing[0].name}, ...); resume it "
                           f"with {self.hints['resume']}, or start a new run in {self.hints['new_root']} or with "
                           f"{self.hints['overwrite']}")

    def _release(self) -> None:
        if self._lock is None:
            return
        (Path(self._lock.lock_file).parent / ".lock.owner").unlink(missing_ok=True)
        self._lock.release()
        self._lock = None
        if self._last_saved_step is None or not step_files(Path(self.dirpath)):
            # a run that stopped before its first save leaves the disk as it found it
            for path in reversed(self._created):
                if path.is_dir():
                    if not any(path.iterdir()):
                        path.rmdir()
                else:
                    path.unlink(missing_ok=True)
        self._created = []

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    # ------------------------------------------------------------------------------------------ saving
    def should_save(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        if step == 0 or trainer.sanity_checking:
            return False
        return (self.save_every > 0 and step % self.save_every == 0) or step == trainer.max_steps

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._boundary.start(trainer)
        self._last_saved_step = trainer.global_step  # a resumed run's step is on disk already

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self._boundary.batch_ends(trainer) and self.should_save(trainer):
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run that stopped before max_steps (mid-training's epoch end, trainer.should_stop) still ends on disk.
        if trainer.global_step > 0 and trainer.global_step != self._last_saved_step:
            self.save(trainer)

    # Lightning's epoch/validation-end saves do not apply to step-based pre-training.
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        return

    def on_validation_end(self, trainer, pl_module) -> None:
        return

    def save(self, trainer: L.Trainer) -> Path:
        """Write ``step=NNNNNN.ckpt`` and ``last.ckpt`` atomically (collective: call on every rank)."""
        step = trainer.global_step
        self.run_state.check_before_save(trainer, self._last_loss, step - 1)
        dirpath = Path(self.dirpath)
        path = dirpath / f"step={step:06d}.ckpt"
        tmp = dirpath / f".{path.name}.tmp"
        io = self._io
        if io is not None:
            io.failure = None
            io.guard_saves = True
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # every rank takes part; global rank 0 writes
        finally:
            if io is not None:
                io.guard_saves = False
        failure = trainer.strategy.broadcast(io.failure if io is not None else None)
        if failure:
            raise NanolitError(f"{failure}; {self._space_hint(trainer, dirpath)} The run stopped at step {step}; "
                               f"resume it with {self.hints['resume']} once there is room.")
        if trainer.is_global_zero:
            os.replace(tmp, path)
            swap = dirpath / ".swap.ckpt.tmp"  # no "last" in the name: Lightning globs *last* for ckpt_path="last"
            if swap.exists():
                swap.unlink()
            os.link(path, swap)  # a second name for the same bytes, swapped in atomically
            os.replace(swap, dirpath / LAST)
            self._rotate(dirpath)
        trainer.strategy.barrier("StepCheckpoint.save")
        self.last_model_path = str(path)
        self._last_saved_step = step
        return path

    def _space_hint(self, trainer: L.Trainer, dirpath: Path) -> str:
        """The bytes a checkpoint needs (weights and optimizer state) against the bytes free in ``dirpath``."""
        tensors = list(trainer.lightning_module.state_dict().values())
        for optimizer in trainer.optimizers:
            for state in optimizer.state.values():
                tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        needed = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        free = shutil.disk_usage(dirpath).free
        previous = (f"the previous checkpoint ({os.path.realpath(dirpath / LAST)}) is intact."
                    if (dirpath / LAST).exists() else "no earlier checkpoint was lost.")
        return (f"a checkpoint of this run needs about {needed:,} bytes and {free:,} are free in {dirpath}; the "
                f"partial file was removed and {previous}")

    def _rotate(self, dirpath: Path) -> None:
        if self.keep_last < 1:
            return
        for old in step_files(dirpath)[:-self.keep_last]:
            old.unlink()


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "owner unknown"


class GuardedCheckpointIO(CheckpointIO):
    """Wraps the strategy's checkpoint IO: loading errors become one line naming the file and a readable
    alternative; a failed ``StepCheckpoint`` save (a full disk) removes its partial file and is reported to the
    callback, which stops every rank together (rank zero alone writes, so it must not raise alone)."""

    def __init__(self, inner: CheckpointIO, dirpath: Path) -> None:
        self.inner, self.dirpath = inner, dirpath
        self.failure: str | None = None
        self.guard_saves = False

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except NanolitError:
            raise
        except Exception as e:  # truncated zip, a pickle the safe loader refuses, not a checkpoint at all
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            fallback = newest_readable(self.dirpath)
            way_out = (f"resume from {fallback} instead (pass it as the ckpt_path)" if fallback is not None and
                       Path(path).resolve() != fallback.resolve() else "pass a checkpoint a run wrote")
            raise NanolitError(f"cannot load checkpoint {path}: {reason[:200]}; it is truncated, corrupt or not a "
                               f"Lightning checkpoint (only tensors and plain data load safely): {way_out}") from None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        try:
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        except OSError as e:
            if not self.guard_saves:
                raise
            Path(path).unlink(missing_ok=True)
            what = "no space left on the device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else str(e)
            self.failure = f"saving {Path(path).name.strip('.').removesuffix('.tmp')} failed: {what}"

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()

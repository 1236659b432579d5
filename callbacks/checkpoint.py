"""Step checkpoints with nanochat's knob (``save_every``), a final save, ``last.ckpt`` and keep-last-k rotation.

Why not plain ``ModelCheckpoint``: in manual optimization (Lightning 2.6) it warns at every save, ignores the
final step unless ``max_steps % every_n_train_steps == 0``, and writes ``last.ckpt`` in place (lightning-notes
§3). This subclass keeps what ``--ckpt_path last`` needs (it is a ``ModelCheckpoint`` whose folder holds a
``last.ckpt``) and writes every file to a temporary name first, so a crash mid-save never clobbers a good one.

Protocol: none beyond a Trainer; works with any LightningModule. A step whose returned loss is NaN or inf is never
saved, so the last checkpoint on disk stays a good one when the module stops the run over it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from nanolit.common import NanolitError

_STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


def step_loss_is_finite(trainer: L.Trainer, outputs) -> bool:
    """Whether the step's returned loss is finite on every rank (collective; True if it returned none)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    finite = not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss).all())
    return trainer.strategy.reduce_boolean_decision(finite, all=True)


class StepCheckpoint(ModelCheckpoint):
    """Save ``step=NNNNNN.ckpt`` every ``save_every`` optimizer steps and at the last step.

    Args:
        dirpath: folder for the checkpoints (fixed, so ``--ckpt_path last`` finds them on relaunch).
        save_every: interval in optimizer steps; ``-1`` saves only at the end (nanochat's default).
        keep_last: keep only the newest ``k`` step files (``-1`` keeps all); ``last.ckpt`` always stays.
    """

    def __init__(self, dirpath: str | None = None, save_every: int = -1, keep_last: int = -1):
        if not isinstance(save_every, int) or (save_every < 1 and save_every != -1):
            raise NanolitError(f"save_every must be a positive number of steps or -1 (got {save_every!r})")
        if not isinstance(keep_last, int) or (keep_last < 1 and keep_last != -1):
            raise NanolitError(f"keep_last must be a positive count or -1 (got {keep_last!r})")
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=False)
        self.save_every = save_every
        self.keep_last = keep_last

    @property
    def state_key(self) -> str:
        return self._generate_state_key(save_every=self.save_every)

    def should_save(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        if step == 0 or trainer.sanity_checking:
            return False
        return (self.save_every > 0 and step % self.save_every == 0) or step == trainer.max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Callbacks run before the module's own hook, where a non-finite loss stops the run (on CUDA a step later)
        if self.should_save(trainer) and step_loss_is_finite(trainer, outputs):
            self.save(trainer)

    # Lightning's epoch/validation-end saves do not apply to step-based pre-training.
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        return

    def on_validation_end(self, trainer, pl_module) -> None:
        return

    def save(self, trainer: L.Trainer) -> Path:
        """Write ``step=NNNNNN.ckpt`` and ``last.ckpt`` atomically (collective: call on every rank)."""
        dirpath = Path(self.dirpath)
        path = dirpath / f"step={trainer.global_step:06d}.ckpt"
        tmp = dirpath / f".{path.name}.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank takes part; global rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, path)
            swap = dirpath / ".swap.ckpt.tmp"  # no "last" in the name: Lightning globs *last* for --ckpt_path last
            if swap.exists():
                swap.unlink()
            os.link(path, swap)  # a second name for the same bytes, swapped in atomically
            os.replace(swap, dirpath / "last.ckpt")
            self._rotate(dirpath)
        trainer.strategy.barrier("StepCheckpoint.save")
        self.last_model_path = str(path)
        return path

    def _rotate(self, dirpath: Path) -> None:
        if self.keep_last < 1:
            return
        steps = sorted(p for p in dirpath.iterdir() if _STEP_FILE.match(p.name))
        for old in steps[:-self.keep_last]:
            old.unlink()

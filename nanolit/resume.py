"""Continue a nanochat base-training run in nanolit (nanochat d575940 ``scripts/base_train.py --resume_from_step``).

    nanolit fit -c CONFIG --resume_from_nanochat <base>/base_checkpoints/d20 [--ckpt_path last]

The source is a nanochat checkpoint folder (its last step) or one of a step's files (``model_021400.pt``).
Lightning is handed that step as the checkpoint a nanolit run would have written at the same point:

* ``global_step`` = meta ``step``;
* the weights and the ``[adamw, muon]`` optimizer states of ``optim_<step>_rank0.pt``;
* the meta's ``loop_state`` and ``val_bpb`` become the run state (``nanolit.runstate.RunState``);
* ``dataloader_state_dict`` goes to the DataModule. nanochat's ``{pq_idx, rg_idx}`` resumes by nanochat's own
  approximate rule. A folder that nanolit exported holds the exact position, so that continues exactly.

Nothing is written to disk. The checkpoint is built in memory when Lightning loads it, on every rank, once the
model and callbacks are set up. With ``--ckpt_path last`` and a ``last.ckpt`` already on disk, that file wins:
a relaunched or requeued job continues its own run instead of starting over from nanochat.

The training horizon (``num_iterations`` or the ratio it comes from) and the batch sizes are not in the meta's
model config: pass the ones the nanochat run used, or the LR schedule is not the one it was on.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from nanolit.checkpoint import detect_architecture, find_last_step, load_nanochat_checkpoint, read_optimizer_2026
from nanolit.common import NanolitError, load_tensors
from nanolit.lightning_adapter import fit_loop_state_at
from nanolit.model2026 import GPT2026
from nanolit.optim2026 import build_muon_adamw
from nanolit.runstate import RunState

_STEP_FILE = re.compile(r"(?:model|meta|optim)_(\d{6})(?:_rank\d+)?\.(?:pt|json)")

# the model config fields that fix the weight shapes (sequence_len does not: rotary is recomputed)
_SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


def locate_nanochat_step(source: str | Path) -> tuple[Path, int]:
    """``(checkpoint folder, step)`` for a folder (its last step) or a file of one step (``model_000500.pt``)."""
    source = Path(source)
    if source.is_dir():
        return source, find_last_step(source)
    match = _STEP_FILE.fullmatch(source.name)
    if match is None or not source.parent.is_dir():
        raise NanolitError(f"--resume_from_nanochat {source} is neither a nanochat checkpoint folder nor one of its "
                           "model_/meta_/optim_ files; pass e.g. <base>/base_checkpoints/d20")
    return source.parent, int(match.group(1))


def resume_from_nanochat(trainer: L.Trainer, source: str | Path, ckpt_path: str | None) -> str:
    """Make ``trainer`` load nanochat checkpoint ``source``; returns the ``ckpt_path`` to pass to ``fit``.

    Returns ``"last"`` when ``ckpt_path`` is ``"last"`` and a last checkpoint exists.
    """
    if ckpt_path not in (None, "last"):
        raise NanolitError(f"--resume_from_nanochat and --ckpt_path {ckpt_path} both name a starting point; "
                           "pass only one (--ckpt_path last may accompany it)")
    if ckpt_path == "last" and _last_checkpoint_exists(trainer):
        return "last"
    ckpt_dir, step = locate_nanochat_step(source)
    if (ckpt_dir / f"optim_{step:06d}_rank1.pt").exists() and not _is_2026(ckpt_dir, step):
        raise NanolitError(f"step {step} in {ckpt_dir} was saved by several ranks, whose optimizer files are shards "
                           "of nanochat's DistAdamW/DistMuon; nanolit resumes single-process nanochat d575940 "
                           "checkpoints (one optim_<step>_rank0.pt; 92d63d4's per-rank files are merged)")
    for name in (f"model_{step:06d}.pt", f"meta_{step:06d}.json", f"optim_{step:06d}_rank0.pt"):
        if not (ckpt_dir / name).is_file():
            raise NanolitError(f"{ckpt_dir / name} is missing; resuming needs the model, meta and optimizer files "
                               "of one step (nanochat saves optimizer files for base training only)")
    marker = ckpt_dir / f"meta_{step:06d}.json"
    trainer.strategy.checkpoint_io = NanochatCheckpointIO(trainer.strategy.checkpoint_io, trainer, marker, step)
    return str(marker)


def _is_2026(ckpt_dir: Path, step: int) -> bool:
    """nanochat 92d63d4 writes ``total_batch_size`` and ``model_config.window_pattern`` in its meta."""
    try:
        meta = json.loads((ckpt_dir / f"meta_{step:06d}.json").read_text())
    except (OSError, ValueError):
        return False
    return "window_pattern" in meta.get("model_config", {})


def _last_checkpoint_exists(trainer: L.Trainer) -> bool:
    return any(cb.dirpath and (Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}").exists()
               for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint))


class NanochatCheckpointIO(CheckpointIO):
    """Loads ``marker`` (a nanochat step's meta file) as a Lightning checkpoint; everything else goes to ``inner``."""

    def __init__(self, inner: CheckpointIO, trainer: L.Trainer, marker: Path, step: int) -> None:
        self.inner, self.trainer, self.marker, self.step = inner, trainer, Path(marker), step

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if Path(path) == self.marker:
            return nanochat_to_lightning(self.marker.parent, self.step, self.trainer)
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def nanochat_to_lightning(ckpt_dir: str | Path, step: int, trainer: L.Trainer) -> dict[str, Any]:
    """The Lightning checkpoint nanolit would have saved at ``step``, built from nanochat's files for that step.

    Needs the trainer's module (a ``GPTModule``, set up), callbacks and DataModule: their state layouts are the
    target.
    """
    module = trainer.lightning_module
    model_state, _, meta = load_nanochat_checkpoint(ckpt_dir, step, "cpu")
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}  # a compiled model's keys
    era = detect_architecture(model_state)
    ours = "jul2026" if isinstance(module.gpt, GPT2026) else "dec2025"
    if era != ours:
        raise NanolitError(f"{ckpt_dir} step {step} is nanochat's '{era}' architecture and this run trains "
                           f"'{ours}'; continue it with the matching module (GPTModule for dec2025, "
                           "nanolit.module2026.GPT2026Module for jul2026)")
    _check_shapes(module, meta.get("model_config", {}), ckpt_dir)
    if era == "jul2026":  # one MuonAdamW state, merged from nanochat's per-rank files
        numels = [p.numel() for group in build_muon_adamw(module.gpt).param_groups for p in group["params"]]
        optim_states = [read_optimizer_2026(ckpt_dir, step, numels)]
    else:
        optim_states = load_tensors(ckpt_dir / f"optim_{step:06d}_rank0.pt")
        if not isinstance(optim_states, list) or len(optim_states) != 2:  # loaded before configure_optimizers
            raise NanolitError(f"optim_{step:06d}_rank0.pt in {ckpt_dir} holds no [adamw, muon] pair of state dicts")
    loop_state = meta.get("loop_state", {})
    checkpoint = {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": L.__version__,
        "state_dict": {f"gpt.{k}": v for k, v in model_state.items()},  # GPTModule keeps its GPT as `gpt`
        "optimizer_states": optim_states,
        "lr_schedulers": [],
        "loops": {"fit_loop": fit_loop_state_at(trainer, step)},
        "callbacks": {RunState().state_key: RunState.from_nanochat(loop_state, meta.get("val_bpb"))},
    }
    loader = meta.get("dataloader_state_dict")
    if loader and trainer.datamodule is not None:
        # Lightning restores a DataModule from the key of its class name; the loader rule handles nanochat's dict
        checkpoint[type(trainer.datamodule).__qualname__] = {"train_loader": [loader]}
    return checkpoint


def _check_shapes(module: L.LightningModule, model_config: dict, ckpt_dir: Path) -> None:
    ours = module.gpt.config.to_dict()
    differ = {f: (model_config.get(f), ours[f]) for f in _SHAPE_FIELDS if model_config.get(f) != ours[f]}
    if differ:
        detail = ", ".join(f"{f} {theirs} vs {mine}" for f, (theirs, mine) in differ.items())
        raise NanolitError(f"the nanochat model in {ckpt_dir} does not match this run's ({detail}); set --model.depth "
                           "and the tokenizer (data base_dir) of the nanochat run")

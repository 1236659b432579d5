"""Mid-training (nanochat d575940 ``scripts/mid_train.py``) as a stage of the shared training core.

What differs from base training:

* the GPT is a trained base model, from a nanolit ``.ckpt`` or a nanochat checkpoint folder (by default
  nanochat's rule: the largest ``d<N>`` under ``<base_dir>/base_checkpoints/`` at its last step); its shape and
  vocab come from the checkpoint, and the vocab must be the DataModule tokenizer's;
* the optimizers are fresh (the base run's optimizer state is not loaded) and gradients are not clipped by default;
* the LR multiplier follows data progress, not the step: 1 up to 80% of the epoch, then linear to 0;
* there is no step horizon up front: ``MidDataModule`` flags ``last_step`` on the step after the epoch (or
  ``num_iterations``) ends; that step is not trained, every rank agrees on it (all-reduce MAX, as nanochat does),
  and the run ends with the final val bpb, the Lightning checkpoint and a nanochat export in
  ``<base_dir>/mid_checkpoints/d{depth}/`` (none with ``dry_run``).

``dtype`` (declared but unused by nanochat's mid_train) is honoured through the Trainer's precision, which owns
autocast in Lightning: ``"bfloat16"`` means bf16 autocast (``bf16-mixed``) and a bf16 ``wte`` on CUDA, as in
nanochat; ``"float32"`` means ``32-true`` and an fp32 ``wte``. A precision that contradicts ``dtype`` is an error
rather than a silent choice. Off CUDA nanochat never autocasts, so there ``"bfloat16"`` also accepts ``32-true``
(the CLI's CPU default) and runs in fp32, exactly like nanochat.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from nanolit.checkpoint import (SOURCE_DIRS, find_largest_model, find_last_step, load_lightning_checkpoint,
                                load_nanochat)
from nanolit.common import NanolitError
from nanolit.data.loader import check_batch_knobs
from nanolit.data.mid import inputs_and_targets
from nanolit.lightning_adapter import set_max_steps
from nanolit.model import GPT
from nanolit.module import Dec2025Stage, TrainingCore, check_loss_chunk_size
from nanolit.schedules import mid_lr_multiplier

DTYPES = ("bfloat16", "float32")


class FromCheckpointStage(Dec2025Stage):
    """What the stages that continue a trained model share (mid-training, SFT): the model from a nanolit ``.ckpt`` or
    a nanochat folder (by default nanochat's rule: the largest ``d<N>`` under :meth:`checkpoints_folder` at its last
    step), checked against the run (vocab, depth), ``dtype`` checked against the precision, and the dtype of ``wte``.
    """

    loads = "base model"  # how the errors name the model the stage starts from
    trains = "mid-train"  # how the errors name the stage's training

    def __init__(self) -> None:
        self.init_source = ""  # the checkpoint file the base model came from, for the plan and errors
        self.init_origin = ""  # which run exported it and when, where that is known

    # ----------------------------------------------------------------------------------------- model
    def checkpoints_folder(self, core: TrainingCore) -> str:
        """The folder of the base dir whose ``d<N>`` models are the default start (nanochat's ``source``)."""
        return SOURCE_DIRS["base"]

    def base_checkpoint(self, core: TrainingCore) -> tuple[Path, int | None]:
        """Where the base model is: a ``.ckpt`` file (step ``None``) or a nanochat folder and its step."""
        hp = core.hparams
        if hp.init_from is None:
            checkpoints = core.base_dir() / self.checkpoints_folder(core)
            folder = checkpoints / (hp.model_tag or find_largest_model(checkpoints))
        else:
            if hp.model_tag:
                raise NanolitError(f"model_tag={hp.model_tag!r} picks a folder under "
                                   f"{self.checkpoints_folder(core)}/ but init_from={hp.init_from} is given; drop "
                                   "one of them")
            folder = Path(hp.init_from).expanduser()
            if folder.is_file():
                if hp.step is not None:
                    raise NanolitError(f"step={hp.step} selects a step in a nanochat folder, but init_from "
                                       f"{folder} is a single .ckpt; drop --model.step")
                return folder, None
            if not folder.is_dir():
                raise NanolitError(f"init_from {folder} does not exist; pass a nanolit .ckpt or a nanochat "
                                   "checkpoint folder (model_<step>.pt + meta_<step>.json)")
        return folder, find_last_step(folder) if hp.step is None else hp.step

    def build(self, core: TrainingCore) -> GPT:
        """Load the base model (on the training device, like nanochat) and check it against this run."""
        path, step = self.base_checkpoint(core)
        device = core.trainer.strategy.root_device
        if step is None:
            gpt, ckpt = load_lightning_checkpoint(path, device)
            base_batch = ckpt.get("hyper_parameters", {}).get("device_batch_size")
            self.init_source, self.init_origin = str(path), f"step {ckpt.get('global_step', '?')}"
        else:
            gpt, meta = load_nanochat(path, step, device)
            base_batch = meta.get("device_batch_size")
            self.init_source = str(path / f"model_{step:06d}.pt")
            saved = datetime.datetime.fromtimestamp((path / f"model_{step:06d}.pt").stat().st_mtime)
            by = f"exported by the run in {meta['nanolit_run']}" if meta.get("nanolit_run") else "not by nanolit"
            self.init_origin = f"step {step}, {by}, saved {saved:%Y-%m-%d %H:%M}"
        if not isinstance(gpt, GPT):
            raise NanolitError(f"base model {self.init_source} is nanochat's 2026 architecture; mid-training is the "
                               "d575940 recipe's stage (92d63d4 has no mid_train): mid-train a GPTModule model")
        self._check_vocab(core, gpt)
        hp = core.hparams
        if hp.depth not in (None, gpt.config.n_layer):
            raise NanolitError(f"{self.loads} {self.init_source} has depth {gpt.config.n_layer}, not the "
                               f"depth={hp.depth} asked for; pick the right checkpoint or drop --model.depth")
        if base_batch is not None and hp.device_batch_size > base_batch:
            # nanochat's mid_train warns the same way: a larger batch than base training used may not fit in memory
            rank_zero_warn(f"FOOTGUN WARNING: base model training used device_batch_size {base_batch}, did you pass "
                           f"in a good --model.device_batch_size ({hp.device_batch_size})?")
        hp.depth = gpt.config.n_layer  # so a mid .ckpt records the depth and loads like a base one
        return gpt.train()

    def _check_vocab(self, core: TrainingCore, gpt: GPT) -> None:
        datamodule = getattr(core.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "vocab_size"):
            vocab, tokenizer = datamodule.vocab_size, core.base_dir() / "tokenizer"
        elif core.hparams.vocab_size is not None:
            vocab, tokenizer = core.hparams.vocab_size, "--model.vocab_size"
        else:
            return
        if gpt.config.vocab_size != vocab:
            raise NanolitError(f"{self.loads} {self.init_source} has a {gpt.config.vocab_size}-token vocab but the "
                               f"tokenizer in {tokenizer} has {vocab}; {self.trains} with the tokenizer the "
                               f"{self.loads} was trained with")

    def _check_dtype(self, core: TrainingCore) -> None:
        trainer = core.trainer
        precision = str(trainer.precision)
        bf16, fp32 = precision.startswith("bf16"), precision in ("32-true", "32")
        on_cuda = trainer.strategy.root_device.type == "cuda"
        dtype = core.hparams.dtype
        if dtype == "float32" and not fp32:
            raise NanolitError(f"dtype=float32 but trainer.precision={precision}; pass --trainer.precision 32-true "
                               "or --model.dtype bfloat16")
        if dtype == "bfloat16" and not bf16 and (on_cuda or not fp32):
            raise NanolitError(f"dtype=bfloat16 but trainer.precision={precision}; pass --trainer.precision "
                               "bf16-mixed or --model.dtype float32")

    def materialize(self, core: TrainingCore, device: torch.device) -> None:
        # nanochat keeps wte in bf16 when training in bf16 on CUDA; anything else trains it in fp32.
        on_cuda = core.gpt.get_device().type == "cuda"
        core.gpt.transformer.wte.to(torch.bfloat16 if on_cuda and core.bf16_training() else torch.float32)

    def dtype_plan(self, core: TrainingCore) -> str:
        """The plan's ``dtype`` row: what runs, and why off CUDA it is fp32."""
        if core.bf16_training() or core.trainer.strategy.root_device.type == "cuda":
            return f"{core.hparams.dtype} (trainer.precision {core.trainer.precision})"
        return f"{core.hparams.dtype}: fp32 off CUDA, as nanochat (it autocasts on CUDA only)"


class MidStage(FromCheckpointStage):
    """Mid-training's part: the base model to start from, the data-progress LR, the epoch-end stop, the export."""

    optimizer_files_on_every_rank = False  # mid_train saves rank 0's optimizer file alone

    def __init__(self) -> None:
        super().__init__()
        self.finished = False  # the DataModule flagged last_step and the run stopped on it

    def setup(self, core: TrainingCore) -> None:
        trainer = core.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if not (hasattr(datamodule, "progress") and hasattr(datamodule, "last_step")):
            raise NanolitError(f"MidModule needs a DataModule with progress and last_step (nanolit.data.mid."
                               f"MidDataModule), got {type(datamodule).__name__}")
        self._check_dtype(core)
        if trainer.max_steps not in (-1, None):
            raise NanolitError(f"trainer.max_steps={trainer.max_steps} is not used by mid-training: the epoch "
                               "ends the run; drop it or set --data.num_iterations")
        limit = getattr(datamodule, "num_iterations", -1)
        core.num_iterations = limit - 1 if limit > 0 else -1  # at most this many steps train (the epoch may end first)

    # ------------------------------------------------------------------------------------- training
    def inputs_and_targets(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` with the tokens ``mask_user_tokens`` excludes as -1 targets (stored negative by the stream)."""
        return inputs_and_targets(tokens)

    def lr_multiplier(self, core: TrainingCore, step: int) -> float:
        """From the consumed step's epoch progress (``MidDataModule.progress``), not from ``step``."""
        progress = core.trainer.datamodule.progress
        core.run_state.progress = progress
        return mid_lr_multiplier(progress)

    def on_train_batch_start(self, core: TrainingCore, batch: torch.Tensor) -> int | None:
        """Stop, without training it, at the step the DataModule flags ``last_step`` on any rank.

        Returning -1 skips this batch and its ``on_train_batch_end`` hooks entirely, so no callback counts a step
        that did not happen. The evaluations due at this step already ran (callbacks go first).
        """
        trainer = core.trainer
        last_step = bool(trainer.datamodule.last_step)
        # all-reduce MAX: ranks with a shorter share of the mixture must not wait in a collective for the others
        if not trainer.strategy.reduce_boolean_decision(last_step, all=False):
            return None
        self.finished = True
        core.num_iterations = core.global_step  # the horizon is known now: the steps actually trained
        set_max_steps(trainer, core.global_step)
        trainer.should_stop = True
        return -1

    # ---------------------------------------------------------------------------------------- export
    def reached_end(self, core: TrainingCore) -> bool:
        """nanochat's mid_train saves only at ``last_step`` (not when something else stopped the run)."""
        return self.finished

    def export_dir(self, core: TrainingCore) -> Path | None:
        """``<base_dir>/mid_checkpoints/d{depth}``: the depth of the model, whatever tag it came from."""
        return None if core.hparams.dry_run else core.base_dir() / "mid_checkpoints" / f"d{core.model().config.n_layer}"

    def export_meta(self, core: TrainingCore) -> dict[str, Any]:
        """mid_train's meta: step, val_bpb, model config (``sequence_len`` is mid's ``max_seq_len``), user config."""
        datamodule = core.trainer.datamodule
        user_config = {**getattr(datamodule, "hparams", {}), **core.user_config()}
        return {
            "step": core.global_step,
            "val_bpb": core.run_state.flush().val_bpb,
            "model_config": {**core.gpt.config.to_dict(), "sequence_len": core.hparams.max_seq_len},
            "user_config": {k: v for k, v in user_config.items() if not k.startswith("_")},
        }

    def plan(self, core: TrainingCore) -> dict[str, str]:
        horizon = "one epoch of the train mixture"
        if core.num_iterations >= 0:
            horizon = f"{core.num_iterations:,} steps (num_iterations={core.num_iterations + 1}) or the epoch's end"
        return {
            "base model": f"{self.init_source} ({self.init_origin})",
            "horizon": horizon,
            "LR schedule": "by epoch progress: constant to 80%, then linear to 0; Muon momentum 0.85 -> 0.95 "
                           "over 300 steps",
            "dtype": self.dtype_plan(core),
        }


class MidModule(TrainingCore):
    """nanochat mid-training. Every ``__init__`` argument is a mid_train knob with its name and default.

    mid_train's ``num_iterations`` is the DataModule's (``--data.num_iterations``), whose stream flags ``last_step``
    from it: -1 trains one epoch; ``N > 0`` stops when the stream reaches step ``N``, so ``N - 1`` steps train, as in
    nanochat. One knob in one place: Lightning refuses to log a key the module and DataModule both hold with
    different values.

    Args:
        init_from: the base model: a nanolit Lightning ``.ckpt`` or a nanochat checkpoint folder. ``None``:
            ``<base_dir>/base_checkpoints/<model_tag>/`` (``base_dir`` is the DataModule's).
        model_tag: the folder under ``base_checkpoints/`` when ``init_from`` is ``None``; ``None`` (or ``""``)
            takes the largest ``d<N>``. The output folder is always ``d{depth}``.
        step: the checkpoint step in a nanochat folder; ``None`` takes the last one.
        depth: the base model's depth, which the checkpoint decides: ``None`` records it from there (so a mid
            ``.ckpt`` loads like a base one, and ``--ckpt_path`` resumes); a number is checked against it.
        dtype: ``"bfloat16"`` or ``"float32"``; must agree with ``trainer.precision`` (module docstring).
        max_seq_len, device_batch_size, total_batch_size: batch math, as base training (linked into the data).
        unembedding_lr, embedding_lr, matrix_lr, weight_decay: optimizer knobs, as base training.
        init_lr_frac: scales every group's LR at the start.
        dry_run: no nanochat export; the Lightning checkpoints still follow the checkpoint callback's settings.
        grad_clip: global gradient-norm clip; 0 (nanochat's mid_train) disables it.
        compile: ``torch.compile`` the GPT for training; ``None`` as base training (CUDA, and CPUs with a C++
            compiler).
        vocab_size: the tokenizer's, linked by the CLI; checked against the base checkpoint's.
        shard_optimizer: nanochat's DistAdamW/DistMuon sharding, as base training (``GPTModule``); the export's
            ``optim_..._rank0.pt`` then holds the consolidated state (nanochat's mid_train keeps only rank 0's
            shard there), which loads at any world size.
        loss_chunk_size: the loss head in chunks of rows, as base training (``GPTModule``); 0 disables it, ``None``
            picks as base training.
    """

    def __init__(
        self,
        init_from: str | None = None,
        model_tag: str | None = None,
        step: int | None = None,
        depth: int | None = None,
        dtype: str = "bfloat16",
        max_seq_len: int = 2048,
        device_batch_size: int = 32,
        unembedding_lr: float = 0.004,
        embedding_lr: float = 0.2,
        matrix_lr: float = 0.02,
        init_lr_frac: float = 1.0,
        weight_decay: float = 0.0,
        total_batch_size: int = 524288,
        dry_run: bool = False,
        grad_clip: float = 0.0,
        compile: bool | None = None,
        vocab_size: int | None = None,
        shard_optimizer: bool = False,
        loss_chunk_size: int | None = None,
    ):
        if dtype not in DTYPES:
            raise NanolitError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        check_batch_knobs(max_seq_len, device_batch_size, total_batch_size)
        check_loss_chunk_size(loss_chunk_size)
        super().__init__(MidStage())
        self.save_hyperparameters()


__all__ = ["FromCheckpointStage", "MidModule", "MidStage"]

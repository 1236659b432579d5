"""Mid-training: nanochat's ``scripts/mid_train.py`` as a ``GPTModule`` subclass (spec §5).

What differs from base training (spec §5.2, §5.6-5.8, §16.9):

* the GPT is a trained base model, from a nanolit ``.ckpt`` or a nanochat checkpoint folder (by default
  nanochat's rule: the largest ``d<N>`` under ``<base_dir>/base_checkpoints/`` at its last step); its shape and
  vocab come from the checkpoint, and the vocab must be the DataModule tokenizer's;
* the optimizers are fresh (the base run's optimizer state is not loaded) and gradients are not clipped by default;
* the LR multiplier follows data progress, not the step: 1 up to 80% of the epoch, then linear to 0;
* there is no step horizon up front: ``MidDataModule`` flags ``last_step`` on the step after the epoch (or
  ``num_iterations``) ends; that step is not trained, every rank agrees on it (all-reduce MAX, §5.7 step 1), and
  the run ends with the final val bpb, the Lightning checkpoint and a nanochat export in
  ``<base_dir>/mid_checkpoints/d{depth}/`` (none with ``dry_run``).

``dtype`` (declared but unused by nanochat, §5.1) is honoured through the Trainer's precision, which owns
autocast in Lightning: ``"bfloat16"`` means bf16 autocast (``bf16-mixed``) and a bf16 ``wte`` on CUDA, as in
nanochat; ``"float32"`` means ``32-true`` and an fp32 ``wte``. A precision that contradicts ``dtype`` is an error
rather than a silent choice. Off CUDA nanochat never autocasts (§4.2), so there ``"bfloat16"`` also accepts
``32-true`` (the CLI's CPU default) and runs in fp32, exactly like nanochat.
"""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from nanolit.callbacks import StepCheckpoint
from nanolit.checkpoint import (
    find_largest_model,
    find_last_step,
    load_lightning_checkpoint,
    load_nanochat,
    save_nanochat,
)
from nanolit.common import NanolitError
from nanolit.data.loader import grad_accum_steps
from nanolit.data.mid import inputs_and_targets
from nanolit.model import GPT
from nanolit.module import GPTModule
from nanolit.schedules import mid_lr_multiplier

DTYPES = ("bfloat16", "float32")


class MidModule(GPTModule):
    """nanochat mid-training. Every ``__init__`` argument is a mid_train knob with its name and default (§5.1).

    mid_train's ``num_iterations`` is the DataModule's (``--data.num_iterations``), whose stream flags ``last_step``
    from it: -1 trains one epoch; ``N > 0`` stops when the stream reaches step ``N``, so ``N - 1`` steps train, as in
    nanochat (§5.5). One knob in one place: Lightning refuses to log a key the module and DataModule both hold
    with different values.

    Args:
        init_from: the base model: a nanolit Lightning ``.ckpt`` or a nanochat checkpoint folder. ``None``:
            ``<base_dir>/base_checkpoints/<model_tag>/`` (``base_dir`` is the DataModule's).
        model_tag: the folder under ``base_checkpoints/`` when ``init_from`` is ``None``; ``None`` (or ``""``)
            takes the largest ``d<N>``. The output folder is always ``d{depth}`` (§5.8).
        step: the checkpoint step in a nanochat folder; ``None`` takes the last one.
        depth: the base model's depth, which the checkpoint decides: ``None`` records it from there (so a mid
            ``.ckpt`` loads like a base one, and ``--ckpt_path`` resumes); a number is checked against it.
        dtype: ``"bfloat16"`` or ``"float32"``; must agree with ``trainer.precision`` (module docstring).
        max_seq_len, device_batch_size, total_batch_size: batch math, as base training (linked into the data).
        unembedding_lr, embedding_lr, matrix_lr, weight_decay: optimizer knobs (§1.13).
        init_lr_frac: scales every group's LR at the start.
        dry_run: no nanochat export; the Lightning checkpoints still follow the checkpoint callback's settings.
        grad_clip: global gradient-norm clip; 0 (nanochat's mid_train) disables it.
        compile: ``torch.compile`` the GPT for training; ``None`` means on CUDA only.
        vocab_size: the tokenizer's, linked by the CLI; checked against the base checkpoint's.
        shard_optimizer: nanochat's DistAdamW/DistMuon sharding, as base training (``GPTModule``); the export's
            ``optim_..._rank0.pt`` then holds the consolidated state (nanochat's mid_train keeps only rank 0's
            shard there, §5.8), which loads at any world size.
        loss_chunk_size: the loss head in chunks of rows, as base training (``GPTModule``); 0 disables it.
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
        loss_chunk_size: int = 0,
    ):
        if dtype not in DTYPES:
            raise NanolitError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        super().__init__(max_seq_len=max_seq_len, device_batch_size=device_batch_size,
                         total_batch_size=total_batch_size, embedding_lr=embedding_lr, unembedding_lr=unembedding_lr,
                         matrix_lr=matrix_lr, weight_decay=weight_decay, grad_clip=grad_clip,
                         init_lr_frac=init_lr_frac, compile=compile, vocab_size=vocab_size,
                         shard_optimizer=shard_optimizer, loss_chunk_size=loss_chunk_size)
        # Only mid's own knobs are hyperparameters (base-only ones such as warmup_ratio would mislead the report).
        self.save_hyperparameters()
        self.num_iterations = -1  # steps to train, when known up front; the real count is set at the end
        self.init_source = ""  # the checkpoint file the base model came from, for the plan and errors
        self._finished = False  # the DataModule signalled last_step and the run stopped on it

    # ----------------------------------------------------------------------------------------- model
    def _base_checkpoint(self) -> tuple[Path, int | None]:
        """Where the base model is: a ``.ckpt`` file (step ``None``) or a nanochat folder and its step (§11.3)."""
        hp = self.hparams
        if hp.init_from is None:
            checkpoints = self.base_dir() / "base_checkpoints"
            folder = checkpoints / (hp.model_tag or find_largest_model(checkpoints))
        else:
            if hp.model_tag:
                raise NanolitError(f"model_tag={hp.model_tag!r} picks a folder under base_checkpoints/ but "
                                   f"init_from={hp.init_from} is given; drop one of them")
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

    def _load_base(self) -> GPT:
        """Load the base model once (on the training device, like nanochat), check it, and register it."""
        if self.gpt is not None:
            return self.gpt
        path, step = self._base_checkpoint()
        device = self.trainer.strategy.root_device
        if step is None:
            gpt, ckpt = load_lightning_checkpoint(path, device)
            base_batch = ckpt.get("hyper_parameters", {}).get("device_batch_size")
            self.init_source = str(path)
        else:
            gpt, meta = load_nanochat(path, step, device)
            base_batch = meta.get("device_batch_size")
            self.init_source = str(path / f"model_{step:06d}.pt")
        self._check_vocab(gpt)
        if self.hparams.depth not in (None, gpt.config.n_layer):
            raise NanolitError(f"base model {self.init_source} has depth {gpt.config.n_layer}, not the "
                               f"depth={self.hparams.depth} asked for; pick the right checkpoint or drop --model.depth")
        if base_batch is not None and self.hparams.device_batch_size > base_batch:
            # nanochat's warning (§5.2): a larger batch than base training used may not fit in memory
            rank_zero_warn(f"FOOTGUN WARNING: base model training used device_batch_size {base_batch}, did you pass "
                           f"in a good --model.device_batch_size ({self.hparams.device_batch_size})?")
        self.hparams.depth = gpt.config.n_layer
        self.gpt = gpt.train()
        return gpt

    def _check_vocab(self, gpt: GPT) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "vocab_size"):
            vocab, tokenizer = datamodule.vocab_size, self.base_dir() / "tokenizer"
        elif self.hparams.vocab_size is not None:
            vocab, tokenizer = self.hparams.vocab_size, "--model.vocab_size"
        else:
            return
        if gpt.config.vocab_size != vocab:
            raise NanolitError(f"base model {self.init_source} has a {gpt.config.vocab_size}-token vocab but the "
                               f"tokenizer in {tokenizer} has {vocab}; mid-train with the tokenizer the base model "
                               "was trained with")

    @property
    def flops_per_token(self) -> float:
        """Forward+backward FLOPs per token (§1.11); loads the base model if no one has yet (callbacks ask early)."""
        if self._flops_per_token is None:
            self._flops_per_token = self._load_base().estimate_flops()
        return self._flops_per_token

    def setup(self, stage: str) -> None:
        hp = self.hparams
        datamodule = getattr(self.trainer, "datamodule", None)
        if not (hasattr(datamodule, "progress") and hasattr(datamodule, "last_step")):
            raise NanolitError(f"MidModule needs a DataModule with progress and last_step (nanolit.data.mid."
                               f"MidDataModule), got {type(datamodule).__name__}")
        self._check_dtype()
        if self.trainer.max_steps not in (-1, None):
            raise NanolitError(f"trainer.max_steps={self.trainer.max_steps} is not used by mid-training: the epoch "
                               "ends the run; drop it or set --data.num_iterations")
        limit = getattr(datamodule, "num_iterations", -1)
        self.num_iterations = limit - 1 if limit > 0 else -1  # at most this many steps train (the epoch may end first)
        self.grad_accum_steps = grad_accum_steps(hp.total_batch_size, hp.device_batch_size, hp.max_seq_len,
                                                 self.trainer.world_size)
        self._load_base()

    def _check_dtype(self) -> None:
        precision = str(self.trainer.precision)
        bf16, fp32 = precision.startswith("bf16"), precision in ("32-true", "32")
        on_cuda = self.trainer.strategy.root_device.type == "cuda"
        dtype = self.hparams.dtype
        if dtype == "float32" and not fp32:
            raise NanolitError(f"dtype=float32 but trainer.precision={precision}; pass --trainer.precision 32-true "
                               "or --model.dtype bfloat16")
        if dtype == "bfloat16" and not bf16 and (on_cuda or not fp32):
            raise NanolitError(f"dtype=bfloat16 but trainer.precision={precision}; pass --trainer.precision "
                               "bf16-mixed or --model.dtype float32")

    def configure_model(self) -> None:
        # nanochat keeps wte in bf16 when training in bf16 on CUDA (§1.9); anything else trains it in fp32.
        on_cuda = self.gpt.get_device().type == "cuda"
        self.gpt.transformer.wte.to(torch.bfloat16 if on_cuda and self._bf16_training() else torch.float32)
        super().configure_model()

    # ------------------------------------------------------------------------------------- training
    def inputs_and_targets(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` with the tokens ``mask_user_tokens`` excludes as -1 targets (stored negative by the stream)."""
        return inputs_and_targets(tokens)

    def lr_multiplier(self, step: int) -> float:
        """§5.6: from the consumed step's epoch progress (``MidDataModule.progress``), not from ``step``."""
        return mid_lr_multiplier(self.trainer.datamodule.progress)

    def on_train_batch_start(self, batch: torch.Tensor, batch_idx: int) -> int | None:
        """Stop, without training it, at the step the DataModule flags ``last_step`` on any rank (§5.7 steps 1, 4).

        Returning -1 skips this batch and its ``on_train_batch_end`` hooks entirely, so no callback counts a step
        that did not happen. The evaluations due at this step already ran (callbacks go first).
        """
        last_step = bool(self.trainer.datamodule.last_step)
        # all-reduce MAX: ranks with a shorter share of the mixture must not wait in a collective for the others
        if not self.trainer.strategy.reduce_boolean_decision(last_step, all=False):
            return None
        self._finished = True
        self.num_iterations = self.global_step  # the horizon is known now: the steps actually trained
        self.trainer.fit_loop.epoch_loop.max_steps = self.global_step
        self.trainer.should_stop = True
        return -1

    # ---------------------------------------------------------------------------------------- export
    def on_train_end(self) -> None:
        """After the final val bpb (callbacks run first): the final Lightning checkpoint, then the export (§5.8)."""
        if not self._finished:
            return  # stopped by something else (e.g. trainer.max_time): nanochat saves only at last_step
        for callback in self.trainer.checkpoint_callbacks:
            # the last trained batch's save came before the final eval, and only if save_every divided the step
            if isinstance(callback, StepCheckpoint) and callback.should_save(self.trainer):
                callback.save(self.trainer)
        if not self.hparams.dry_run:
            self.export_nanochat(self.export_dir())

    def export_dir(self) -> Path:
        """``<base_dir>/mid_checkpoints/d{depth}``: the depth of the model, whatever tag it came from (§5.8)."""
        return self.base_dir() / "mid_checkpoints" / f"d{self.gpt.config.n_layer}"

    def export_nanochat(self, ckpt_dir: Path) -> None:
        """Write ``model_/meta_/optim_..._rank0`` like mid_train (§5.8), rank 0 only; collective (sharded
        optimizers gather their state on rank 0 first, so the file loads at any world size)."""
        optimizers, _ = self.optimizers_for_export()
        if self.trainer.is_global_zero:
            step = self.global_step
            datamodule = self.trainer.datamodule
            user_config = {**getattr(datamodule, "hparams", {}), **self.hparams}
            meta = {
                "step": step,
                "val_bpb": self.loop_state()["val_bpb"],
                # the export's sequence_len is mid's max_seq_len, not the base model's (§5.8)
                "model_config": {**self.gpt.config.to_dict(), "sequence_len": self.hparams.max_seq_len},
                "user_config": {k: v for k, v in user_config.items() if not k.startswith("_")},  # no CLI internals
            }
            save_nanochat(self.gpt, ckpt_dir, step, meta, optimizers, rank=0)
            rank_zero_info(f"exported the mid-trained model in nanochat's format to {ckpt_dir}")
        self.trainer.strategy.barrier("MidModule.export_nanochat")

    # ------------------------------------------------------------------------------------------ plan
    def training_plan(self) -> dict[str, str]:
        """The base model, batch math, horizon, LRs and FLOPs, shown at the start of a run (rank zero)."""
        hp = self.hparams
        config = self.gpt.config
        world_size = self.trainer.world_size
        horizon = "one epoch of the train mixture"
        if self.num_iterations >= 0:
            horizon = f"{self.num_iterations:,} steps (num_iterations={self.num_iterations + 1}) or the epoch's end"
        plan = {
            "base model": self.init_source,
            "model": f"d{config.n_layer}: {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
                     f"vocab {config.vocab_size:,}",
            "parameters": f"{self.gpt.num_params():,}",
            "FLOPs per token": f"{self.flops_per_token:e}",
            "world size": str(world_size),
            "batch": f"{hp.device_batch_size} x {hp.max_seq_len} tokens per device x {self.grad_accum_steps} "
                     f"accumulation x {world_size} devices = {hp.total_batch_size:,} tokens/step",
            "horizon": horizon,
            "LR schedule": "by epoch progress: constant to 80%, then linear to 0; Muon momentum 0.85 -> 0.95 "
                           "over 300 steps",
            "grad clip": f"{hp.grad_clip:g}" if hp.grad_clip > 0 else "off",
            "dtype": f"{hp.dtype} (trainer.precision {self.trainer.precision})",
            "export": "off (dry_run)" if hp.dry_run else str(self.export_dir()),
        }
        return {**plan, **self.loss_head_plan(), **self.lr_plan()}


__all__ = ["MidModule"]

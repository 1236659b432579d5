"""Supervised fine-tuning (nanochat d575940 ``scripts/chat_sft.py``) as a stage of the shared training core.

What differs from mid-training:

* the model is by default the mid-trained one (``source="mid"``: the largest ``d<N>`` under
  ``<base_dir>/mid_checkpoints/`` at its last step), or the base one (``source="base"``), or ``init_from`` a nanolit
  ``.ckpt`` or a nanochat folder;
* a micro-batch is ``device_batch_size`` whole conversations, each row padded to the micro-batch's longest, and the
  loss sees only what the assistant writes (targets -1 elsewhere, :mod:`nanolit.data.sft`); nothing is packed.
  A step is ``target_examples_per_step`` conversations: ``device_batch_size`` per rank times the accumulation;
* the horizon is known up front: ``num_iterations``, else whole steps per epoch times ``num_epochs``. chat_sft's loop
  stops at step ``num_iterations - 1`` without training it, so ``num_iterations - 1`` steps train, here as there;
* every LR starts at ``init_lr_frac`` (0.02) of its base value and falls linearly, ``1 - step/num_iterations``;
  Muon's momentum stays at 0.95 (chat_sft has no ramp) and gradients are not clipped;
* chat_sft validates with the mean loss on SmolTalk test batches and the MMLU and ARC-Easy accuracies; in nanolit
  those are the ``ValidationLoss`` and ``ChatEvaluation`` callbacks (configs/sft.yaml turns them on);
* the export goes to ``<base_dir>/chatsft_checkpoints/d{depth}/``: the model and a meta with ``step``, ``val_loss``,
  the accuracies of the final chat evaluation (``mmlu_acc``...) and ``model_config``, and no optimizer file, as
  chat_sft saves it (nanolit adds ``user_config`` and ``nanolit_run``), so nanochat's ``load_model("sft")`` reads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from nanolit.checkpoint import SOURCE_DIRS
from nanolit.common import NanolitError
from nanolit.data.chat import MAX_TOKENS
from nanolit.data.loader import check_batch_knobs
from nanolit.data.sft import DEVICE_BATCH_SIZE, TARGET_EXAMPLES_PER_STEP, sft_grad_accum_steps, sft_num_iterations
from nanolit.eval.chat import accuracy_key
from nanolit.lightning_adapter import set_max_steps
from nanolit.midtrain import DTYPES, FromCheckpointStage
from nanolit.module import TrainingCore, check_loss_chunk_size, set_lr
from nanolit.schedules import sft_lr_multiplier

SOURCES = ("base", "mid")  # chat_sft's `source`
# what to do when the source folder holds no model
NO_MODEL_FIX = {
    "mid": "mid-train one first (nanolit fit -c configs/mid.yaml), or pass --model.source=base or "
           "--model.init_from PATH",
    "base": "train one first (nanolit fit -c configs/quickstart.yaml), or pass --model.init_from PATH",
}


class SFTStage(FromCheckpointStage):
    """SFT's part: the model to fine-tune, the padded micro-batches, chat_sft's horizon and LR, the export."""

    optimizer_files_on_every_rank = False
    export_optimizer = False  # chat_sft saves the model and its meta, not the optimizer
    loads = "model to fine-tune"
    trains = "fine-tune"

    def __init__(self) -> None:
        super().__init__()
        self.iterations = -1  # chat_sft's num_iterations: the LR's horizon, one more than the steps trained
        self.step_positions = 0  # input positions (padding included) of the step being trained, on this rank

    # ----------------------------------------------------------------------------------------- model
    def checkpoints_folder(self, core: TrainingCore) -> str:
        return SOURCE_DIRS[core.hparams.source]

    def base_checkpoint(self, core: TrainingCore) -> tuple[Path, int | None]:
        """As mid-training's, from ``<base_dir>/<source>_checkpoints``; an empty one is named with the way out."""
        hp = core.hparams
        if hp.init_from is None and not hp.model_tag:
            folder = core.base_dir() / self.checkpoints_folder(core)
            if not any(folder.glob("*/model_*.pt")):
                raise NanolitError(f"no {hp.source} model in {folder} to fine-tune; {NO_MODEL_FIX[hp.source]}")
        return super().base_checkpoint(core)

    def setup(self, core: TrainingCore) -> None:
        hp, trainer = core.hparams, core.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if not hasattr(datamodule, "num_train_examples"):
            raise NanolitError(f"SFTModule needs a DataModule with num_train_examples (nanolit.data.sft_datamodule."
                               f"SFTDataModule), got {type(datamodule).__name__}")
        self._check_dtype(core)
        if hp.num_iterations > 0:
            iterations, source = hp.num_iterations, "num_iterations"
        else:
            examples = datamodule.num_train_examples
            iterations = sft_num_iterations(examples, hp.target_examples_per_step, hp.num_epochs)
            source = (f"num_epochs={hp.num_epochs} x ({examples:,} conversations // "
                      f"{hp.target_examples_per_step} per step)")
        if iterations < 2:
            raise NanolitError(f"num_iterations={iterations} (from {source}) trains nothing: chat_sft trains "
                               "num_iterations - 1 steps; raise num_iterations or num_epochs, or lower "
                               "target_examples_per_step")
        if trainer.max_steps not in (-1, None, iterations - 1):
            raise NanolitError(f"trainer.max_steps={trainer.max_steps} contradicts the {iterations - 1} steps SFT "
                               f"trains ({source}); drop trainer.max_steps or set --model.num_iterations="
                               f"{trainer.max_steps + 1}")
        self.iterations = iterations
        core.num_iterations, core.horizon_source = iterations - 1, source
        set_max_steps(trainer, iterations - 1)

    # ------------------------------------------------------------------------------------- training
    def micro_batches(self, core: TrainingCore, batch: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The step's micro-batches: a list of ``grad_accum_steps`` pairs ``(inputs [B, W], targets [B, W])``."""
        if not isinstance(batch, (list, tuple)) or len(batch) != core.grad_accum_steps or \
                not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in batch):
            got = f"a list of {len(batch)}" if isinstance(batch, (list, tuple)) else type(batch).__name__
            raise NanolitError(f"expected an SFT step of {core.grad_accum_steps} micro-batches (inputs, targets), got "
                               f"{got}; use nanolit.data.sft_datamodule.SFTDataModule with the module's "
                               "device_batch_size and target_examples_per_step")
        return iter(batch)

    def on_train_batch_start(self, core: TrainingCore, batch: Any) -> int | None:
        self.step_positions = sum(inputs.numel() for inputs, _ in batch)  # shapes only: nothing waits on the device
        return None

    def lr_multiplier(self, core: TrainingCore, step: int) -> float:
        return sft_lr_multiplier(step, self.iterations)

    def apply_schedule(self, core: TrainingCore, step: int, lrm: float, optimizers: list) -> dict[str, float]:
        """The LR alone: chat_sft leaves Muon's momentum at the 0.95 it was built with."""
        set_lr(optimizers, lrm)
        return {}

    # ---------------------------------------------------------------------------------------- export
    def reached_end(self, core: TrainingCore) -> bool:
        """chat_sft saves after its loop, at step ``num_iterations - 1`` (not when something else stopped the run)."""
        return core.global_step >= core.num_iterations

    def export_dir(self, core: TrainingCore) -> Path | None:
        """``<base_dir>/chatsft_checkpoints/d{depth}``: the depth of the model, whatever tag it came from."""
        if not core.hparams.export:
            return None
        return core.base_dir() / SOURCE_DIRS["sft"] / f"d{core.model().config.n_layer}"

    def export_meta(self, core: TrainingCore) -> dict[str, Any]:
        """chat_sft's meta: step, val_loss, the final chat accuracies (``mmlu_acc``, ``arc_easy_acc``...), model
        config; and the run's knobs."""
        state = core.run_state.flush()
        chat = state.chat["results"] if state.chat and state.chat["step"] == core.global_step else {}
        datamodule = core.trainer.datamodule
        user_config = {**getattr(datamodule, "hparams", {}), **core.user_config()}
        return {
            "step": core.global_step,
            "val_loss": state.val_loss,
            **{accuracy_key(name): accuracy for name, accuracy in chat.items()},
            "model_config": core.gpt.config.to_dict(),
            "user_config": {k: v for k, v in user_config.items() if not k.startswith("_")},
        }

    def plan(self, core: TrainingCore) -> dict[str, str]:
        hp, world = core.hparams, core.trainer.world_size
        return {
            "batch": f"{hp.device_batch_size} conversations per device x {core.grad_accum_steps} accumulation x "
                     f"{world} device{'s' if world != 1 else ''} = {hp.target_examples_per_step} conversations/step, "
                     f"each micro-batch padded to its longest (cut at {hp.max_seq_len} tokens)",
            "model to fine-tune": f"{self.init_source} ({self.init_origin})",
            "horizon": f"{core.num_iterations:,} steps: num_iterations={self.iterations} ({core.horizon_source}), "
                       f"whose last step chat_sft does not train",
            "LR schedule": f"{hp.init_lr_frac:g} x the base LRs, then linear to 0 (1 - step/{self.iterations}); "
                           "Muon momentum 0.95",
            "dtype": self.dtype_plan(core),
        }


class SFTModule(TrainingCore):
    """nanochat's supervised fine-tuning. chat_sft's knobs keep their names and defaults; nanolit's own
    (``init_from``, ``depth``, ``max_seq_len``, ``grad_clip``, ``compile``, ``export``, ``shard_optimizer``,
    ``loss_chunk_size``) default to what chat_sft does.

    Args:
        source: ``"mid"`` or ``"base"``: start from the largest ``d<N>`` under ``<base_dir>/mid_checkpoints/`` or
            ``base_checkpoints/`` (``base_dir`` is the DataModule's).
        init_from: start from this nanolit ``.ckpt`` or nanochat checkpoint folder instead of ``source``.
        model_tag: the folder under the source's checkpoints when ``init_from`` is ``None``; ``None``: the largest.
        step: the checkpoint step in a nanochat folder; ``None`` takes the last one.
        depth: the model's depth, which the checkpoint decides: ``None`` records it from there; a number is checked.
        dtype: ``"bfloat16"`` or ``"float32"``; must agree with ``trainer.precision`` (as ``MidModule``).
        device_batch_size: conversations per micro-batch per device (linked into the data).
        num_epochs: epochs of the train mixture when ``num_iterations`` is -1.
        num_iterations: chat_sft's horizon (``num_iterations - 1`` steps train); -1 derives it from the epochs.
        target_examples_per_step: conversations per optimizer step over all devices; sets the accumulation (linked).
        unembedding_lr, embedding_lr, matrix_lr, weight_decay: optimizer knobs, as base training.
        init_lr_frac: every LR starts at this fraction of its base value.
        max_seq_len: conversations are cut at this many tokens (nanochat's ``render_conversation`` cuts at 2048).
        grad_clip: global gradient-norm clip; 0 (chat_sft) disables it.
        compile: ``torch.compile`` the GPT; off by default, as chat_sft (every batch has another width).
        vocab_size: the tokenizer's, linked by the CLI; checked against the checkpoint's.
        export: write the final model to ``<base_dir>/chatsft_checkpoints/d{depth}/`` in nanochat's layout.
        shard_optimizer, loss_chunk_size: as base training (``GPTModule``).
    """

    def __init__(
        self,
        source: str = "mid",
        init_from: str | None = None,
        model_tag: str | None = None,
        step: int | None = None,
        depth: int | None = None,
        dtype: str = "bfloat16",
        device_batch_size: int = DEVICE_BATCH_SIZE,
        num_epochs: int = 1,
        num_iterations: int = -1,
        target_examples_per_step: int = TARGET_EXAMPLES_PER_STEP,
        unembedding_lr: float = 0.004,
        embedding_lr: float = 0.2,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.0,
        init_lr_frac: float = 0.02,
        max_seq_len: int = MAX_TOKENS,
        grad_clip: float = 0.0,
        compile: bool | None = False,
        vocab_size: int | None = None,
        export: bool = True,
        shard_optimizer: bool = False,
        loss_chunk_size: int = 0,
    ):
        if source not in SOURCES:
            raise NanolitError(f"source must be one of {', '.join(SOURCES)} (the checkpoints to fine-tune), "
                               f"got {source!r}")
        if dtype not in DTYPES:
            raise NanolitError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        check_batch_knobs(max_seq_len, device_batch_size, target_examples_per_step)
        if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or \
                (num_iterations < 1 and num_iterations != -1):
            raise NanolitError(f"num_iterations must be a positive number of steps, or -1 to derive it from "
                               f"num_epochs, got {num_iterations!r}")
        check_loss_chunk_size(loss_chunk_size)
        super().__init__(SFTStage())
        self.save_hyperparameters()

    @property
    def tokens_per_step(self) -> int:
        """The step's input positions (padding included) on this rank, times the world size: an SFT step's size
        varies, and ranks pad differently, so under DDP it is an estimate. Before the first step: the capacity."""
        hp = self.hparams
        world = self.trainer.world_size if self._trainer is not None else 1
        positions = self.stage.step_positions or hp.target_examples_per_step // world * hp.max_seq_len
        return positions * world

    def micro_batches_per_step(self) -> int:
        hp = self.hparams
        return sft_grad_accum_steps(hp.target_examples_per_step, hp.device_batch_size, self.trainer.world_size)

    def micro_batches(self, batch: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.stage.micro_batches(self, batch)


__all__ = ["SFTModule", "SFTStage"]

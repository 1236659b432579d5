"""``LightningCLI`` for nanolit: nanochat's knobs, linked batch math, and the default callbacks and loggers.

- Shared knobs are typed once on the model (``--model.max_seq_len``, ``--model.device_batch_size``,
  ``--model.total_batch_size``) and linked into the DataModule; the tokenizer's vocab size is linked back.
- The default callbacks are always there and configured by their own groups: ``--bpb.eval_every``,
  ``--core.core_metric_every``, ``--sample.sample_every``, ``--checkpoint.save_every`` (nanochat's names).
- ``--run NAME`` turns on wandb like nanochat (``dummy``, the default, means no wandb); a CSV log is always written.
- ``--resume_from_nanochat DIR`` continues a nanochat base-training run (``nanolit.resume``).
- What a person sees: the plan table, nanochat's line per step and its closing lines (``StepLine``, also in a log
  file), and a rich progress bar when stdout is a terminal.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from nanolit.callbacks import (BPBValidation, ChatEvaluation, COREEvaluation, EMALossLogger, NanoProgressBar,
                               PreemptionCheckpoint, ReportWriter, RunState, Sampler, StepCheckpoint, StepLine,
                               TokenThroughputMonitor, ValidationLoss)
from nanolit.common import NanolitError, load_tensors
from nanolit.data.datamodule import BaseDataModule
from nanolit.module import TrainingCore
from nanolit.resume import resume_from_nanochat
from nanolit.strategies import NoWrapDDPStrategy  # noqa: F401  (registers --trainer.strategy=ddp_nowrap)

DEFAULT_ROOT = "runs/default"
# How the callbacks' one-line errors name the ways out, in this command's flags.
CLI_HINTS = {"resume": "--ckpt_path last", "new_root": "another --trainer.default_root_dir",
             "overwrite": "--checkpoint.overwrite=true"}


class SaveConfigAtTrainStart(SaveConfigCallback):
    """LightningCLI's config file, written once training starts: a run that stops on bad input during setup leaves
    no log folder behind."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        return

    def on_train_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, "fit")


class NanoCLI(LightningCLI):
    """``nanolit fit -c CONFIG``: ``GPTModule``/``BaseDataModule`` or subclasses (``class_path`` in the config)."""

    def __init__(self, args=None, **kwargs):
        super().__init__(
            TrainingCore, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True,
            auto_configure_optimizers=False,  # Muon + AdamW come from the module's configure_optimizers
            save_config_callback=SaveConfigAtTrainStart,
            save_config_kwargs={"overwrite": True},  # a resumed run writes its config into the same folder
            seed_everything_default=42,
            # a bad flag or config raises, and `nanolit` prints it in one line instead of the whole usage
            parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in self.subcommands()}},
            args=args, **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run", type=str, default="dummy",
                            help="wandb run name; 'dummy' (nanochat's default) disables wandb")
        parser.add_argument("--resume_from_nanochat", type=str | None, default=None,
                            help="start from a nanochat checkpoint folder (its last step) or a model_<step>.pt")
        parser.add_lightning_class_args(EMALossLogger, "ema")
        parser.add_lightning_class_args(BPBValidation, "bpb")
        parser.add_lightning_class_args(COREEvaluation, "core")
        parser.add_lightning_class_args(Sampler, "sample")
        # SFT's validation (chat_sft's val loss and chat metrics); off unless a config turns them on (configs/sft.yaml)
        parser.add_lightning_class_args(ValidationLoss, "val_loss")
        parser.add_lightning_class_args(ChatEvaluation, "chat_eval")
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        for knob in ("max_seq_len", "device_batch_size", "total_batch_size", "target_examples_per_step"):
            parser.link_arguments(f"model.init_args.{knob}", f"data.init_args.{knob}")
        parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=lambda dm: dm.vocab_size,
                              apply_on="instantiate")
        # No default model class: jsonargparse carries a default class's knob values over to another class given
        # later when the names match, so a 2026 config would silently inherit GPTModule's warmdown_ratio,
        # weight_decay and LRs. Every config names its class (`nanolit fit -c configs/...`).
        parser.set_defaults({
            "data": {"class_path": "nanolit.data.datamodule.BaseDataModule"},
            "trainer.precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
            "trainer.default_root_dir": DEFAULT_ROOT,
            "trainer.limit_val_batches": 0,  # validation is the BPB callback, at nanochat's steps
            "trainer.num_sanity_val_steps": 0,
            "trainer.log_every_n_steps": 1,
            "trainer.enable_model_summary": False,  # the plan table shows the model; Lightning's counts no FLOPs
            "trainer.max_epochs": -1,  # the horizon is the model's num_iterations (max_steps)
            "val_loss.eval_every": -1,
            "chat_eval.eval_metrics_every": -1,
        })

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        root = Path(trainer_config.get("default_root_dir") or DEFAULT_ROOT)
        ckpt = self._get(self.config_init, "checkpoint")
        if ckpt.dirpath is None:  # a fixed folder, so `--ckpt_path last` finds it on relaunch
            ckpt.dirpath = str(root / "checkpoints")
        ckpt.hints = dict(CLI_HINTS)
        self._get(self.config_init, "preemption").resume_hint = CLI_HINTS["resume"]
        # The run state first, then the step line, so a step's line comes before the next step's evaluations.
        defaults = [RunState(), StepLine(step_offset=self._step_offset()), TokenThroughputMonitor(),
                    LearningRateMonitor(logging_interval="step"), ReportWriter()]
        show_bar = trainer_config.get("enable_progress_bar", True) is not False
        if show_bar and sys.stdout.isatty():  # in a log file a live bar is noise; the step lines say it all
            defaults.append(NanoProgressBar())
        kwargs.setdefault("callbacks", defaults + list(trainer_config.get("callbacks") or []))
        kwargs.setdefault("enable_progress_bar", show_bar and sys.stdout.isatty())
        if trainer_config.get("logger") in (None, True):  # the user's own logger choice wins
            kwargs.setdefault("logger", self._default_loggers(root, self._get(self.config_init, "run")))
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would load a ckpt_path file here and let its saved hyperparameters override the command line
        # (for a file path, not for `last`). nanolit keeps the run's knobs where the user gives them, the same for
        # both spellings, and checks the checkpoint against them when it loads (one line for another depth or vocab).
        # The file itself is checked now: missing, truncated or refused by torch's safe loader gets one line.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc") and not str(ckpt_path).startswith("registry"):
            if not Path(ckpt_path).is_file():
                raise NanolitError(f"--ckpt_path {ckpt_path} does not exist; pass a checkpoint file, or `last` for "
                                   "the newest one in the run's checkpoints folder")
            load_tensors(ckpt_path, mmap=True)

    def before_fit(self) -> None:
        source = self._get(self.config_init, "resume_from_nanochat")
        if source:  # the nanochat step becomes the checkpoint that fit() loads
            fit_args = self.config_init[self.subcommand]
            fit_args["ckpt_path"] = resume_from_nanochat(self.trainer, source, fit_args.get("ckpt_path"))

    def _step_offset(self) -> int:
        """mid_train prints its step after incrementing it; base_train before (the EMA's ``debias_offset`` too)."""
        return self._get(self.config_init, "ema").debias_offset

    @staticmethod
    def _default_loggers(root: Path, run: str) -> list:
        loggers = [CSVLogger(save_dir=str(root), name="logs")]
        if run != "dummy":
            try:
                from lightning.pytorch.loggers import WandbLogger
                import wandb  # noqa: F401  (WandbLogger only fails later, deep inside setup)
            except ImportError:
                raise NanolitError(f"--run {run} asks for wandb, which is not installed; `pip install wandb` "
                                   "or leave --run at 'dummy'") from None
            loggers.append(WandbLogger(project="nanolit", name=run, save_dir=str(root)))
        return loggers

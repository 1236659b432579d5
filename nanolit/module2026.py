"""Base training with nanochat's 2026 recipe (nanochat 92d63d4 ``scripts/base_train.py``) on the shared core.

The second generation, picked by configuration (``model: class_path: nanolit.module2026.GPT2026Module`` with
``data: class_path: nanolit.data.datamodule.BestFitDataModule``); the d575940 recipe (``GPTModule``) is unchanged.
What this stage brings to :class:`nanolit.module.TrainingCore`:

* the model and every derived figure from :func:`nanolit.recipe2026.plan_2026`: width from ``aspect_ratio`` and
  ``head_dim``, the batch from the depth when ``total_batch_size=-1``, the LRs and weight decay scaled from the
  d12 reference, the horizon (target tokens at ``target_param_data_ratio`` 12);
* one ``MuonAdamW`` (or its sharded form), the 40-step warmup and 0.65 warmdown to 0.05, Muon's momentum
  0.85 -> 0.97 -> 0.90 and its cosine weight decay; no gradient clipping;
* weights cast to the compute dtype instead of autocast: bf16 on CUDA with SM >= 80, fp32 elsewhere (nanochat's
  ``NANOCHAT_DTYPE`` overrides), so the Trainer runs ``32-true``;
* the export in 92d63d4's layout (``model_``, ``meta_``, one ``MuonAdamW`` state per rank file).
"""
from __future__ import annotations

from typing import Any

import torch

from nanolit.checkpoint import nanochat_meta_2026
from nanolit.common import NanolitError
from nanolit.data.loader import check_batch_knobs
from nanolit.lightning_adapter import set_max_steps
from nanolit.model2026 import GPT2026, detect_compute_dtype
from nanolit.module import BaseStage, TrainingCore, check_loss_chunk_size
from nanolit.optim2026 import build_muon_adamw
from nanolit.recipe2026 import Knobs2026, Plan2026, plan_2026
from nanolit.schedules import lr_multiplier_2026, muon_momentum_2026, muon_weight_decay_2026


class Base2026Stage(BaseStage):
    """The 2026 recipe's base training; the horizon check, export target and data position are base training's."""

    optimizer_files_on_every_rank = False  # rank 0 writes nanochat's per-rank files from the consolidated state

    def __init__(self) -> None:
        self.recipe: Plan2026 | None = None  # the derived figures, for this world size

    def knobs(self, core: TrainingCore) -> Knobs2026:
        hp = core.hparams
        return Knobs2026(vocab_size=core.vocab_size(), **{name: hp[name] for name in Knobs2026.__dataclass_fields__
                                                            if name != "vocab_size"})

    def make_plan(self, core: TrainingCore) -> Plan2026:
        world = core.trainer.world_size if core._trainer is not None else 1
        if self.recipe is None or self.recipe.world_size != world:
            self.recipe = plan_2026(self.knobs(core), world)
        return self.recipe

    def build(self, core: TrainingCore) -> GPT2026:
        with torch.device("meta"):
            return GPT2026(self.make_plan(core).model_config)

    def setup(self, core: TrainingCore) -> None:
        precision = str(core.trainer.precision)
        if precision not in ("32-true", "32"):
            raise NanolitError(f"the 2026 recipe casts its weights to the compute dtype itself (bf16 on recent GPUs), "
                               f"so trainer.precision={precision} would autocast twice; pass --trainer.precision "
                               "32-true")
        plan = self.make_plan(core)
        core.num_iterations, core.horizon_source = plan.num_iterations, plan.horizon_source
        trainer = core.trainer
        if trainer.max_steps not in (-1, None, core.num_iterations):
            raise NanolitError(f"trainer.max_steps={trainer.max_steps} contradicts the model's horizon of "
                               f"{core.num_iterations} steps ({core.horizon_source}); drop trainer.max_steps "
                               f"or set --model.num_iterations={trainer.max_steps}")
        set_max_steps(trainer, core.num_iterations)
        self._check_export_target(core)

    def materialize(self, core: TrainingCore, device: torch.device) -> None:
        gpt = core.gpt
        if gpt.transformer.wte.weight.is_meta:
            gpt.compute_dtype, _ = detect_compute_dtype(device)
            gpt.to_empty(device=device)
            gpt.init_weights(seed=core.hparams.seed)

    # ------------------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self, core: TrainingCore):
        kwargs = self.make_plan(core).optimizer_kwargs()
        if core.hparams.shard_optimizer:
            from nanolit.sharded2026 import build_sharded_muon_adamw

            return build_sharded_muon_adamw(core.gpt, **kwargs)
        return build_muon_adamw(core.gpt, **kwargs)

    def lr_multiplier(self, core: TrainingCore, step: int) -> float:
        hp = core.hparams
        return lr_multiplier_2026(step, core.num_iterations, hp.warmup_steps, hp.warmdown_ratio, hp.final_lr_frac)

    def apply_schedule(self, core: TrainingCore, step: int, lrm: float, optimizers: list) -> dict[str, float]:
        (optimizer,) = optimizers
        n = core.num_iterations
        momentum = muon_momentum_2026(step, n, core.hparams.warmdown_ratio)
        weight_decay = muon_weight_decay_2026(step, n, self.recipe.weight_decay)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = momentum, weight_decay
        return {"muon_momentum": momentum, "muon_weight_decay": weight_decay}

    def grad_clip(self, core: TrainingCore) -> float:
        return 0.0  # nanochat 92d63d4 does not clip

    # --------------------------------------------------------------------------------------------- export
    def export_meta(self, core: TrainingCore) -> dict[str, Any]:
        datamodule = getattr(core.trainer, "datamodule", None)
        loader = (datamodule.state_dict().get("train_loader") or [{}])[0] if datamodule is not None else {}
        state = core.run_state.flush()
        return nanochat_meta_2026(self.recipe, core.global_step, state.val_bpb, loader, state.loop_state(),
                                  user_config=core.user_config())

    def plan(self, core: TrainingCore) -> dict[str, str]:
        plan = self.make_plan(core)
        rows = dict(plan.table_rows())
        compute_dtype, why = detect_compute_dtype(core.trainer.strategy.root_device)
        rows["compute dtype"] = f"{str(compute_dtype).removeprefix('torch.')} ({why})"
        for key in ("model", "parameters", "FLOPs per token", "batch"):  # the core's own rows say these
            rows.pop(key, None)
        return rows


class GPT2026Module(TrainingCore):
    """nanochat's 2026 base training. The knobs are base_train's at 92d63d4, with its names (dashes become
    underscores) and defaults; nanolit's own (``compile``, ``export``, ``shard_optimizer``, ``loss_chunk_size``) as
    in ``GPTModule``.

    Args:
        depth, aspect_ratio, head_dim, window_pattern: the model (width ``ceil(depth*aspect_ratio/head_dim)``
            heads of ``head_dim``; sliding windows tiled from ``window_pattern``, the last layer full).
        max_seq_len, device_batch_size: T and B per micro-batch per device.
        total_batch_size: tokens per optimizer step over all devices; -1 picks it from the depth.
        embedding_lr, unembedding_lr, matrix_lr, scalar_lr, weight_decay: reference values, scaled by the batch
            (and the weight decay by the horizon) as nanochat does; the plan table shows what is used.
        warmup_steps, warmdown_ratio, final_lr_frac: the LR schedule.
        num_iterations, target_flops, target_param_data_ratio: the horizon, in that precedence (-1 disables one).
        vocab_size: the tokenizer's (the CLI links it); the model pads it to a multiple of 64.
        seed, model_tag, export, compile, shard_optimizer, loss_chunk_size: as ``GPTModule``.
    """

    def __init__(
        self,
        depth: int = 20,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        max_seq_len: int = 2048,
        window_pattern: str = "SSSL",
        device_batch_size: int = 32,
        total_batch_size: int = -1,
        embedding_lr: float = 0.3,
        unembedding_lr: float = 0.008,
        matrix_lr: float = 0.02,
        scalar_lr: float = 0.5,
        weight_decay: float = 0.28,
        warmup_steps: int = 40,
        warmdown_ratio: float = 0.65,
        final_lr_frac: float = 0.05,
        num_iterations: int = -1,
        target_flops: float = -1.0,
        target_param_data_ratio: float = 12,
        compile: bool | None = None,
        vocab_size: int | None = None,
        seed: int = 42,
        model_tag: str = "",
        export: bool = True,
        shard_optimizer: bool = False,
        loss_chunk_size: int = 0,
    ):
        check_batch_knobs(max_seq_len, device_batch_size, total_batch_size if total_batch_size != -1 else 1)
        check_loss_chunk_size(loss_chunk_size)
        super().__init__(Base2026Stage())
        self.save_hyperparameters()

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all ranks: the knob, or the batch the plan picked from the depth."""
        return self.stage.make_plan(self).total_batch_size


__all__ = ["Base2026Stage", "GPT2026Module"]

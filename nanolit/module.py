"""The LightningModule: nanochat's base_train loop as manual optimization (spec §4).

One ``training_step`` is one optimizer step. The batch holds the step's ``grad_accum_steps`` micro-batches
(``[A, B, T+1]`` token ids); each is forwarded and back-propagated with the DDP all-reduce skipped on all but
the last, then: one global-norm clip, this step's LR multiplier and Muon momentum, AdamW and Muon steps.
Everything Lightning counts (``global_step``, ``max_steps``, checkpoint intervals, the logger x-axis, the
progress bar) therefore counts optimizer steps, as nanochat's ``step`` does.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from nanolit.callbacks.periodic import log_to_loggers
from nanolit.checkpoint import save_nanochat
from nanolit.common import NanolitError, get_base_dir
from nanolit.data.loader import grad_accum_steps
from nanolit.model import GPT, GPTConfig
from nanolit.optim import build_optimizers
from nanolit.schedules import lr_multiplier, muon_momentum


def resolve_num_iterations(num_iterations: int, target_flops: float, target_param_data_ratio: float,
                           num_params: int, flops_per_token: float, total_batch_size: int) -> tuple[int, str]:
    """The training horizon and where it came from, by nanochat's precedence (spec §4.3)."""
    if num_iterations > 0:
        return num_iterations, "num_iterations"
    if target_flops > 0:
        return round(target_flops / (flops_per_token * total_batch_size)), f"target_flops={target_flops:e}"
    if target_param_data_ratio > 0:
        return int(target_param_data_ratio * num_params) // total_batch_size, \
            f"target_param_data_ratio={target_param_data_ratio}"
    raise NanolitError("no training horizon: set one of num_iterations, target_flops or "
                       "target_param_data_ratio to a positive value")


class GPTModule(L.LightningModule):
    """nanochat base training. base_train's knobs keep their names and defaults; nanolit's own (``compile``,
    ``export``, ``shard_optimizer``, ``loss_chunk_size``) default to what nanochat does on one GPU.

    Args:
        depth: transformer layers; width is ``64*depth`` and heads have dim 128 (spec §1.2).
        max_seq_len: context length T.
        device_batch_size: sequences per micro-batch per device (B).
        total_batch_size: tokens per optimizer step across all devices; sets gradient accumulation.
        embedding_lr, unembedding_lr, matrix_lr, weight_decay: optimizer knobs (spec §1.13).
        grad_clip: global gradient-norm clip; 0 disables.
        warmup_ratio, warmdown_ratio, final_lr_frac: LR schedule (spec §4.7).
        num_iterations, target_flops, target_param_data_ratio: horizon, in that precedence (spec §4.3).
        init_lr_frac: scales every group's LR at the start (1.0 for base training).
        compile: ``torch.compile`` the GPT for training; ``None`` means on CUDA only.
        vocab_size: taken from the DataModule's tokenizer when ``None`` (the CLI links it).
        seed: the weight-init seed (nanochat: 42 on every rank).
        model_tag: nanochat's output folder name; the final model is exported in nanochat's format to
            ``<base_dir>/base_checkpoints/<model_tag or d{depth}>/`` (``export=False`` skips it).
        loss_chunk_size: compute the loss head ``loss_chunk_size`` rows (of ``B*T``) at a time instead of all at
            once (``nanolit.loss``): same loss and gradients, without the ``[B*T, vocab]`` fp32 logits in memory,
            so a larger ``device_batch_size`` fits; 0 (nanochat's one-shot head) disables it.
        shard_optimizer: shard the optimizer state and Muon's work across ranks like nanochat's
            DistAdamW/DistMuon (``nanolit.sharded``); needs ``--trainer.strategy=ddp_nowrap``. The optimizers
            average the gradients themselves, so the clip sees each rank's local gradient, as in nanochat (§16.1).
    """

    def __init__(
        self,
        depth: int = 20,
        max_seq_len: int = 2048,
        device_batch_size: int = 32,
        total_batch_size: int = 524288,
        embedding_lr: float = 0.2,
        unembedding_lr: float = 0.004,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        warmup_ratio: float = 0.0,
        warmdown_ratio: float = 0.2,
        final_lr_frac: float = 0.0,
        num_iterations: int = -1,
        target_flops: float = -1.0,
        target_param_data_ratio: float = 20,
        init_lr_frac: float = 1.0,
        compile: bool | None = None,
        vocab_size: int | None = None,
        seed: int = 42,
        model_tag: str = "",
        export: bool = True,
        shard_optimizer: bool = False,
        loss_chunk_size: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.gpt: GPT | None = None
        self.num_iterations: int = -1
        self.horizon_source = ""
        self.last_train_loss: torch.Tensor | None = None
        self._finite_check: tuple | None = None  # CUDA: the last step's finite flag, read at the next step
        self._flops_per_token: float | None = None

    # ----------------------------------------------------------------------------------------- model
    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig.from_depth(self.hparams.depth, vocab_size=vocab_size, sequence_len=self.hparams.max_seq_len)

    def _meta_model(self) -> GPT:
        # Parameters stay on the meta device until configure_model: no memory is spent before the Trainer
        # knows the device, and num_params/FLOPs are available for the plan and the horizon right away.
        vocab_size = self.hparams.vocab_size
        if vocab_size is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "vocab_size"):
                raise NanolitError("vocab_size is unknown: pass --model.vocab_size or a DataModule with a tokenizer")
            vocab_size = datamodule.vocab_size
        with torch.device("meta"):
            return GPT(self.model_config(vocab_size))

    @property
    def eval_model(self) -> GPT:
        """The uncompiled GPT, for evaluations with varying shapes (CORE, sampling), like nanochat's orig_model."""
        return self.gpt

    @property
    def flops_per_token(self) -> float:
        """Forward+backward FLOPs per token (spec §1.11); available once attached to a Trainer."""
        if self._flops_per_token is None:
            self._flops_per_token = (self.gpt if self.gpt is not None else self._meta_model()).estimate_flops()
        return self._flops_per_token

    @property
    def tokens_per_step(self) -> int:
        return self.hparams.total_batch_size

    def setup(self, stage: str) -> None:
        gpt = self.gpt if self.gpt is not None else self._meta_model()
        hp = self.hparams
        self.grad_accum_steps = grad_accum_steps(hp.total_batch_size, hp.device_batch_size, hp.max_seq_len,
                                                 self.trainer.world_size)
        self.num_iterations, self.horizon_source = resolve_num_iterations(
            hp.num_iterations, hp.target_flops, hp.target_param_data_ratio, gpt.num_params(),
            gpt.estimate_flops(), hp.total_batch_size)
        if self.num_iterations < 1:
            raise NanolitError(f"the horizon from {self.horizon_source} is {self.num_iterations} steps; "
                               f"raise it or lower total_batch_size ({hp.total_batch_size})")
        # The derived horizon is the Trainer's: nobody types max_steps twice. An explicit, different
        # trainer.max_steps is a contradiction we refuse rather than silently pick one of.
        max_steps = self.trainer.max_steps
        if max_steps not in (-1, None, self.num_iterations):
            raise NanolitError(f"trainer.max_steps={max_steps} contradicts the model's horizon of "
                               f"{self.num_iterations} steps ({self.horizon_source}); drop trainer.max_steps "
                               f"or set --model.num_iterations={max_steps}")
        self.trainer.fit_loop.epoch_loop.max_steps = self.num_iterations
        # registered last: a meta-device model that fails the checks above must not reach teardown's .cpu()
        self.gpt = gpt

    def configure_model(self) -> None:
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as nanochat's compute_init (§4.2)
        if self.gpt.transformer.wte.weight.is_meta:
            self.gpt.to_empty(device=device)
            self.gpt.init_weights(seed=self.hparams.seed)
            if not self._bf16_training():
                # nanochat's bf16 wte assumes bf16 autocast; any other precision trains wte in fp32 (dtype honoured)
                self.gpt.transformer.wte.float()
        use_compile = self.hparams.compile
        if use_compile is None:
            use_compile = self.gpt.get_device().type == "cuda"
        # Compile the inner GPT only (lightning-notes §4: compiling the LightningModule breaks self.log on
        # torch 2.13). Kept out of the module registry so state_dict keys stay nanochat's, without _orig_mod.
        self.__dict__["train_model"] = torch.compile(self.gpt, dynamic=False) if use_compile else self.gpt

    def _bf16_training(self) -> bool:
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        return precision.startswith("bf16")

    # ------------------------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        hp = self.hparams
        build = build_optimizers
        if hp.shard_optimizer:
            from nanolit.sharded import build_sharded_optimizers
            from nanolit.strategies import NoWrapDDPStrategy

            if self.trainer.world_size > 1 and not isinstance(self.trainer.strategy, NoWrapDDPStrategy):
                raise NanolitError("shard_optimizer averages gradients itself; run it with "
                                   "--trainer.strategy=ddp_nowrap (a DDP wrapper would all-reduce them twice)")
            build = build_sharded_optimizers
        optimizers = build(self.gpt, unembedding_lr=hp.unembedding_lr, embedding_lr=hp.embedding_lr,
                           matrix_lr=hp.matrix_lr, weight_decay=hp.weight_decay)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = group["lr"] * hp.init_lr_frac
        return optimizers

    def lr_multiplier(self, step: int) -> float:
        """This step's LR multiplier; the mid-training module overrides it with a progress-based one."""
        hp = self.hparams
        return lr_multiplier(step, self.num_iterations, hp.warmup_ratio, hp.warmdown_ratio, hp.final_lr_frac)

    # ------------------------------------------------------------------------------------- training
    def loss_per_token(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy in nats, ``[B*T]`` (protocol for the BPB callback)."""
        return self.eval_model(x, y, loss_reduction="none", loss_chunk_size=self.hparams.loss_chunk_size)

    def generate(self, tokens: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation with the KV cache (protocol for the sampling callback)."""
        return list(self.eval_model.generate(tokens, max_tokens, temperature=0.0))

    def inputs_and_targets(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` from one micro-batch of ``T+1``-token rows; the mid-training module decodes masked targets."""
        return tokens[:, :-1], tokens[:, 1:]

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        adamw, muon = self.optimizers()
        step = self.global_step  # optimizer steps completed before this one == nanochat's `step`
        if batch.dim() != 3 or batch.size(0) != self.grad_accum_steps:
            raise NanolitError(f"expected a step batch of shape [grad_accum={self.grad_accum_steps}, B, T+1], "
                               f"got {tuple(batch.shape)}; use a nanolit DataModule with the same batch knobs")
        strategy = self.trainer.strategy
        total = torch.zeros((), device=batch.device)
        for i in range(self.grad_accum_steps):
            x, y = self.inputs_and_targets(batch[i])
            loss = self.train_model(x, y, loss_chunk_size=self.hparams.loss_chunk_size)
            last = i == self.grad_accum_steps - 1
            # skip the DDP all-reduce on every micro-step but the last (lightning-notes §1)
            sync = contextlib.nullcontext() if last or not isinstance(strategy, ParallelStrategy) \
                else strategy.block_backward_sync()
            with sync:
                self.manual_backward(loss / self.grad_accum_steps)
            total += loss.detach()
        self.last_train_loss = loss.detach()  # nanochat logs the last micro-step's loss (spec §4.10 step 7)

        grad_norm = None
        if self.hparams.grad_clip > 0:
            # one norm over Muon's and AdamW's parameters together, as nanochat does
            grad_norm = torch.nn.utils.clip_grad_norm_(self.gpt.parameters(), self.hparams.grad_clip)
        lrm = self.lr_multiplier(step)
        for opt in (adamw.optimizer, muon.optimizer):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        momentum = muon_momentum(step)
        for group in muon.optimizer.param_groups:
            group["momentum"] = momentum
        # Only the AdamW step goes through Lightning, so global_step counts 1 per training_step; two
        # LightningOptimizer steps would count 2 (Lightning issue #17958, lightning-notes §1).
        adamw.step()
        muon.optimizer.step()
        self.gpt.zero_grad(set_to_none=True)
        # Only on Lightning's logging steps (log_every_n_steps, LearningRateMonitor's test) and straight to the
        # loggers: self.log costs ~0.5 ms a value, and reading the grad norm stops the host until the GPU is done,
        # so it happens after the whole step is queued (issue 7).
        if self.trainer._logger_connector.should_update_logs:
            metrics = {"train/lrm": lrm, "train/muon_momentum": momentum}
            if grad_norm is not None:
                metrics["train/grad_norm"] = grad_norm.item()
            log_to_loggers(self.trainer, metrics, step=step)
        return {"loss": total / self.grad_accum_steps}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Reading the loss right away would stop the host every step on CUDA (issue 7). There the finite flag is
        # copied to pinned memory without blocking and read at the next step, when the copy is long done; the
        # last step is read at once. Elsewhere reading is free, so every step is checked on the spot.
        loss, step = outputs["loss"], self.global_step - 1
        previous, self._finite_check = self._finite_check, None
        if loss.device.type == "cuda" and self.global_step < self.trainer.max_steps:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(torch.isfinite(loss), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._finite_check = (flag, done, loss, step)
        else:
            self._check_finite(torch.isfinite(loss), loss, step)
        if previous is not None:
            flag, done, loss, step = previous
            done.synchronize()
            self._check_finite(flag, loss, step)

    @staticmethod
    def _check_finite(finite: torch.Tensor, loss: torch.Tensor, step: int) -> None:
        if not finite:
            raise NanolitError(f"training loss is {loss.item()} at step {step}; the run stopped and "
                               f"the last good checkpoint is kept: resume from it with a lower LR or check the data")

    # ---------------------------------------------------------------------------------------- export
    def on_train_end(self) -> None:
        # Runs after the callbacks' final evaluations, so the meta holds the final val bpb like nanochat's.
        # The final Lightning checkpoint was already written at the last step, before CORE and sampling.
        if self.hparams.export:
            self.export_nanochat(self.export_dir())

    def base_dir(self) -> Path:
        """The DataModule's base dir (nanochat's layout), or the default one."""
        return get_base_dir(getattr(getattr(self.trainer, "datamodule", None), "base_dir", None))

    def export_dir(self) -> Path:
        return self.base_dir() / "base_checkpoints" / (self.hparams.model_tag or f"d{self.hparams.depth}")

    def loop_state(self) -> dict:
        """nanochat's meta ``loop_state`` and ``val_bpb``, read from the callbacks that track them."""
        state = {"min_val_bpb": math.inf, "smooth_train_loss": 0.0, "total_training_time": 0.0, "val_bpb": None}
        for cb in self.trainer.callbacks:
            if hasattr(cb, "min_val_bpb"):
                state["min_val_bpb"], state["val_bpb"] = cb.min_val_bpb, cb.last_val_bpb
            if hasattr(cb, "smooth") and hasattr(cb, "beta"):
                state["smooth_train_loss"] = cb.smooth
            if hasattr(cb, "total_training_time"):
                state["total_training_time"] = cb.total_training_time
        return state

    def export_nanochat(self, ckpt_dir: Path) -> None:
        """Write ``model_/meta_/optim_`` files in nanochat's layout (spec §4.14); collective, call on all ranks."""
        step = self.global_step
        loop = self.loop_state()
        datamodule = getattr(self.trainer, "datamodule", None)
        loader = (datamodule.state_dict().get("train_loader") or [{}])[0] if datamodule is not None else {}
        meta = {
            "step": step,
            "val_bpb": loop.pop("val_bpb"),
            "model_config": self.gpt.config.to_dict(),
            "user_config": {k: v for k, v in self.hparams.items() if not k.startswith("_")},  # no CLI internals
            "device_batch_size": self.hparams.device_batch_size,
            "max_seq_len": self.hparams.max_seq_len,
            "dataloader_state_dict": dict(loader),  # pq_idx, rg_idx (+ nanolit's exact position)
            "loop_state": loop,
        }
        optimizers, sharded = self.optimizers_for_export()
        rank = self.trainer.global_rank
        if not sharded or rank == 0:  # rank 0 writes model + meta; unsharded, every rank its optimizer file
            save_nanochat(self.gpt, ckpt_dir, step, meta, optimizers, rank=rank)
        self.trainer.strategy.barrier("export_nanochat")
        if self.trainer.is_global_zero:
            rank_zero_info(f"exported the final model in nanochat's format to {ckpt_dir}")

    def optimizers_for_export(self) -> tuple[list, bool]:
        """``(raw optimizers, sharded?)``, their ``state_dict()`` ready on rank 0; collective, call on all ranks.

        Sharded optimizers gather the full single-process layout on rank 0 (which then loads at any world size);
        their ``state_dict()`` is only valid there.
        """
        optimizers = [getattr(opt, "optimizer", opt) for opt in self.trainer.optimizers]
        sharded = any(hasattr(opt, "consolidate_state_dict") for opt in optimizers)
        if sharded:
            for opt in optimizers:
                opt.consolidate_state_dict()
        return optimizers, sharded

    def lr_plan(self) -> dict[str, str]:
        """The starting LR of every parameter group, after scaling, for the training plan."""
        return {f"lr {type(opt).__name__}/{group['name']}": f"{group['initial_lr']:.6g}"
                for opt in self.trainer.optimizers for group in opt.param_groups}

    # ------------------------------------------------------------------------------------------ plan
    def training_plan(self) -> dict[str, str]:
        """The derived batch math, horizon, LRs and FLOPs, shown at the start of a run (rank zero)."""
        hp = self.hparams
        n_params = self.gpt.num_params()
        tokens = hp.total_batch_size * self.num_iterations
        plan = {
            "model": f"d{hp.depth}: {self.gpt.config.n_layer} layers, width {self.gpt.config.n_embd}, "
                     f"{self.gpt.config.n_head} heads, vocab {self.gpt.config.vocab_size:,}",
            "parameters": f"{n_params:,}",
            "FLOPs per token": f"{self.flops_per_token:e}",
            "world size": str(self.trainer.world_size),
            "batch": f"{hp.device_batch_size} x {hp.max_seq_len} tokens per device x {self.grad_accum_steps} "
                     f"accumulation x {self.trainer.world_size} devices = {hp.total_batch_size:,} tokens/step",
            "iterations": f"{self.num_iterations:,} (from {self.horizon_source})",
            "training tokens": f"{tokens:,}",
            "tokens : params": f"{tokens / n_params:.2f}",
            "total FLOPs": f"{self.flops_per_token * tokens:e}",
            "LR schedule": f"warmup {hp.warmup_ratio:g}, constant, warmdown {hp.warmdown_ratio:g} "
                           f"to {hp.final_lr_frac:g}x; Muon momentum 0.85 -> 0.95 over 300 steps",
            "grad clip": f"{hp.grad_clip:g}" if hp.grad_clip > 0 else "off",
            "precision": str(self.trainer.precision),
        }
        return {**plan, **self.loss_head_plan(), **self.lr_plan()}

    def loss_head_plan(self) -> dict[str, str]:
        """How the loss head runs (``loss_chunk_size``), for the training plan."""
        chunk, rows = self.hparams.loss_chunk_size, self.hparams.device_batch_size * self.hparams.max_seq_len
        if chunk <= 0:
            return {"loss head": f"one shot: [{rows:,} x vocab] logits per micro-batch (loss_chunk_size=0)"}
        return {"loss head": f"chunks of {min(chunk, rows):,} rows, {math.ceil(rows / chunk)} per micro-batch"}

    def on_fit_start(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask, not only rank zero
        if self.trainer.is_global_zero:
            plan = self.training_plan()
            plan["logs"] = str(log_dir)
            ckpt_dir = getattr(self.trainer.checkpoint_callback, "dirpath", None)
            if ckpt_dir:
                plan["checkpoints"] = str(ckpt_dir)
            print_plan(plan)


def print_plan(plan: dict[str, str]) -> None:
    """Print the plan as a rich table (plain lines if rich cannot render)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but the plan must never be what breaks a run
        rank_zero_info("\n".join(f"{k}: {v}" for k, v in plan.items()))
        return
    table = Table(title="nanolit training plan", show_header=False)
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in plan.items():
        table.add_row(key, value)
    Console().print(table)


__all__ = ["GPTModule", "resolve_num_iterations", "print_plan"]

"""The training core every stage shares, and base training (nanochat d575940 ``scripts/base_train.py``) on it.

One ``training_step`` is one optimizer step. The batch holds the step's ``grad_accum_steps`` micro-batches
(``[A, B, T+1]`` token ids); each is forwarded and back-propagated with the DDP all-reduce skipped on all but the
last, then: one global-norm clip, this step's LR multiplier and Muon momentum, AdamW and Muon steps. Everything
Lightning counts (``global_step``, ``max_steps``, checkpoint intervals, the logger x-axis, the progress bar) therefore
counts optimizer steps, as nanochat's ``step`` does.

:class:`TrainingCore` is that loop, the optimizers, the evaluation protocol the callbacks use, the nanochat export
and the plan table. A stage (:class:`BaseStage` here, ``MidStage`` in ``nanolit.midtrain``) is composed into it and
adds only what differs: where the model comes from, the horizon and LR schedule, how targets are read from the
batch, and where and what the export writes.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from nanolit.checkpoint import save_nanochat
from nanolit.common import NanolitError, get_base_dir
from nanolit.cpu import compile_by_default, keep_freed_memory
from nanolit.data.loader import check_batch_knobs, grad_accum_steps
from nanolit.lightning_adapter import is_logging_step, keep_unregistered, log_to_loggers, set_max_steps
from nanolit.model import GPT, GPTConfig
from nanolit.optim import build_optimizers
from nanolit.runstate import RunState
from nanolit.schedules import lr_multiplier, muon_momentum


def resolve_num_iterations(num_iterations: int, target_flops: float, target_param_data_ratio: float,
                           num_params: int, flops_per_token: float, total_batch_size: int) -> tuple[int, str]:
    """The training horizon and where it came from, by nanochat's precedence: ``num_iterations``, then
    ``target_flops``, then ``target_param_data_ratio`` (the first that is positive; ``-1`` disables one)."""
    if num_iterations == 0:
        raise NanolitError("num_iterations=0 trains nothing; give a positive number of steps, or -1 to derive the "
                           "horizon from target_flops or target_param_data_ratio")
    if num_iterations > 0:
        return num_iterations, "num_iterations"
    if target_flops > 0:
        return round(target_flops / (flops_per_token * total_batch_size)), f"target_flops={target_flops:e}"
    if target_param_data_ratio > 0:
        return int(target_param_data_ratio * num_params) // total_batch_size, \
            f"target_param_data_ratio={target_param_data_ratio}"
    raise NanolitError("no training horizon: set one of num_iterations, target_flops or "
                       "target_param_data_ratio to a positive value")


# Rows per chunk of the loss head when ``loss_chunk_size`` is None and training is compiled on a CPU: the chunked
# head is no slower there (compiled forward+backward, vocab 4096, 4 x 256 tokens: 0.88x the one-shot head's time
# at d2, 0.99x at d4; benchmarks/README.md).
CPU_LOSS_CHUNK_ROWS = 512


def check_loss_chunk_size(loss_chunk_size: int | None) -> None:
    if loss_chunk_size is None:
        return
    if isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size < 0:
        raise NanolitError(f"loss_chunk_size must be a whole number of rows >= 0 (0: the one-shot head), "
                           f"got {loss_chunk_size!r}")


class TrainingCore(L.LightningModule):
    """The loop, optimizers, evaluation protocol, export and plan that base and mid-training share.

    A subclass's ``__init__`` takes its stage's knobs (nanochat's names), saves them as hyperparameters once, and
    composes its stage; every knob this class reads (batch math, optimizer, ``grad_clip``, ``init_lr_frac``,
    ``compile``, ``vocab_size``, ``shard_optimizer``, ``loss_chunk_size``) is among them.
    """

    def __init__(self, stage: Any) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.stage = stage
        self.gpt: GPT | None = None
        self.num_iterations: int = -1
        self.horizon_source = ""
        self.grad_accum_steps = 1
        self.last_train_loss: torch.Tensor | None = None
        self.run_state = RunState()  # replaced by the trainer's in setup
        self._flops_per_token: float | None = None
        self._restored_step = 0
        self._pending_gpt: GPT | None = None  # built for early questions (FLOPs), registered by setup

    # ------------------------------------------------------------------------------- model and facts
    def model(self) -> GPT:
        """The GPT: registered once ``setup`` has checked it, else the stage's (for facts asked early)."""
        if self.gpt is not None:
            return self.gpt
        if self._pending_gpt is None:
            keep_unregistered(self, "_pending_gpt", self.stage.build(self))
        return self._pending_gpt

    def vocab_size(self) -> int:
        """The tokenizer's vocab (the CLI links it to ``vocab_size``), else the DataModule's."""
        if self.hparams.vocab_size is not None:
            return self.hparams.vocab_size
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "vocab_size"):
            raise NanolitError("vocab_size is unknown: pass --model.vocab_size or a DataModule with a tokenizer")
        return datamodule.vocab_size

    @property
    def eval_model(self) -> GPT:
        """The uncompiled GPT, for evaluations with varying shapes (CORE, sampling), like nanochat's orig_model."""
        return self.gpt

    @property
    def flops_per_token(self) -> float:
        """Forward+backward FLOPs per token of the GPT (nanochat's ``estimate_flops``)."""
        if self._flops_per_token is None:
            self._flops_per_token = self.model().estimate_flops()
        return self._flops_per_token

    @property
    def tokens_per_step(self) -> int:
        return self.hparams.total_batch_size

    def base_dir(self) -> Path:
        """The DataModule's base dir (nanochat's layout), or the default one."""
        return get_base_dir(getattr(getattr(self.trainer, "datamodule", None), "base_dir", None))

    def setup(self, stage: str) -> None:
        self.run_state = RunState.of(self.trainer)
        gpt = self.model()
        self.grad_accum_steps = self.micro_batches_per_step()
        self.stage.setup(self)
        self.gpt = gpt  # registered last: a model that failed a check must not reach teardown
        keep_unregistered(self, "_pending_gpt", None)

    def micro_batches_per_step(self) -> int:
        """Gradient accumulation on this world size: ``tokens_per_step`` over ``B*T`` tokens per rank."""
        hp = self.hparams
        return grad_accum_steps(self.tokens_per_step, hp.device_batch_size, hp.max_seq_len, self.trainer.world_size)

    def configure_model(self) -> None:
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if device.type == "cuda":
            # TF32 for fp32 matmuls, as nanochat d575940 nanochat/common.py compute_init
            torch.set_float32_matmul_precision("high")
        self.stage.materialize(self, device)
        if self.gpt.get_device().type == "cpu":
            keep_freed_memory()  # every step reallocates the same large tensors: no page faults for them
        use_compile = self.compiles()
        # Compile the inner GPT only: compiling the LightningModule breaks self.log on torch 2.13. Kept out of the
        # module registry so state_dict keys stay nanochat's, without _orig_mod.
        keep_unregistered(self, "train_model", torch.compile(self.gpt, dynamic=False) if use_compile else self.gpt)

    def compiles(self) -> bool:
        """Whether training runs compiled: the ``compile`` knob, and for ``None`` :func:`compile_by_default` (CUDA, and
        CPUs with a C++ compiler). Muon's Newton-Schulz follows it."""
        if self.hparams.compile is not None:
            return bool(self.hparams.compile)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        return compile_by_default(device)

    def loss_chunk_rows(self) -> int:
        """The loss head's chunk (``loss_chunk_size``); ``None`` picks :data:`CPU_LOSS_CHUNK_ROWS` where training is
        compiled on a CPU, else 0 (nanochat's one-shot head)."""
        chunk = self.hparams.loss_chunk_size
        if chunk is not None:
            return chunk
        on_cpu = self._trainer is None or self.trainer.strategy.root_device.type == "cpu"
        return CPU_LOSS_CHUNK_ROWS if on_cpu and self.compiles() else 0

    def bf16_training(self) -> bool:
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        return precision.startswith("bf16")

    # ------------------------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        if self.hparams.shard_optimizer:
            from nanolit.strategies import NoWrapDDPStrategy

            if self.trainer.world_size > 1 and not isinstance(self.trainer.strategy, NoWrapDDPStrategy):
                raise NanolitError("shard_optimizer averages gradients itself; run it with "
                                   "--trainer.strategy=ddp_nowrap (a DDP wrapper would all-reduce them twice)")
        return self.stage.configure_optimizers(self)

    # ------------------------------------------------------------------------------------- training
    def loss_per_token(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy in nats, ``[B*T]`` (protocol for the BPB callback)."""
        return self.eval_model(x, y, loss_reduction="none", loss_chunk_size=self.loss_chunk_rows())

    def generate(self, tokens: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation with the KV cache (protocol for the sampling callback)."""
        return list(self.eval_model.generate(tokens, max_tokens, temperature=0.0))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of another model shape (depth, vocab) cannot resume this run: one line says which knob."""
        self._restored_step = checkpoint.get("global_step", 0)  # the loop's own counter is restored only later
        saved = {k.removeprefix("gpt."): v for k, v in checkpoint.get("state_dict", {}).items()}
        ours = self.gpt.state_dict()
        differ = [k for k in ours if k not in saved or tuple(saved[k].shape) != tuple(ours[k].shape)]
        if not differ:
            return
        hp, theirs = self.hparams, checkpoint.get("hyper_parameters", {})
        wte = saved.get("transformer.wte.weight")
        parts = [f"depth {theirs.get('depth')} (this run: {hp.get('depth')})"] if theirs.get("depth") != hp.get(
            "depth") else []
        if wte is not None and wte.shape[0] != self.gpt.config.vocab_size:
            parts.append(f"a {wte.shape[0]}-token vocab (this run's tokenizer: {self.gpt.config.vocab_size})")
        what = " and ".join(parts) or f"other shapes ({differ[0]})"
        raise NanolitError(f"the checkpoint to resume from ({self.trainer.ckpt_path}) has {what}; resume with the "
                           "run's own knobs and tokenizer, or start a new run without --ckpt_path")

    def on_train_batch_start(self, batch: torch.Tensor, batch_idx: int) -> int | None:
        return self.stage.on_train_batch_start(self, batch)

    def micro_batches(self, batch: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The step's ``grad_accum_steps`` micro-batches as ``(x, y)``, read by the stage from a ``[A, B, T+1]``
        token batch (checked here, before any of them is trained)."""
        if batch.dim() != 3 or batch.size(0) != self.grad_accum_steps:
            raise NanolitError(f"expected a step batch of shape [grad_accum={self.grad_accum_steps}, B, T+1], "
                               f"got {tuple(batch.shape)}; use a nanolit DataModule with the same batch knobs")
        return (self.stage.inputs_and_targets(batch[i]) for i in range(self.grad_accum_steps))

    def training_step(self, batch: torch.Tensor, batch_idx: int):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        step = self.global_step  # optimizer steps completed before this one == nanochat's `step`
        micro_batches = self.micro_batches(batch)
        strategy = self.trainer.strategy
        total = torch.zeros((), device=self.device)
        chunk = self.loss_chunk_rows()
        for i, (x, y) in enumerate(micro_batches):
            loss = self.train_model(x, y, loss_chunk_size=chunk)
            last = i == self.grad_accum_steps - 1
            # skip the DDP all-reduce on every micro-step but the last: one gradient sync per optimizer step
            sync = contextlib.nullcontext() if last or not isinstance(strategy, ParallelStrategy) \
                else strategy.block_backward_sync()
            with sync:
                self.manual_backward(loss / self.grad_accum_steps)
            total += loss.detach()
        self.last_train_loss = loss.detach()  # nanochat logs the last micro-step's loss
        mean_loss = total / self.grad_accum_steps
        self.run_state.watch_loss(mean_loss, step)

        grad_norm = None
        clip = self.stage.grad_clip(self)
        if clip > 0:
            # one norm over every parameter (Muon's and AdamW's together), as nanochat does
            grad_norm = torch.nn.utils.clip_grad_norm_(self.gpt.parameters(), clip)
        lrm = self.stage.lr_multiplier(self, step)
        scheduled = self.stage.apply_schedule(self, step, lrm, [opt.optimizer for opt in optimizers])
        # Only the first optimizer steps through Lightning, so global_step counts 1 per training_step; two
        # LightningOptimizer steps would count 2 (Lightning issue #17958).
        optimizers[0].step()
        for opt in optimizers[1:]:
            opt.optimizer.step()
        self.gpt.zero_grad(set_to_none=True)
        # Only on logging steps and straight to the loggers: self.log costs ~0.5 ms a value, and reading the grad
        # norm stops the host until the GPU is done, so it happens after the whole step is queued.
        if is_logging_step(self.trainer, step):
            self.run_state.lrm = lrm
            self.run_state.grad_norm = grad_norm.item() if grad_norm is not None else None
            metrics = {"train/lrm": lrm, **{f"train/{k}": v for k, v in scheduled.items()}}
            if grad_norm is not None:
                metrics["train/grad_norm"] = self.run_state.grad_norm
            log_to_loggers(self.trainer, metrics, step=step)
        return {"loss": mean_loss}

    def on_train_end(self) -> None:
        self.run_state.resolve_pending()  # the last step's loss, read at once (on CUDA it was not yet)
        # Runs after the callbacks' final evaluations, so the meta holds the final val bpb like nanochat's.
        target = self.stage.export_dir(self)
        if target is not None and self.stage.reached_end(self):
            self.export_nanochat(target)

    # ---------------------------------------------------------------------------------------- export
    def export_nanochat(self, ckpt_dir: Path) -> None:
        """Write ``model_/meta_/optim_`` files in nanochat's layout for this stage; collective, call on all ranks.

        Sharded optimizers gather the full single-process layout on rank 0 first (it then loads at any world size).
        Which ranks write an optimizer file is the stage's rule (its ``optimizer_files_on_every_rank``): nanochat's
        d575940 base_train writes one per rank, its mid_train rank 0's alone; for 92d63d4 rank 0 writes nanochat's
        per-rank files itself, from the consolidated state.
        """
        optimizers = [getattr(opt, "optimizer", opt) for opt in self.trainer.optimizers]
        sharded = any(hasattr(opt, "consolidate_state_dict") for opt in optimizers)
        if sharded:
            for opt in optimizers:
                opt.consolidate_state_dict()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        every_rank = self.stage.optimizer_files_on_every_rank and not sharded
        if rank == 0 or every_rank:
            meta = {**self.stage.export_meta(self), "nanolit_run": self.run_id()} if rank == 0 else {}
            save_nanochat(self.gpt, ckpt_dir, self.global_step, meta,
                          optimizers if self.stage.export_optimizer else None, rank=rank,
                          world_size=1 if every_rank else world)
        self.trainer.strategy.barrier("export_nanochat")
        if self.trainer.is_global_zero:
            rank_zero_info(f"exported the final model in nanochat's format to {ckpt_dir}")

    def run_id(self) -> str:
        """This run's root folder: recorded in the export's meta, so a later run can tell whose export it finds."""
        return str(Path(self.trainer.default_root_dir).resolve())

    def user_config(self) -> dict[str, Any]:
        """The run's knobs for the export meta's ``user_config`` (no LightningCLI internals)."""
        return {k: v for k, v in self.hparams.items() if not k.startswith("_")}

    # ------------------------------------------------------------------------------------------ plan
    def training_plan(self) -> dict[str, str]:
        """The derived batch math, horizon, LRs and FLOPs, shown at the start of a run (rank zero)."""
        hp, gpt = self.hparams, self.gpt
        config, world = gpt.config, self.trainer.world_size
        heads = f"{config.n_head} head{'s' if config.n_head != 1 else ''}"
        plan = {
            "model": f"d{config.n_layer}: {config.n_layer} layers, width {config.n_embd}, {heads}, "
                     f"vocab {config.vocab_size:,}",
            "parameters": f"{gpt.num_params():,}",
            "FLOPs per token": f"{self.flops_per_token:e}",
            "device": device_description(self.trainer.strategy.root_device),
            "world size": f"{world} ({self.trainer.num_nodes} node{'s' if self.trainer.num_nodes != 1 else ''})",
            "batch": f"{hp.device_batch_size} x {hp.max_seq_len} tokens per device x {self.grad_accum_steps} "
                     f"accumulation x {world} device{'s' if world != 1 else ''} = {self.tokens_per_step:,} tokens/step",
            **self.stage.plan(self),
            "grad clip": f"{self.stage.grad_clip(self):g}" if self.stage.grad_clip(self) > 0 else "off",
            "precision": str(self.trainer.precision),
            **self.compile_plan(),
            **self.loss_head_plan(),
            **{f"lr {type(opt).__name__}/{group.get('name', group.get('kind', i))}": f"{group['initial_lr']:.6g}"
               for opt in self.trainer.optimizers for i, group in enumerate(opt.param_groups)},
        }
        target = self.stage.export_dir(self)
        plan["export"] = str(target) if target is not None else "off"
        return plan

    def compile_plan(self) -> dict[str, str]:
        """Whether training is compiled, and what that costs up front, for the training plan."""
        device = self.trainer.strategy.root_device
        if self.compiles():
            return {"compile": "on (torch.compile): the first step pays the compilation, ~10-60 s cold, seconds from "
                               "torch's cache; --model.compile=false runs eager"}
        if self.hparams.compile is None and device.type == "cpu":
            return {"compile": "off: no C++ compiler for torch.compile's CPU kernels (install g++ to compile)"}
        return {"compile": "off (eager)"}

    def loss_head_plan(self) -> dict[str, str]:
        """How the loss head runs (``loss_chunk_size``), for the training plan."""
        chunk, rows = self.loss_chunk_rows(), self.hparams.device_batch_size * self.hparams.max_seq_len
        if chunk <= 0:
            return {"loss head": f"one shot: [{rows:,} x vocab] logits per micro-batch (loss_chunk_size=0)"}
        return {"loss head": f"chunks of {min(chunk, rows):,} rows, {math.ceil(rows / chunk)} per micro-batch"}

    def on_fit_start(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask, not only rank zero
        if not self.trainer.is_global_zero:
            return
        if 0 < self.trainer.max_steps <= self._restored_step:
            print(f"this run already finished: step {self._restored_step} of {self.trainer.max_steps} is in the "
                  "checkpoint; nothing to train (its report and export are where the first run wrote them)")
            return
        plan = self.training_plan()
        plan["logs"] = str(log_dir)
        ckpt_dir = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        if ckpt_dir:
            plan["checkpoints"] = str(ckpt_dir)
        print_plan(plan)


class Dec2025Stage:
    """What every stage of nanochat d575940 shares: AdamW for the embedding and the unembedding, Muon for the
    matrices (``init_lr_frac`` scales both), the Muon momentum ramp, and the ``grad_clip`` knob."""

    export_optimizer = True  # the nanochat export holds optimizer files (chat_sft's holds none)

    def configure_optimizers(self, core: TrainingCore) -> list:
        hp = core.hparams
        build = build_optimizers
        if hp.shard_optimizer:
            from nanolit.sharded import build_sharded_optimizers

            build = build_sharded_optimizers
        optimizers = build(core.gpt, unembedding_lr=hp.unembedding_lr, embedding_lr=hp.embedding_lr,
                           matrix_lr=hp.matrix_lr, weight_decay=hp.weight_decay, compile_ns=core.compiles())
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = group["lr"] * hp.init_lr_frac
        return optimizers

    def apply_schedule(self, core: TrainingCore, step: int, lrm: float, optimizers: list) -> dict[str, float]:
        """This step's LR on every group and Muon momentum on Muon's; returns what to log."""
        adamw, muon = optimizers
        set_lr(optimizers, lrm)
        momentum = muon_momentum(step)
        for group in muon.param_groups:
            group["momentum"] = momentum
        return {"muon_momentum": momentum}

    def grad_clip(self, core: TrainingCore) -> float:
        return core.hparams.grad_clip


class BaseStage(Dec2025Stage):
    """Base training: a fresh GPT from ``depth``, nanochat's horizon rule and LR schedule, and the export to
    ``<base_dir>/base_checkpoints/<model_tag or d{depth}>/``."""

    optimizer_files_on_every_rank = True

    def build(self, core: TrainingCore) -> GPT:
        # Parameters stay on the meta device until configure_model: no memory is spent before the Trainer
        # knows the device, and num_params/FLOPs are available for the plan and the horizon right away.
        hp = core.hparams
        with torch.device("meta"):
            return GPT(GPTConfig.from_depth(hp.depth, vocab_size=core.vocab_size(), sequence_len=hp.max_seq_len))

    def setup(self, core: TrainingCore) -> None:
        hp, gpt, trainer = core.hparams, core.model(), core.trainer
        core.num_iterations, core.horizon_source = resolve_num_iterations(
            hp.num_iterations, hp.target_flops, hp.target_param_data_ratio, gpt.num_params(),
            gpt.estimate_flops(), hp.total_batch_size)
        if core.num_iterations < 1:
            raise NanolitError(f"the horizon from {core.horizon_source} is {core.num_iterations} steps; "
                               f"raise it or lower total_batch_size ({hp.total_batch_size})")
        # The derived horizon is the Trainer's: nobody types max_steps twice. An explicit, different
        # trainer.max_steps is a contradiction we refuse rather than silently pick one of.
        if trainer.max_steps not in (-1, None, core.num_iterations):
            raise NanolitError(f"trainer.max_steps={trainer.max_steps} contradicts the model's horizon of "
                               f"{core.num_iterations} steps ({core.horizon_source}); drop trainer.max_steps "
                               f"or set --model.num_iterations={trainer.max_steps}")
        set_max_steps(trainer, core.num_iterations)
        self._check_export_target(core)

    def _check_export_target(self, core: TrainingCore) -> None:
        """The export must not replace another run's files of the same step (a different step sits beside them)."""
        target = self.export_dir(core)
        meta_path = target / f"meta_{core.num_iterations:06d}.json" if target is not None else None
        if meta_path is None or not meta_path.exists():
            return
        try:
            owner = json.loads(meta_path.read_text()).get("nanolit_run")
        except (OSError, ValueError):
            owner = None
        if owner != core.run_id():
            by = f"the run in {owner}" if owner else "another program (nanochat?)"
            raise NanolitError(f"{target} already holds step {core.num_iterations} exported by {by}; export this "
                               "run elsewhere with --model.model_tag=NAME, or not at all with --model.export=false")

    def reached_end(self, core: TrainingCore) -> bool:
        """nanochat's base_train exports at its last step (not when something else stopped the run)."""
        return core.global_step >= core.num_iterations

    def materialize(self, core: TrainingCore, device: torch.device) -> None:
        gpt = core.gpt
        if gpt.transformer.wte.weight.is_meta:
            gpt.to_empty(device=device)
            gpt.init_weights(seed=core.hparams.seed)
            if not core.bf16_training():
                # nanochat's bf16 wte assumes bf16 autocast; any other precision trains wte in fp32 (dtype honoured)
                gpt.transformer.wte.float()

    def on_train_batch_start(self, core: TrainingCore, batch: torch.Tensor) -> int | None:
        return None

    def inputs_and_targets(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens[:, :-1], tokens[:, 1:]

    def lr_multiplier(self, core: TrainingCore, step: int) -> float:
        hp = core.hparams
        return lr_multiplier(step, core.num_iterations, hp.warmup_ratio, hp.warmdown_ratio, hp.final_lr_frac)

    def export_dir(self, core: TrainingCore) -> Path | None:
        hp = core.hparams
        return core.base_dir() / "base_checkpoints" / (hp.model_tag or f"d{hp.depth}") if hp.export else None

    def export_meta(self, core: TrainingCore) -> dict[str, Any]:
        """base_train's meta: step, val_bpb, model and user config, batch knobs, data position, loop state."""
        datamodule = getattr(core.trainer, "datamodule", None)
        loader = (datamodule.state_dict().get("train_loader") or [{}])[0] if datamodule is not None else {}
        return {
            "step": core.global_step,
            "val_bpb": core.run_state.flush().val_bpb,
            "model_config": core.gpt.config.to_dict(),
            "user_config": core.user_config(),
            "device_batch_size": core.hparams.device_batch_size,
            "max_seq_len": core.hparams.max_seq_len,
            "dataloader_state_dict": dict(loader),  # pq_idx, rg_idx (+ nanolit's exact position)
            "loop_state": core.run_state.loop_state(),
        }

    def plan(self, core: TrainingCore) -> dict[str, str]:
        hp = core.hparams
        tokens = hp.total_batch_size * core.num_iterations
        return {
            "iterations": f"{core.num_iterations:,} (from {core.horizon_source})",
            "training tokens": f"{tokens:,}",
            "tokens : params": f"{tokens / core.gpt.num_params():.2f}",
            "total FLOPs": f"{core.flops_per_token * tokens:e}",
            "LR schedule": f"warmup {hp.warmup_ratio:g}, constant, warmdown {hp.warmdown_ratio:g} "
                           f"to {hp.final_lr_frac:g}x; Muon momentum 0.85 -> 0.95 over 300 steps",
        }


class GPTModule(TrainingCore):
    """nanochat base training. base_train's knobs keep their names and defaults; nanolit's own (``compile``,
    ``export``, ``shard_optimizer``, ``loss_chunk_size``) default to what nanochat does on one GPU.

    Args:
        depth: transformer layers; width is ``64*depth`` and heads have dim 128.
        max_seq_len: context length T.
        device_batch_size: sequences per micro-batch per device (B).
        total_batch_size: tokens per optimizer step across all devices; sets gradient accumulation.
        embedding_lr, unembedding_lr, matrix_lr, weight_decay: optimizer knobs (AdamW for the embedding and the
            unembedding, Muon for the matrices).
        grad_clip: global gradient-norm clip; 0 disables.
        warmup_ratio, warmdown_ratio, final_lr_frac: the LR schedule.
        num_iterations, target_flops, target_param_data_ratio: the horizon, in that precedence (-1 disables one).
        init_lr_frac: scales every group's LR at the start (1.0 for base training).
        compile: ``torch.compile`` the GPT (and Muon's Newton-Schulz) for training; ``None`` means on CUDA, and on
            a CPU where torch finds a C++ compiler (``nanolit.cpu.compile_by_default``).
        vocab_size: taken from the DataModule's tokenizer when ``None`` (the CLI links it).
        seed: the weight-init seed (nanochat: 42 on every rank).
        model_tag: nanochat's output folder name; the final model is exported in nanochat's format to
            ``<base_dir>/base_checkpoints/<model_tag or d{depth}>/`` (``export=False`` skips it).
        loss_chunk_size: compute the loss head ``loss_chunk_size`` rows (of ``B*T``) at a time instead of all at
            once (``nanolit.loss``): same loss and gradients, without the ``[B*T, vocab]`` fp32 logits in memory,
            so a larger ``device_batch_size`` fits; 0 (nanochat's one-shot head) disables it. ``None``: 512 rows
            where training is compiled on a CPU (faster there), else 0.
        shard_optimizer: shard the optimizer state and Muon's work across ranks like nanochat's
            DistAdamW/DistMuon (``nanolit.sharded``); needs ``--trainer.strategy=ddp_nowrap``. The optimizers
            average the gradients themselves, so the clip sees each rank's local gradient, as in nanochat.
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
        loss_chunk_size: int | None = None,
    ):
        check_batch_knobs(max_seq_len, device_batch_size, total_batch_size)
        check_loss_chunk_size(loss_chunk_size)
        super().__init__(BaseStage())
        self.save_hyperparameters()


def set_lr(optimizers: list, lrm: float) -> None:
    """Every group's LR to its ``initial_lr`` times ``lrm``, as nanochat's loops do each step."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm


def device_description(device: torch.device) -> str:
    """The device in the plan table: the GPU's name, or the CPU threads torch uses."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    if device.type == "cpu":
        return f"cpu, {torch.get_num_threads()} threads"
    return device.type


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


__all__ = ["BaseStage", "GPTModule", "TrainingCore", "check_loss_chunk_size", "print_plan", "resolve_num_iterations",
           "set_lr"]

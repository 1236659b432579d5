"""Tokens per second, MFU and training time, nanochat's way (spec §4.10 steps 6-7, §4.13), on Lightning's monitor."""
from __future__ import annotations

import re
import time
import warnings
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

from nanolit.callbacks.periodic import log_to_loggers
from nanolit.common import NanolitError, synchronize

# Dense (no sparsity) bf16 tensor-core peak of one GPU, in FLOP/s, keyed by a word in torch.cuda.get_device_name().
# First match wins, so the specific names come before the general ones. Datasheets quote "with sparsity" figures
# that are twice these. Lightning 2.6.6's own table has sparse numbers for H100 NVL and H200 and lacks a plain
# "NVIDIA H200" (lightning-notes §5), so this table is consulted first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200 nvl", 835e12),  # NVIDIA H200 datasheet, H200 NVL column: BF16 1,671 TFLOPS with sparsity
    ("h200", 989e12),  # H200 SXM: same Hopper tensor cores as H100 SXM (datasheet 1,979 sparse); nanochat uses 989e12
    ("gh200", 989e12),  # GH200 datasheet: BF16 1,979 TFLOPS with sparsity (an H100-class GPU)
    ("h100 nvl", 835e12),  # NVIDIA H100 datasheet, H100 NVL column: BF16 1,671 TFLOPS with sparsity
    ("h100 pcie", 756e12),  # NVIDIA H100 datasheet, PCIe column: BF16 1,513 TFLOPS with sparsity
    ("h100", 989e12),  # H100 SXM ("NVIDIA H100 80GB HBM3"): nanochat's promised_flops_per_sec_h100 (spec §4.10 step 7)
    ("a100", 312e12),  # NVIDIA A100 datasheet: BF16 312 TFLOPS (624 sparse), SXM and PCIe alike
    ("l40s", 362e12),  # NVIDIA L40S datasheet: BF16 362.05 TFLOPS (733 sparse)
    ("l40", 181e12),  # NVIDIA Ada GPU architecture whitepaper, L40: BF16 181.05 TFLOPS (362.1 sparse)
    ("l4", 121e12),  # NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity
    ("a10", 125e12),  # NVIDIA A10 datasheet: BF16 125 TFLOPS (250 sparse); A10G is a different part, not matched
    ("rtx 4090", 165.2e12),  # Ada whitepaper appendix: RTX 4090 BF16 with FP32 accumulate 165.2 (330.4 sparse)
    ("rtx 3090", 71e12),  # Ampere GA102 whitepaper: RTX 3090 BF16 with FP32 accumulate 71 (142 sparse)
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its CUDA name, or None if it is not in :data:`PEAK_BF16_FLOPS`."""
    name = device_name.lower()
    for key, flops in PEAK_BF16_FLOPS:
        if re.search(rf"\b{key}\b", name):
            return flops
    return None


def _batch_rows(batch: Any) -> int:
    """Sequences in a batch: every dimension but the last of its first tensor ([A, B, T+1] -> A*B, [B, T] -> B)."""
    tensor = batch[0] if isinstance(batch, (tuple, list)) else batch
    return max(1, tensor.shape[:-1].numel()) if isinstance(tensor, torch.Tensor) else 1


def _batch_items(batch: Any) -> int:
    """Token ids in a batch's first tensor (used only outside training, where the token protocol does not apply)."""
    tensor = batch[0] if isinstance(batch, (tuple, list)) else batch
    return tensor.numel() if isinstance(tensor, torch.Tensor) else 1


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` fed by the token protocol, plus nanochat's per-step numbers.

    Protocol: ``pl_module.tokens_per_step`` (int, global tokens per optimizer step) and
    ``pl_module.flops_per_token`` (float, forward + backward). One ``training_step`` is one optimizer step.

    On every logging step (``log_every_n_steps``), with ``dt`` the mean step time of the steps since the last
    one: the wall time from ``on_train_batch_start`` of the first of them to ``on_train_batch_end`` of this one,
    synchronised on CUDA and MPS at those two points only (a sync every step would stall the GPU, issue 7), minus
    any time the evaluation callbacks spent in between (``eval_seconds``, see ``PeriodicEvaluation``), divided by
    the number of steps. With ``log_every_n_steps=1`` that is nanochat's per-step ``dt`` (§4.10 step 7).
    ``tok_per_sec = tokens_per_step / dt``;
    ``mfu = 100 * flops_per_token * tokens_per_step / dt / (peak * world_size)`` (percent), ``None`` when the
    peak is unknown (CPU, MPS, an unlisted GPU) rather than a made-up number; ``total_training_time`` adds
    ``dt`` only for steps after ``warmup_steps`` (nanochat: ``step > 10``, leaving out compilation), the last step
    closing its window whatever ``log_every_n_steps``, and is checkpointed so a resumed run continues the total;
    ``flops_so_far = flops_per_token * tokens_per_step * global_step``. Logged as ``train/tok_per_sec``,
    ``train/mfu``, ``train/dt``, ``total_training_time`` and ``total_training_flops`` every
    ``log_every_n_steps``, straight to the loggers.

    The base class adds its windowed metrics (``train/device/items_per_sec`` = tokens/s per device,
    ``train/device/mfu`` as a fraction, ...) once ``window_size`` steps are in; there ``samples`` are
    sequences and ``items`` are tokens.

    ``peak_flops`` overrides the per-GPU peak. Otherwise :data:`PEAK_BF16_FLOPS` (dense bf16, what nanochat's
    MFU means), then Lightning's table for the trainer's precision.
    """

    def __init__(self, window_size: int = 100, peak_flops: float | None = None, warmup_steps: int = 10) -> None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 2:
            raise NanolitError(f"window_size must be a whole number >= 2, got {window_size!r}")
        if peak_flops is not None and (isinstance(peak_flops, bool) or not isinstance(peak_flops, (int, float))
                                       or peak_flops <= 0):
            raise NanolitError(f"peak_flops must be a positive number of FLOP/s (e.g. 989e12), got {peak_flops!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise NanolitError(f"warmup_steps must be a whole number >= 0, got {warmup_steps!r}")
        super().__init__(batch_size_fn=_batch_rows, length_fn=_batch_items, window_size=window_size)
        self.peak_flops = float(peak_flops) if peak_flops is not None else None
        self.warmup_steps = warmup_steps
        self.total_training_time = 0.0
        self.flops_so_far = 0.0
        self.dt: float | None = None
        self.tok_per_sec: int | None = None
        self.mfu: float | None = None
        self._train_seconds = 0.0  # all measured step time since train start, for the windowed base metrics
        self._window_start = 0.0  # host clock at the start of the first step not measured yet
        self._eval_start = 0.0
        self._window_steps = 0  # steps since the last measurement
        self._window_timed = 0  # of those, steps after warmup_steps (they count towards total_training_time)
        self._last_step: tuple[L.Trainer, L.LightningModule] | None = None  # to close the window at a save

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in ("tokens_per_step", "flops_per_token"):
            if not isinstance(getattr(pl_module, name, None), (int, float)):
                raise NanolitError(f"TokenThroughputMonitor needs {type(pl_module).__name__}.{name} (a number); "
                                   "add it or remove the callback")
        peak = self.peak_flops if self.peak_flops is not None else self._table_peak(trainer.strategy.root_device)
        with warnings.catch_warnings():
            if peak is not None:
                # Lightning's lookup warns about GPUs it lacks (a plain "NVIDIA H200"); the peak is known here.
                warnings.filterwarnings("ignore", message=".*FLOPs not found.*")
            super().setup(trainer, pl_module, stage)
        # Otherwise Lightning's table for the trainer's precision: None on CPU and MPS, so no MFU there.
        self.available_flops = peak if peak is not None else self.available_flops
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops

    @staticmethod
    def _table_peak(device: torch.device) -> float | None:
        return peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    @staticmethod
    def _eval_seconds(trainer: L.Trainer) -> float:
        return sum(getattr(cb, "eval_seconds", 0.0) for cb in trainer.callbacks)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_seconds = 0.0
        super().on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._window_steps == 0:
            synchronize(pl_module.device)
            self._window_start = time.perf_counter()
            self._eval_start = self._eval_seconds(trainer)

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the window of steps since the last measurement: ``dt``, tok/s, MFU and the training time."""
        synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._window_start
        window = max(elapsed - (self._eval_seconds(trainer) - self._eval_start), 1e-9)
        tokens, flops_per_token = pl_module.tokens_per_step, pl_module.flops_per_token
        self.dt = dt = window / self._window_steps
        self._train_seconds += window
        self.tok_per_sec = int(tokens / dt)
        self.mfu = None
        if self.available_flops:
            self.mfu = 100.0 * flops_per_token * tokens / dt / (self.available_flops * trainer.world_size)
        self.total_training_time += dt * self._window_timed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step - 1  # nanochat's step index: the step just taken
        self._last_step = (trainer, pl_module)
        self._window_steps += 1
        self._window_timed += step > self.warmup_steps
        self.flops_so_far = pl_module.flops_per_token * pl_module.tokens_per_step * trainer.global_step
        # the last step closes its window here, before a final checkpoint save could land in it
        if not (trainer._logger_connector.should_update_logs or trainer.global_step == trainer.max_steps):
            return
        self._measure(trainer, pl_module)
        metrics = {"train/tok_per_sec": float(self.tok_per_sec), "train/dt": self.dt,
                   "total_training_time": self.total_training_time, "total_training_flops": self.flops_so_far}
        if self.mfu is not None:
            metrics["train/mfu"] = self.mfu
        # straight to the loggers: pl_module.log costs ~0.5 ms a value in Lightning's bookkeeping (issue 7)
        log_to_loggers(trainer, metrics, step=trainer.global_step - 1)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # rank zero: windowed metrics
        self._window_steps = self._window_timed = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._window_steps:  # a run stopped before max_steps: its last steps still count towards the totals
            self._measure(trainer, pl_module)
            self._window_steps = self._window_timed = 0

    @torch.inference_mode()
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING:
            return super()._update(trainer, pl_module, batch, iter_num)
        # Lightning's version reads `flops_per_batch` and times from train start (evals included); the token
        # protocol gives exact counts, and the clock is the eval-free step time measured above.
        world_size, steps = trainer.world_size, self._window_steps  # the steps measured since the last update
        self._batches[stage] += steps
        self._samples[stage] += self.batch_size_fn(batch) * steps
        self._lengths[stage] += pl_module.tokens_per_step // world_size * steps
        self._throughputs[stage].update(
            time=self._train_seconds, batches=self._batches[stage], samples=self._samples[stage],
            lengths=self._lengths[stage], flops=pl_module.flops_per_token * pl_module.tokens_per_step / world_size)

    def state_dict(self) -> dict[str, Any]:
        if self._window_steps and self._last_step is not None:
            # a checkpoint holds the time up to its own step, so a resumed run continues the total exactly
            self._measure(*self._last_step)
            self._window_steps = self._window_timed = 0
        return {"total_training_time": self.total_training_time}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_training_time = state_dict["total_training_time"]

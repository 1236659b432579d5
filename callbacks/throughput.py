"""Tokens per second, MFU and training time, nanochat's way (nanochat d575940 ``scripts/base_train.py``)."""
from __future__ import annotations

import re
import time
from typing import Any

import lightning.pytorch as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from nanolit.callbacks.protocols import TokenCounts, require
from nanolit.common import NanolitError, synchronize
from nanolit.lightning_adapter import StepBoundary, is_logging_step, log_to_loggers
from nanolit.runstate import RunState

# Dense (no sparsity) bf16 tensor-core peak of one GPU, in FLOP/s, keyed by a word in torch.cuda.get_device_name().
# First match wins, so the specific names come before the general ones. Datasheets quote "with sparsity" figures
# that are twice these. Lightning 2.6.6's own table has sparse numbers for H100 NVL and H200 and lacks a plain
# "NVIDIA H200", so this table is consulted first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200 nvl", 835e12),  # NVIDIA H200 datasheet, H200 NVL column: BF16 1,671 TFLOPS with sparsity
    ("h200", 989e12),  # H200 SXM: same Hopper tensor cores as H100 SXM (datasheet 1,979 sparse); nanochat uses 989e12
    ("gh200", 989e12),  # GH200 datasheet: BF16 1,979 TFLOPS with sparsity (an H100-class GPU)
    ("h100 nvl", 835e12),  # NVIDIA H100 datasheet, H100 NVL column: BF16 1,671 TFLOPS with sparsity
    ("h100 pcie", 756e12),  # NVIDIA H100 datasheet, PCIe column: BF16 1,513 TFLOPS with sparsity
    ("h100", 989e12),  # H100 SXM: nanochat d575940 base_train's promised_flops_per_sec_h100
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


def device_peak_flops(device: torch.device) -> float | None:
    """Per-device dense bf16 peak: :data:`PEAK_BF16_FLOPS`, then Lightning's table; None off CUDA (no MFU there)."""
    if device.type != "cuda":
        return None
    peak = peak_bf16_flops(torch.cuda.get_device_name(device))
    return peak if peak is not None else get_available_flops(device, torch.bfloat16)


class TokenThroughputMonitor(L.Callback):
    """nanochat's per-step numbers: ``dt``, tokens per second, MFU, total training time and FLOPs.

    Protocol: the module is a :class:`nanolit.callbacks.protocols.TokenCounts` (``tokens_per_step``, global tokens
    per optimizer step, and ``flops_per_token``, forward + backward).

    A step runs from the start of its first micro-batch to the end of its last (``accumulate_grad_batches`` or a
    module that accumulates inside ``training_step`` alike). On every logging step (``log_every_n_steps``) ``dt`` is
    the mean step time of the steps since the last one: the wall time from the start of the first of them to the end
    of this one, synchronised on CUDA and MPS at those two points only, minus the time evaluations spent in between
    (the run state's ``eval_seconds``). With ``log_every_n_steps=1`` that is nanochat's per-step ``dt``.
    ``tok_per_sec = tokens_per_step / dt``; ``mfu = 100 * flops_per_token * tokens_per_step / dt / (peak *
    world_size)`` in percent, None when the peak is unknown (CPU, MPS, an unlisted GPU) rather than a made-up number;
    ``total_training_time`` adds ``dt`` only for steps after ``warmup_steps`` (nanochat: ``step > 10``, leaving out
    compilation); ``total_training_flops = flops_per_token * tokens_per_step * global_step``.

    The figures go into the run state (checkpointed, so a resumed run continues the total) and to the loggers as
    ``train/tok_per_sec``, ``train/dt``, ``train/mfu``, ``train/total_training_time`` and
    ``train/total_training_flops``. ``peak_flops`` overrides the per-GPU peak (:data:`PEAK_BF16_FLOPS`: dense bf16,
    what nanochat's MFU means; then Lightning's table).
    """

    def __init__(self, peak_flops: float | None = None, warmup_steps: int = 10) -> None:
        if peak_flops is not None and (isinstance(peak_flops, bool) or not isinstance(peak_flops, (int, float))
                                       or peak_flops <= 0):
            raise NanolitError(f"peak_flops must be a positive number of FLOP/s (e.g. 989e12), got {peak_flops!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise NanolitError(f"warmup_steps must be a whole number >= 0, got {warmup_steps!r}")
        self.peak_flops = float(peak_flops) if peak_flops is not None else None
        self.warmup_steps = warmup_steps
        self.available_flops: float | None = None
        self.run_state = RunState()  # replaced by the trainer's in setup
        self._boundary = StepBoundary()
        self._window_start = 0.0  # host clock at the start of the first step not measured yet
        self._eval_start = 0.0  # eval_seconds at that point
        self._window_steps = 0  # steps since the last measurement
        self._window_timed = 0  # of those, steps after warmup_steps (they count towards total_training_time)
        self._device: torch.device | None = None
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require(pl_module, TokenCounts, "TokenThroughputMonitor", "module")
        self.run_state = RunState.of(trainer)
        self.run_state.add_flusher(self.flush)
        self._trainer, self._device = trainer, trainer.strategy.root_device
        self.available_flops = self.peak_flops if self.peak_flops is not None else device_peak_flops(self._device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._boundary.start(trainer)
        self._window_steps = self._window_timed = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._boundary.batch_starts() and self._window_steps == 0:
            synchronize(self._device)
            self._window_start = time.perf_counter()
            self._eval_start = self.run_state.eval_seconds

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._boundary.batch_ends(trainer):
            return
        step = trainer.global_step - 1  # nanochat's step index: the step just taken
        self._window_steps += 1
        self._window_timed += step > self.warmup_steps
        # the last step closes its window here, before a final checkpoint save could land in it
        if is_logging_step(trainer, step) or trainer.global_step == trainer.max_steps:
            self._measure(trainer, pl_module)
            state = self.run_state
            metrics = {"train/tok_per_sec": state.tok_per_sec, "train/dt": state.dt,
                       "train/total_training_time": state.total_training_time,
                       "train/total_training_flops": state.total_training_flops}
            if state.mfu is not None:
                metrics["train/mfu"] = state.mfu
            log_to_loggers(trainer, metrics, step=step)

    def _measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the window of steps since the last measurement: ``dt``, tok/s, MFU and the training time."""
        synchronize(self._device)
        state = self.run_state
        elapsed = time.perf_counter() - self._window_start
        window = max(elapsed - (state.eval_seconds - self._eval_start), 1e-9)
        tokens, flops_per_token = pl_module.tokens_per_step, pl_module.flops_per_token
        state.dt = dt = window / self._window_steps
        state.tok_per_sec = tokens / dt
        state.mfu = None
        if self.available_flops:
            state.mfu = 100.0 * flops_per_token * tokens / dt / (self.available_flops * trainer.world_size)
        state.total_training_time += dt * self._window_timed
        state.total_training_flops = flops_per_token * tokens * trainer.global_step
        self._window_steps = self._window_timed = 0

    def flush(self) -> None:
        """Close an open window (a checkpoint holds the time up to its own step; a stopped run counts its last
        steps)."""
        if self._window_steps and self._trainer is not None:
            self._measure(self._trainer, self._trainer.lightning_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()

"""nanochat's in-training measurements as reusable Lightning callbacks.

None of them imports nanolit's GPT or training module: each needs only the small typed protocol it names in
``nanolit.callbacks.protocols`` (checked at ``setup``, one line naming what is missing), and they share the run's
figures through one object, :class:`RunState`, which is checkpointed once. They count optimizer steps, not batches,
so they work with manual optimization (nanolit's modules) and with automatic optimization, with or without
``accumulate_grad_batches``, on one process or under DDP, fresh or resumed.

Evaluations (val bpb, CORE, samples) follow nanochat's schedule: at the start of step ``s`` when ``s % every == 0``
(step 0 only for val bpb) and once on the final model; ``-1`` disables one. Every rank calls them (except
sampling, rank zero alone) because they run collectives; printing and logging happen on rank zero.
"""
from nanolit.callbacks.bpb import BitsPerByte, BPBValidation
from nanolit.callbacks.chat_eval import ChatEvaluation
from nanolit.callbacks.checkpoint import StepCheckpoint
from nanolit.callbacks.core import COREEvaluation
from nanolit.callbacks.ema_loss import EMALossLogger
from nanolit.callbacks.periodic import PeriodicEvaluation
from nanolit.callbacks.preemption import PreemptionCheckpoint
from nanolit.callbacks.progress import NanoProgressBar, StepLine
from nanolit.callbacks.report import ReportWriter
from nanolit.callbacks.sampling import NANOCHAT_PROMPTS, Sampler
from nanolit.callbacks.throughput import PEAK_BF16_FLOPS, TokenThroughputMonitor, peak_bf16_flops
from nanolit.callbacks.val_loss import ValidationLoss
from nanolit.runstate import RunState

__all__ = [
    "BitsPerByte",
    "BPBValidation",
    "ChatEvaluation",
    "COREEvaluation",
    "EMALossLogger",
    "NANOCHAT_PROMPTS",
    "NanoProgressBar",
    "PEAK_BF16_FLOPS",
    "PeriodicEvaluation",
    "PreemptionCheckpoint",
    "ReportWriter",
    "RunState",
    "Sampler",
    "StepCheckpoint",
    "StepLine",
    "TokenThroughputMonitor",
    "ValidationLoss",
    "peak_bf16_flops",
]

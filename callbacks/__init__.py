"""nanochat's in-training measurements as reusable Lightning callbacks (spec §4.10-4.13, §6, §7, §8, §12).

None of them imports nanolit's GPT: each one needs only a small, duck-typed protocol from the LightningModule
and the DataModule, documented in its docstring. Together:

* ``training_step`` is one optimizer step and returns ``{"loss": ...}``; the module also sets
  ``last_train_loss`` (the last micro-step's loss tensor, what nanochat smooths) -> ``EMALossLogger``,
  ``ReportWriter``;
* ``flops_per_token: float``, ``tokens_per_step: int`` (global tokens per optimizer step),
  ``num_iterations: int`` -> ``TokenThroughputMonitor``, ``ReportWriter``;
* ``loss_per_token(x, y) -> Tensor[B*T]`` in nats (``reduction='none'``, ``ignore_index=-1``) ->
  ``BPBValidation``;
* ``eval_model``: an uncompiled ``nn.Module``, ``model(idx) -> logits[B, T, V]`` -> ``COREEvaluation``;
* ``generate(tokens: list[int], max_tokens: int) -> list[int]``: greedy, the tokens after the prompt ->
  ``Sampler``;
* ``trainer.datamodule``: ``tokenizer`` (``encode(text, prepend=...)``, ``decode``, ``get_bos_token_id``),
  ``token_bytes`` (int [V]) and ``val_dataloader()`` yielding ``(x, y)``.

Evaluations (val bpb, CORE, samples) follow nanochat's schedule: at the start of step ``s`` when
``s % every == 0`` (step 0 only for val bpb) and once on the final model; ``-1`` disables one. Every rank
calls them (except sampling, rank zero alone) because they run collectives; printing and logging happen on
rank zero. Each keeps what a resumed run needs in its ``state_dict``.
"""
from nanolit.callbacks.bpb import BitsPerByte, BPBValidation
from nanolit.callbacks.checkpoint import StepCheckpoint
from nanolit.callbacks.core import COREEvaluation
from nanolit.callbacks.ema_loss import EMALossLogger
from nanolit.callbacks.periodic import PeriodicEvaluation
from nanolit.callbacks.preemption import PreemptionCheckpoint
from nanolit.callbacks.report import ReportWriter
from nanolit.callbacks.sampling import NANOCHAT_PROMPTS, Sampler
from nanolit.callbacks.throughput import PEAK_BF16_FLOPS, TokenThroughputMonitor, peak_bf16_flops

__all__ = [
    "BitsPerByte",
    "BPBValidation",
    "COREEvaluation",
    "EMALossLogger",
    "NANOCHAT_PROMPTS",
    "PEAK_BF16_FLOPS",
    "PeriodicEvaluation",
    "PreemptionCheckpoint",
    "ReportWriter",
    "Sampler",
    "StepCheckpoint",
    "TokenThroughputMonitor",
    "peak_bf16_flops",
]

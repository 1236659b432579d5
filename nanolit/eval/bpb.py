"""Bits per byte: the tokenizer-independent validation loss (nanochat d575940 nanochat/loss_eval.py).

Mean cross-entropy per token depends on the vocabulary, so nanochat reports nats summed over target tokens divided
by the UTF-8 bytes those tokens decode to, converted to bits. Special tokens (token_bytes 0, e.g. a ``<|bos|>``
target) and ignored targets (-1) contribute neither nats nor bytes.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from nanolit.common import NanolitError


def bpb_sums(
    loss_flat: torch.Tensor, y_flat: torch.Tensor, token_bytes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of nats and of target bytes for one batch of per-token losses (nanochat d575940 nanochat/loss_eval.py).

    ``loss_flat``: per-token cross-entropy in nats (``reduction='none'``); ``y_flat``: the targets, -1 = ignored;
    ``token_bytes``: int [V], bytes per token id, 0 for special tokens. Returns ``(nats, bytes)``: a fp32 scalar
    tensor and an int64 scalar tensor on the targets' device.
    """
    loss = loss_flat.reshape(-1).float()
    y = y_flat.reshape(-1)
    token_bytes = token_bytes.to(y.device)
    valid = y >= 0
    # Index with a safe copy: -1 would wrap around to the last vocabulary entry.
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    num_bytes = torch.where(valid, token_bytes[safe_y], 0)
    # Multiply rather than select, as nanochat does: the loss of a zero-byte target is dropped.
    nats = (loss * (num_bytes > 0)).sum()
    return nats, num_bytes.sum(dtype=torch.int64)


def bits_per_byte(nats: torch.Tensor | float, num_bytes: torch.Tensor | int) -> float:
    """``nats / (ln 2 * bytes)``; ``inf`` when there were no bytes (nanochat d575940 nanochat/loss_eval.py)."""
    total_bytes = int(num_bytes.item() if isinstance(num_bytes, torch.Tensor) else num_bytes)
    if total_bytes == 0:
        return float("inf")
    total_nats = float(nats.item() if isinstance(nats, torch.Tensor) else nats)
    return total_nats / (math.log(2) * total_bytes)


@torch.no_grad()
def evaluate_bpb(
    model: Callable[..., torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    token_bytes: torch.Tensor,
) -> float:
    """Bits per byte over ``steps`` batches ``(x, y)``, summed across ranks when distributed (nanochat d575940
    nanochat/loss_eval.py).

    ``model(x, y, loss_reduction="none")`` must return per-token losses in nats. Accumulators live on
    ``token_bytes``' device, which should be the model's (nanochat keeps both there).
    """
    total_nats = torch.tensor(0.0, dtype=torch.float32, device=token_bytes.device)
    total_bytes = torch.tensor(0, dtype=torch.int64, device=token_bytes.device)
    batch_iter = iter(batches)
    for step in range(steps):
        try:
            x, y = next(batch_iter)
        except StopIteration:
            raise NanolitError(f"validation data ran out after {step} of {steps} batches; "
                               "lower the number of eval tokens or add validation data") from None
        loss = model(x, y, loss_reduction="none")
        nats, num_bytes = bpb_sums(loss, y, token_bytes)
        total_nats += nats.to(total_nats.device)
        total_bytes += num_bytes.to(total_bytes.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    return bits_per_byte(total_nats, total_bytes)

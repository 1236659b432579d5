"""nanochat's loss head (lm_head -> fp32 -> softcap -> cross-entropy) computed a chunk of rows at a time.

The one-shot head materialises [B*T, vocab] logits several times over: the matmul output, its fp32 copy, the
softcapped values and the log-softmax that autograd saves. At d20 (B=32, T=2048, vocab 65536) each fp32 copy is
16 GiB; users on 24 GB cards report running d20 at ``device_batch_size`` 4 (nanochat's issue tracker). Here only
``chunk_size`` rows of logits exist at a time, and the gradients for ``x`` and the head weight are computed in
the same pass, so the backward does no recomputation (the same matmul FLOPs as the one-shot head: one forward,
two backward).

torch's own ``F.linear_cross_entropy`` (2.13) chunks the same way but has no hook for the softcap between the
linear layer and the loss, hence this file.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -1  # nanochat's padding target (nanochat d575940 nanochat/gpt.py)


def _in_compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The matmuls run in the dtype autocast would give ``lm_head(x)``, so the logits equal the one-shot head's.
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.to(dtype), weight.to(dtype)


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor, softcap: float) -> torch.Tensor:
    """Softcapped fp32 logits of a chunk of rows; ``x`` and ``weight`` are already in the compute dtype."""
    logits = (x @ weight.t()).float()
    return logits.div_(softcap).tanh_().mul_(softcap)


def _row_losses(capped: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy (0 where the target is ignored) and the row log-sum-exp."""
    lse = torch.logsumexp(capped, dim=-1)
    picked = capped.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(targets != IGNORE_INDEX, lse - picked, 0.0), lse


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


class _ChunkedSoftcapCE(torch.autograd.Function):
    """Mean cross-entropy over non-ignored rows, with the gradients computed during the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                chunk_size: int) -> torch.Tensor:
        xc, wc = _in_compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            # A tensor, not a Python int: no host sync. All rows ignored gives 0/0 = nan, as F.cross_entropy does.
            count = (targets != IGNORE_INDEX).sum().float()
            loss_sum = torch.zeros((), device=x.device, dtype=torch.float32)
            grad_x = torch.empty_like(xc)
            grad_w = torch.zeros_like(weight, dtype=torch.float32)  # summed over chunks in fp32
            for s, e in _chunks(x.size(0), chunk_size):
                t = targets[s:e]
                capped = _chunk_logits(xc[s:e], wc, softcap)
                losses, lse = _row_losses(capped, t)
                loss_sum += losses.sum()
                # d loss / d capped = (softmax - onehot) / count on kept rows; d capped / d logit = 1 - (c/cap)^2
                grad = torch.exp(capped - lse.unsqueeze(1))
                grad.scatter_add_(1, t.clamp(min=0).unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
                grad.mul_(((t != IGNORE_INDEX).float() / count).unsqueeze(1))
                grad.mul_(capped.div_(softcap).square_().neg_().add_(1.0))
                grad = grad.to(xc.dtype)
                grad_x[s:e] = grad @ wc
                grad_w += (grad.t() @ xc[s:e]).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (grad_x.mul(grad_output).to(x_dtype), grad_w.mul(grad_output).to(w_dtype), None, None, None)


def softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                          chunk_size: int, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(softcap*tanh((x @ weight.T).float()/softcap), targets, ignore_index=-1)``, chunked.

    Args:
        x: [N, D] final hidden states; weight: [V, D] the lm_head weight; targets: [N] ids, -1 ignored.
        chunk_size: rows of logits alive at once; the extra memory is ~3 x chunk_size x V fp32 values.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per row). With gradients only ``"mean"`` (training's).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if reduction != "mean":
            raise ValueError(f"the chunked loss differentiates reduction='mean' only, got {reduction!r}; "
                             "run other reductions under torch.no_grad()")
        return _ChunkedSoftcapCE.apply(x, weight, targets, softcap, chunk_size)
    # Evaluation: no gradient work at all, just the per-row losses a chunk at a time.
    xc, wc = _in_compute_dtype(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        losses = torch.cat([_row_losses(_chunk_logits(xc[s:e], wc, softcap), targets[s:e])[0]
                            for s, e in _chunks(x.size(0), chunk_size)])
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / (targets != IGNORE_INDEX).sum()

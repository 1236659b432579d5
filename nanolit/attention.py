"""Causal self-attention with a sliding window, for the 2026 GPT (nanochat 92d63d4 nanochat/flash_attention.py).

A window of ``w`` lets the query at position ``i`` see the keys at positions ``i - w .. i`` (``w + 1`` keys), like
FA3's ``window_size=(w, 0)``; ``w < 0`` means no limit. Queries are the last ``Tq`` positions of the ``Tk`` keys, so
one function serves training (``Tq == Tk``), a prefill into a KV cache and single-token decoding.

Two implementations give the same values:
- ``sdpa``: nanochat's SDPA fallback, branch for branch (is_causal when the window covers the sequence, a key slice
  for one query, else an explicit boolean mask), so its kernels and rounding are the ones nanochat ran on CPU;
- ``flex``: torch's FlexAttention with a block mask, compiled (a few seconds per new shape). torch 2.13 has no
  FlexAttention backward on CPU, so on CPU it serves passes without gradients: there it takes 0.36-0.75x the time
  of the masked SDPA path (``benchmarks/attention.py``, benchmarks/README.md). Shapes that change every call
  (KV-cache decoding, CORE's prompts) would recompile every time: keep ``sdpa`` for them.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from nanolit.common import NanolitError

ATTENTION_IMPLS = ("sdpa", "flex")


def window_mask(Tq: int, Tk: int, window: int, device=None) -> torch.Tensor:
    """Boolean ``[Tq, Tk]``: True where query ``i`` (at position ``Tk - Tq + i``) may attend to key ``j``."""
    rows = (Tk - Tq) + torch.arange(Tq, device=device).unsqueeze(1)
    cols = torch.arange(Tk, device=device).unsqueeze(0)
    mask = cols <= rows
    if 0 <= window < Tk:
        mask = mask & (rows - cols <= window)
    return mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """q ``[B, H, Tq, D]``, k and v ``[B, Hkv, Tk, D]`` with ``Tk >= Tq``: the attention output ``[B, H, Tq, D]``."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if (window < 0 or window >= Tq) and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if Tq == 1:  # decoding: the last window + 1 keys, no mask needed
        if 0 <= window < Tk:
            k, v = k[:, :, Tk - (window + 1):], v[:, :, Tk - (window + 1):]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(Tq, Tk, window, q.device), enable_gqa=gqa)


@functools.cache
def _compiled_flex():
    # Built on first use only: importing this module must not pay for torch.compile.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _block_mask(Tq: int, Tk: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = Tk - Tq

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + offset) & (q_idx + offset - kv_idx <= window)

    return create_block_mask(causal if window < 0 else sliding_causal, None, None, Tq, Tk, device=device)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """:func:`sdpa_attention` through FlexAttention: one block mask per (Tq, Tk, window, device), cached."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                               or v.requires_grad):
        raise NanolitError("FlexAttention has no backward on CPU in torch 2.13; use attn_impl='sdpa' for training "
                           "on CPU")
    block_mask = _block_mask(q.size(2), k.size(2), int(window), q.device)
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, impl: str = "sdpa") -> torch.Tensor:
    """Sliding-window causal attention by ``impl`` (see the module docstring).

    ``"flex"`` runs FlexAttention where it pays: a pass without gradients (evaluation) on a whole sequence whose
    window masks part of it. A pass that needs gradients on CPU (no FlexAttention backward there), a KV-cache step
    (a new key length each step, one compiled graph each) and a full causal layer (SDPA's fast is_causal kernel)
    take the SDPA path.
    """
    if impl == "sdpa":
        return sdpa_attention(q, k, v, window)
    if impl != "flex":
        raise NanolitError(f"unknown attention implementation {impl!r}; use one of {', '.join(ATTENTION_IMPLS)}")
    Tq, Tk = q.size(2), k.size(2)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if Tq != Tk or not 0 <= window < Tq or (needs_grad and q.device.type == "cpu"):
        return sdpa_attention(q, k, v, window)
    return flex_attention(q, k, v, window)

"""The GPT of nanochat (commit d575940, Dec 2025), with identical math and state_dict keys (nanochat d575940
nanochat/gpt.py).

- rotary embeddings (base 10000, two contiguous halves, nanochat's sign), no positional table
- QK-norm after rotary, parameter-free RMSNorm everywhere, no biases
- ReLU² MLP, untied embedding and lm_head, logit softcap 15 in fp32
- GQA through ``n_kv_head``
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanolit.common import NanolitError
from nanolit.engine import KVCache, generate_tokens
from nanolit.loss import IGNORE_INDEX, softcap_cross_entropy

ROTARY_BASE = 10000  # nanochat d575940 nanochat/gpt.py
ROTARY_CACHE_FACTOR = 10  # the rotary table covers 10x sequence_len positions (nanochat d575940 nanochat/gpt.py)
SOFTCAP = 15.0  # nanochat d575940 nanochat/gpt.py


@dataclass
class GPTConfig:
    """nanochat's GPTConfig: the only fields at d575940 (nanochat d575940 nanochat/gpt.py)."""

    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int) -> "GPTConfig":
        """Derive width and heads from ``depth`` like base_train (nanochat d575940 scripts/base_train.py): width
        64*depth, head_dim ~128."""
        if depth < 1:
            raise NanolitError(f"depth must be >= 1, got {depth}")
        model_dim = depth * 64
        num_heads = max(1, (model_dim + 127) // 128)
        if model_dim % num_heads != 0:
            raise NanolitError(
                f"depth {depth} gives width {model_dim}, which is not divisible by its {num_heads} heads "
                f"(nanochat d575940 fails the same way); use an even depth such as {depth + 1}"
            )
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=num_heads, n_kv_head=num_heads, n_embd=model_dim)

    def to_dict(self) -> dict:
        return asdict(self)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without weight, default eps, computed in the input dtype (nanochat d575940 nanochat/gpt.py).

    torch >= 2.12 autocasts rms_norm to fp32; nanochat (torch 2.8) ran it in bf16. Running it outside autocast
    keeps the reference numerics on every torch version.
    """
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.rms_norm(x, (x.size(-1),))
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dim; x is [B, T, heads, D] (nanochat d575940 nanochat/gpt.py: rotation by
    -theta)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def precompute_rotary(seq_len: int, head_dim: int, device=None, base: float = ROTARY_BASE,
                      dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [1, seq_len, 1, D/2], computed in fp32 and stored in ``dtype`` (nanochat d575940: bf16)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return cos[None, :, None, :], sin[None, :, None, :]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx: int, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise NanolitError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        if config.n_head % config.n_kv_head != 0:
            raise NanolitError(f"n_head {config.n_head} is not a multiple of n_kv_head {config.n_kv_head}")
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos_sin, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm comes after rotary (nanochat d575940 nanochat/gpt.py)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if kv_cache is None or Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
        else:  # chunked prefill on a non-empty cache: attend to the whole prefix, causally within the chunk
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    """ReLU² MLP of width 4x; ``linear`` is the layer class (the 2026 model passes one that casts its weight)."""

    def __init__(self, config, linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.c_fc = linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos_sin, kv_cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """nanochat's GPT. Construction allocates parameters but does not initialise them: use :func:`build_gpt`
    or call :meth:`init_weights` (checkpoint loading overwrites them anyway)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head_dim = config.n_embd // config.n_head
        cos, sin = precompute_rotary(ROTARY_CACHE_FACTOR * config.sequence_len, self.head_dim)
        # non-persistent: not in the state_dict, exactly like nanochat (nanochat d575940 nanochat/gpt.py)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 42) -> None:
        """nanochat's init (nanochat d575940 nanochat/gpt.py), drawing from a generator seeded with ``seed`` on the
        weights' device.

        A fresh generator gives the same draws as nanochat's global ``manual_seed(42)`` right before init,
        independent of whatever consumed the global RNG before.
        """
        device = self.get_device()
        gen = torch.Generator(device=device).manual_seed(seed)
        for module in self.modules():  # leaves in registration order: wte, per block q,k,v,proj,fc,proj, lm_head
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))  # arXiv 2310.17813
                module.weight.normal_(0.0, std, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=gen)
        # zero-init after the draws, which still consumed RNG (nanochat d575940 nanochat/gpt.py)
        self.lm_head.weight.zero_()
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        self.reset_rotary(device)
        if device.type == "cuda":
            # nanochat keeps wte in bf16 on CUDA (nanochat d575940 nanochat/gpt.py)
            self.transformer.wte.to(dtype=torch.bfloat16)

    def reset_rotary(self, device=None, seq_len: int | None = None) -> None:
        """(Re)compute the rotary tables, e.g. after ``to_empty`` or to cover longer prompts."""
        seq_len = seq_len or ROTARY_CACHE_FACTOR * self.config.sequence_len
        self.cos, self.sin = precompute_rotary(seq_len, self.head_dim, device=device or self.get_device())

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_params(self) -> int:
        """All parameters, wte and lm_head included (nanochat d575940 nanochat/gpt.py)."""
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Forward+backward FLOPs per token: 6*(N - wte) + 12*L*H*D*T (nanochat d575940 nanochat/gpt.py; PaLM appendix
        B)."""
        c = self.config
        nparams_exclusive = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * nparams_exclusive + 12 * c.n_layer * c.n_head * self.head_dim * c.sequence_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean", loss_chunk_size: int = 0) -> torch.Tensor:
        """Mean (or per-token with ``loss_reduction='none'``) cross-entropy if ``targets``, else fp32 logits.

        ``loss_chunk_size > 0`` computes the loss ``loss_chunk_size`` rows of logits at a time
        (``nanolit.loss``): the same loss and gradients without the [B*T, vocab] logits in memory.
        """
        B, T = idx.size()
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if T0 + T > self.cos.size(1):
            # Positions are a pure function of the index, so a longer table gives identical values for the
            # positions that already fit; nanochat asserts here instead, which stops long CORE prompts.
            self.reset_rotary(seq_len=2 * (T0 + T))
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        x = norm(x)
        if targets is not None and loss_chunk_size > 0:
            return softcap_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), SOFTCAP,
                                         loss_chunk_size, loss_reduction)
        # fp32 before the softcap, as nanochat d575940 does (earlier commits capped in bf16)
        logits = self.lm_head(x).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction=loss_reduction)

    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 42) -> Iterator[int]:
        """Yield ``max_tokens`` sampled ids after the prompt ``tokens``, with a KV cache (batch 1).

        Gives the same tokens as nanochat's naive re-run of the whole sequence (nanochat d575940 nanochat/gpt.py), in
        O(T) forwards.
        """
        return generate_tokens(self, tokens, max_tokens, temperature, top_k, seed)


def build_gpt(config: GPTConfig, device: torch.device | str = "cpu", seed: int = 42) -> GPT:
    """Build on the meta device, materialise on ``device`` and initialise like nanochat (nanochat d575940
    scripts/base_train.py)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model

"""The GPT of nanochat's 2026 recipe (nanochat 92d63d4 nanochat/gpt.py), with its math and state_dict keys.

What changed since the d575940 GPT in ``nanolit/model.py`` (whose norm, rotation and MLP are reused here):
- no autocast: every ``Linear`` casts its fp32 weight to the activations' dtype, the compute dtype (bf16 on CUDA
  with SM >= 80, else fp32; ``NANOCHAT_DTYPE`` overrides), and the embeddings are stored in it;
- the vocab is padded to a multiple of 64 rows (wte, lm_head, value embeddings), the logits sliced back;
- value embeddings on alternating layers (the last always), mixed into v through a small per-head gate;
- q and k scaled by 1.2 after QK-norm; rotary base 100000;
- sliding-window attention per layer from ``window_pattern`` (``nanolit/attention.py``);
- per-layer ``resid_lambdas``/``x0_lambdas`` re-mixing the first embedding, a smear gate (the previous token's
  embedding), and a backout that subtracts part of the mid-depth residual before the final norm;
- a new init.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanolit.attention import ATTENTION_IMPLS, attention
from nanolit.common import NanolitError
from nanolit.engine import KVCache, generate_tokens
from nanolit.loss import IGNORE_INDEX, softcap_cross_entropy
from nanolit.model import CausalSelfAttention as Dec2025Attention
from nanolit.model import MLP, ROTARY_CACHE_FACTOR, SOFTCAP, apply_rotary_emb, norm, precompute_rotary

ROTARY_BASE = 100_000  # nanochat 92d63d4 nanochat/gpt.py _precompute_rotary_embeddings
VOCAB_MULTIPLE = 64  # wte/lm_head rows are padded to a multiple of this (GPT pad_vocab_size_to)
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the embedding
QK_SCALE = 1.2  # after QK-norm: sharper attention, the scale split between q and k
WINDOW_TILE = 128  # short windows are rounded up to FA3's tile size
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def detect_compute_dtype(device: torch.device | str) -> tuple[torch.dtype, str]:
    """``(dtype, reason)``: ``$NANOCHAT_DTYPE`` if set, else bf16 on CUDA with SM >= 80, else fp32.

    nanochat 92d63d4 nanochat/common.py decides once per process from ``torch.cuda.is_available()``; here it is
    decided for the device the model lives on, so a CPU model on a GPU machine stays fp32.
    """
    env = os.environ.get("NANOCHAT_DTYPE")
    if env is not None:
        if env not in COMPUTE_DTYPES:
            raise NanolitError(f"NANOCHAT_DTYPE={env!r} is not a compute dtype; use one of {', '.join(COMPUTE_DTYPES)}")
        return COMPUTE_DTYPES[env], f"set via NANOCHAT_DTYPE={env}"
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return torch.bfloat16, f"auto-detected: CUDA SM {major}{minor} (bf16 supported)"
        return torch.float32, f"auto-detected: CUDA SM {major}{minor} (pre-Ampere, bf16 not supported, using fp32)"
    return torch.float32, f"auto-detected: no CUDA ({device.type})"


def padded_vocab_size(vocab_size: int) -> int:
    """Rows of wte and lm_head: ``vocab_size`` rounded up to a multiple of 64 (tensor cores, even DDP shards)."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Alternating layers carry a value embedding, the last layer always (nanochat's ``has_ve``)."""
    return layer_idx % 2 == (n_layer - 1) % 2


@dataclass
class GPTConfig2026:
    """nanochat 92d63d4's GPTConfig: the d575940 fields plus ``window_pattern``, with that commit's defaults."""

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    @classmethod
    def from_knobs(cls, depth: int, vocab_size: int, max_seq_len: int = 2048, aspect_ratio: int = 64,
                   head_dim: int = 128, window_pattern: str = "SSSL") -> "GPTConfig2026":
        """base_train's width rule: ``depth*aspect_ratio`` rounded up to a multiple of ``head_dim``, heads of exactly
        ``head_dim`` (nanochat 92d63d4 scripts/base_train.py build_model_meta)."""
        for name, value in (("depth", depth), ("aspect_ratio", aspect_ratio), ("head_dim", head_dim),
                            ("max_seq_len", max_seq_len)):
            if value < 1:
                raise NanolitError(f"{name} must be >= 1, got {value}")
        model_dim = -(-depth * aspect_ratio // head_dim) * head_dim
        num_heads = model_dim // head_dim
        config = cls(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=num_heads,
                     n_kv_head=num_heads, n_embd=model_dim, window_pattern=window_pattern)
        window_sizes(config)  # validates the pattern now, not at the first forward
        return config

    def to_dict(self) -> dict:
        return asdict(self)


def window_sizes(config: GPTConfig2026) -> list[int]:
    """Each layer's left window in tokens: ``window_pattern`` tiled over the layers, the last layer always long.

    L is the full context (``sequence_len``), S a quarter of it rounded up to a multiple of 128 tokens (256 -> 128,
    2048 -> 512). A generation longer than ``sequence_len`` therefore slides every layer's window, L layers too.
    """
    pattern = config.window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise NanolitError(f"window_pattern {config.window_pattern!r} must be a non-empty string of S (short) and "
                           f"L (long) characters, e.g. SSSL or L")
    long = config.sequence_len
    short = -(-long // 4 // WINDOW_TILE) * WINDOW_TILE
    sizes = [long if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
    sizes[-1] = long
    return sizes


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose weight is cast to the input's dtype: fp32 master weights for the optimizer,
    matmuls in the compute dtype (nanochat 92d63d4 replaced autocast by this)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(dtype=x.dtype))


class CausalSelfAttention(Dec2025Attention):
    """The d575940 projections (with the casting ``Linear``) plus the value-embedding gate on layers that have one."""

    def __init__(self, config: GPTConfig2026, layer_idx: int):
        super().__init__(config, layer_idx, linear=Linear)
        has_ve = has_value_embedding(layer_idx, config.n_layer)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos_sin, window: int, kv_cache: KVCache | None,
                impl: str) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: a per-head gate in (0, 3) mixes the token's value embedding into v
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        y = attention(q, k, v, window, impl)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, config: GPTConfig2026, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config, linear=Linear)

    def forward(self, x, ve, cos_sin, window: int, kv_cache: KVCache | None, impl: str) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, cos_sin, window, kv_cache, impl)
        return x + self.mlp(norm(x))


class GPT2026(nn.Module):
    """nanochat 92d63d4's GPT. Construction allocates parameters without initialising them: use
    :func:`build_gpt2026` or call :meth:`init_weights` (checkpoint loading overwrites them anyway).

    ``compute_dtype``: the activations' dtype (see :func:`detect_compute_dtype`); ``attn_impl``: ``"sdpa"``
    (nanochat's path), or ``"flex"`` to run the masked layers of gradient-free full passes (evaluation at a fixed
    shape) through FlexAttention, faster on CPU (``nanolit/attention.py``); it can be switched at any time.
    """

    uses_autocast = False  # nanolit.engine runs the d575940 GPT under autocast; this one casts for itself

    def __init__(self, config: GPTConfig2026, compute_dtype: torch.dtype = torch.float32, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ATTENTION_IMPLS:
            raise NanolitError(f"unknown attn_impl {attn_impl!r}; use one of {', '.join(ATTENTION_IMPLS)}")
        self.config = config
        self.compute_dtype = compute_dtype
        self.attn_impl = attn_impl
        self.window_sizes = window_sizes(config)
        self.head_dim = config.n_embd // config.n_head
        vocab = padded_vocab_size(config.vocab_size)
        # registration order gives nanochat's state_dict order: own parameters first, then the submodules
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, vocab, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        kv_dim = config.n_kv_head * self.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim) for i in range(config.n_layer)
                                           if has_value_embedding(i, config.n_layer)})
        cos, sin = precompute_rotary(ROTARY_CACHE_FACTOR * config.sequence_len, self.head_dim, base=ROTARY_BASE,
                                     dtype=compute_dtype)
        self.register_buffer("cos", cos, persistent=False)  # not in the state_dict, like nanochat's
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 42) -> None:
        """nanochat 92d63d4's init, drawn from a generator seeded ``seed`` on the weights' device, in nanochat's
        order (the same draws as its global ``manual_seed(42)``):

        wte N(0, 0.8); lm_head N(0, 0.001); per block c_q, c_k, c_v U(+-s) and c_fc U(+-0.4s) with s = sqrt(3/d)
        (the std of N(0, 1/sqrt(d)) without its outliers), projections zero; resid_lambdas 1.15 -> 1.05 and
        x0_lambdas 0.20 -> 0.05 linearly over depth; smear_lambda 0, backout_lambda 0.2, smear gate U(0, 0.02);
        value embeddings U(+-s); value-embedding gates U(0, 0.02). Then the embeddings move to the compute dtype
        (kept fp32 for fp16, whose gradient scaler cannot unscale fp16 gradients).
        """
        device = self.get_device()
        gen = torch.Generator(device=device).manual_seed(seed)
        self.transformer.wte.weight.normal_(0.0, 0.8, generator=gen)
        self.lm_head.weight.normal_(0.0, 0.001, generator=gen)
        s = 3**0.5 * self.config.n_embd**-0.5
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                linear.weight.uniform_(-s, s, generator=gen)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_fc.weight.uniform_(-s * 0.4, s * 0.4, generator=gen)
            block.mlp.c_proj.weight.zero_()
        n = self.config.n_layer
        self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * i / max(n - 1, 1) for i in range(n)]))
        self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * i / max(n - 1, 1) for i in range(n)]))
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        self.smear_gate.weight.uniform_(0.0, 0.02, generator=gen)
        for ve in self.value_embeds.values():
            ve.weight.uniform_(-s, s, generator=gen)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.uniform_(0.0, 0.02, generator=gen)
        self.reset_rotary(device)
        if self.compute_dtype != torch.float16:
            self.transformer.wte.to(dtype=self.compute_dtype)
            self.value_embeds.to(dtype=self.compute_dtype)

    def reset_rotary(self, device=None, seq_len: int | None = None) -> None:
        """(Re)compute the rotary tables, e.g. after ``to_empty`` or to cover longer prompts."""
        seq_len = seq_len or ROTARY_CACHE_FACTOR * self.config.sequence_len
        self.cos, self.sin = precompute_rotary(seq_len, self.head_dim, device=device or self.get_device(),
                                               base=ROTARY_BASE, dtype=self.compute_dtype)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts by optimizer group, for the scaling-law rules (nanochat's ``num_scaling_params``)."""
        count = lambda params: sum(p.numel() for p in params)  # noqa: E731
        counts = {
            "wte": count(self.transformer.wte.parameters()),
            "value_embeds": count(self.value_embeds.parameters()),
            "lm_head": count(self.lm_head.parameters()),
            "transformer_matrices": count(self.transformer.h.parameters()),
            "scalars": count([self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight, self.smear_lambda,
                              self.backout_lambda]),
        }
        counts["total"] = sum(counts.values())
        if counts["total"] != self.num_params():
            raise RuntimeError("num_scaling_params misses a parameter; update it with the model")
        return counts

    def num_matmul_params(self) -> int:
        """Weights that multiply the token stream (every ``Linear``, lm_head and the gates included): 2 FLOPs each
        per token forward. Embeddings are lookups and the lambdas elementwise, so they are not counted."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, Linear))

    def estimate_flops(self) -> float:
        """Forward+backward FLOPs per token: 6 per matmul weight plus 12*H*D*w per layer for attention, where w is
        the layer's window capped at the sequence length (PaLM appendix B with sliding windows)."""
        c = self.config
        attn = sum(12 * c.n_head * self.head_dim * min(w, c.sequence_len) for w in self.window_sizes)
        return 6 * self.num_matmul_params() + attn

    def _smear(self, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Add a gated copy of the previous token's embedding to each position (a cheap bigram feature).

        With a KV cache the previous token of the chunk's first position is the cache's ``prev_embedding``.
        nanochat 92d63d4 uses it only for single-token steps; a chunk after cached tokens gets it here too, so a
        prefill in chunks equals one pass (the engine never prefills in chunks, so its outputs are nanochat's).
        """
        prev = None
        if kv_cache is not None:
            prev, kv_cache.prev_embedding = kv_cache.prev_embedding, x[:, -1:, :]
        if prev is not None:
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, :, :SMEAR_CHANNELS]))
            return x + gate * torch.cat([prev, x[:, :-1]], dim=1)
        if x.size(1) == 1:
            return x  # the first token has no previous one
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
        return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean", loss_chunk_size: int = 0) -> torch.Tensor:
        """Cross-entropy (``loss_reduction`` mean, sum or none; targets -1 ignored) if ``targets``, else the fp32
        softcapped logits ``[B, T, vocab_size]``. ``loss_chunk_size > 0`` computes the loss that many rows at a
        time (``nanolit.loss``) without the ``[B*T, vocab]`` logits."""
        B, T = idx.size()
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if T0 + T > self.cos.size(1):
            self.reset_rotary(seq_len=2 * (T0 + T))  # positions are a pure function of the index
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        x = self._smear(x, kv_cache)
        x0 = x
        backout_layer = self.config.n_layer // 2
        x_backout = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache, self.attn_impl)
            if i == backout_layer:
                x_backout = x
        x = norm(x - self.backout_lambda.to(x.dtype) * x_backout)
        vocab = self.config.vocab_size
        if targets is not None and loss_chunk_size > 0:
            weight = self.lm_head.weight[:vocab].to(x.dtype)
            return softcap_cross_entropy(x.view(B * T, -1), weight, targets.reshape(-1), SOFTCAP, loss_chunk_size,
                                         loss_reduction)
        logits = self.lm_head(x)[..., :vocab].float()  # drop the padding rows, fp32 before the softcap
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction=loss_reduction)

    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 42, use_kv_cache: bool = True):
        """Yield ``max_tokens`` sampled ids after the prompt (batch 1). ``use_kv_cache=False`` re-runs the whole
        sequence at every step, like nanochat's ``GPT.generate``; both give the same tokens."""
        return generate_tokens(self, tokens, max_tokens, temperature, top_k, seed, use_kv_cache)


def build_gpt2026(config: GPTConfig2026, device: torch.device | str = "cpu", seed: int = 42,
                  compute_dtype: torch.dtype | None = None, attn_impl: str = "sdpa") -> GPT2026:
    """Build on the meta device, materialise on ``device`` and initialise like nanochat. ``compute_dtype`` defaults
    to :func:`detect_compute_dtype` for ``device``."""
    if compute_dtype is None:
        compute_dtype, _ = detect_compute_dtype(device)
    with torch.device("meta"):
        model = GPT2026(config, compute_dtype=compute_dtype, attn_impl=attn_impl)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model

"""The derived hyperparameters of nanochat's 2026 recipe (nanochat 92d63d4 scripts/base_train.py), in one place.

From the user's knobs (base_train's names and defaults) :func:`plan_2026` returns every figure the training run
uses, so a training plan table can show them and the training module only reads them:

1. the model: width ``depth*aspect_ratio`` rounded up to a multiple of ``head_dim``, its parameter counts and FLOPs;
2. the token horizon ``target_tokens = ratio * (transformer matrices + lm_head)``, and the d12 reference
   ``D_REF = ratio * (the same count for a d12 built with the same knobs)``, ``B_REF = 2^19`` tokens;
3. the batch: ``total_batch_size = -1`` picks ``2^round(log2(B_REF * (target_tokens/D_REF)^0.383))``
   (optimal batch ~ D^0.383, arXiv 2505.13738);
4. all four LRs times ``sqrt(B/B_REF)`` (sqrt scaling, assumed for Muon as for AdamW);
5. the weight decay ``wd * sqrt(B/B_REF) * D_REF/target_tokens`` (a constant T_epoch = B/(lr*wd*D),
   arXiv 2405.13698);
6. the horizon: ``num_iterations`` if > 0, else ``target_flops / (flops_per_token * B)`` rounded, else
   ``target_tokens // B``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from nanolit.common import NanolitError
from nanolit.data.loader import grad_accum_steps
from nanolit.model2026 import GPT2026, GPTConfig2026
from nanolit.optim2026 import group_hyperparameters

B_REF = 2**19  # tokens per step found optimal at d12 (nanochat measured it)
D_REF_DEPTH = 12  # the reference model the LRs and weight decay were tuned on
BATCH_EXPONENT = 0.383  # Power Lines: optimal batch ~ D^0.383


@dataclass(frozen=True)
class Knobs2026:
    """base_train's knobs at nanochat 92d63d4, with its defaults (``vocab_size`` comes from the tokenizer)."""

    vocab_size: int
    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int = 2048
    window_pattern: str = "SSSL"
    num_iterations: int = -1
    target_flops: float = -1.0
    target_param_data_ratio: float = 12
    device_batch_size: int = 32
    total_batch_size: int = -1
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    weight_decay: float = 0.28
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05


@dataclass(frozen=True)
class Plan2026:
    """Every figure the 2026 recipe derives from :class:`Knobs2026` for ``world_size`` ranks."""

    knobs: Knobs2026
    world_size: int
    model_config: GPTConfig2026
    param_counts: dict[str, int]  # GPT2026.num_scaling_params: wte, value_embeds, lm_head, matrices, scalars, total
    flops_per_token: float
    scaling_params: int  # transformer matrices + lm_head: the count the scaling laws use
    target_tokens: int
    d_ref: float
    total_batch_size: int
    batch_size_source: str  # "total_batch_size" (given) or "auto" (from the depth)
    grad_accum_steps: int
    batch_lr_scale: float
    embedding_lr: float  # the four LRs handed to the optimizer builder, batch-scaled
    unembedding_lr: float
    matrix_lr: float
    scalar_lr: float
    weight_decay: float  # scaled; Muon's schedule multiplies it by a cosine
    num_iterations: int
    horizon_source: str  # "num_iterations", "target_flops" or "target_param_data_ratio"
    group_lrs: dict[str, float] = field(default_factory=dict)  # initial LR per optimizer group name (Muon: "muon")

    @property
    def total_tokens(self) -> int:
        return self.total_batch_size * self.num_iterations

    @property
    def tokens_per_scaling_param(self) -> float:
        return self.total_tokens / self.scaling_params

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.total_tokens

    def optimizer_kwargs(self) -> dict[str, float]:
        """Keyword arguments for ``nanolit.optim2026.build_muon_adamw``."""
        return dict(unembedding_lr=self.unembedding_lr, embedding_lr=self.embedding_lr, matrix_lr=self.matrix_lr,
                    weight_decay=self.weight_decay, scalar_lr=self.scalar_lr)

    def as_dict(self) -> dict:
        """A flat, JSON-friendly view: the knobs, then every derived figure."""
        out = {f"knob.{k}": v for k, v in asdict(self.knobs).items()}
        derived = {k: v for k, v in asdict(self).items() if k not in ("knobs", "model_config", "param_counts",
                                                                      "group_lrs")}
        out.update(derived)
        out.update({f"model.{k}": v for k, v in self.model_config.to_dict().items()})
        out.update({f"params.{k}": v for k, v in self.param_counts.items()})
        out.update({f"lr.{k}": v for k, v in self.group_lrs.items()})
        out.update(total_tokens=self.total_tokens, tokens_per_scaling_param=self.tokens_per_scaling_param,
                   total_flops=self.total_flops)
        return out

    def table_rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for a training plan table."""
        c, k = self.model_config, self.knobs
        rows = [
            ("model", f"d{c.n_layer}: width {c.n_embd}, {c.n_head} heads of {c.n_embd // c.n_head}, "
                      f"vocab {c.vocab_size:,}, windows {c.window_pattern}"),
            ("parameters", ", ".join(f"{name} {n:,}" for name, n in self.param_counts.items())),
            ("FLOPs per token", f"{self.flops_per_token:e}"),
            ("target tokens", f"{self.target_tokens:,} (ratio {k.target_param_data_ratio} x {self.scaling_params:,}"
                              f" scaling params; d12 reference {self.d_ref:,.0f})"),
            ("batch", f"{k.device_batch_size} x {k.max_seq_len} tokens x {self.grad_accum_steps} accumulation x "
                      f"{self.world_size} ranks = {self.total_batch_size:,} tokens/step ({self.batch_size_source})"),
            ("LR scale", f"{self.batch_lr_scale:.6g} = sqrt({self.total_batch_size}/{B_REF})"),
            ("weight decay", f"{self.weight_decay:.6g} (from {k.weight_decay})"),
            ("iterations", f"{self.num_iterations:,} (from {self.horizon_source})"),
            ("total tokens", f"{self.total_tokens:,} ({self.tokens_per_scaling_param:.2f} per scaling param)"),
            ("total FLOPs", f"{self.total_flops:e}"),
            ("schedule", f"warmup {k.warmup_steps} steps, warmdown {k.warmdown_ratio} to {k.final_lr_frac}"),
        ]
        rows += [(f"lr {name}", f"{lr:.6g}") for name, lr in self.group_lrs.items()]
        return rows


def _meta_model(knobs: Knobs2026, depth: int) -> GPT2026:
    config = GPTConfig2026.from_knobs(depth, knobs.vocab_size, knobs.max_seq_len, knobs.aspect_ratio, knobs.head_dim,
                                      knobs.window_pattern)
    with torch.device("meta"):  # shapes only: counting parameters needs no memory
        return GPT2026(config)


def _scaling_params(model: GPT2026) -> int:
    counts = model.num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def plan_2026(knobs: Knobs2026, world_size: int = 1) -> Plan2026:
    """Derive everything from ``knobs`` like nanochat 92d63d4's base_train (see the module docstring)."""
    if knobs.target_param_data_ratio == 0:
        raise NanolitError("target_param_data_ratio 0 gives no token horizon; use -1 to disable it, or a ratio > 0")
    model = _meta_model(knobs, knobs.depth)
    counts = model.num_scaling_params()
    scaling_params = _scaling_params(model)
    target_tokens = int(knobs.target_param_data_ratio * scaling_params)
    d_ref = knobs.target_param_data_ratio * _scaling_params(_meta_model(knobs, D_REF_DEPTH))

    total_batch_size, batch_source = knobs.total_batch_size, "total_batch_size"
    if total_batch_size == -1:
        predicted = B_REF * (target_tokens / d_ref) ** BATCH_EXPONENT
        total_batch_size, batch_source = 2 ** round(math.log2(predicted)), "auto"
    elif total_batch_size < 1:
        raise NanolitError(f"total_batch_size must be -1 (auto) or >= 1 token, got {total_batch_size}")
    accum = grad_accum_steps(total_batch_size, knobs.device_batch_size, knobs.max_seq_len, world_size)
    batch_lr_scale = (total_batch_size / B_REF) ** 0.5
    weight_decay = knobs.weight_decay * math.sqrt(total_batch_size / B_REF) * (d_ref / target_tokens)

    flops_per_token = model.estimate_flops()
    if knobs.num_iterations > 0:
        num_iterations, source = knobs.num_iterations, "num_iterations"
    elif knobs.target_flops > 0:
        num_iterations, source = round(knobs.target_flops / (flops_per_token * total_batch_size)), "target_flops"
    elif knobs.target_param_data_ratio > 0:
        num_iterations, source = target_tokens // total_batch_size, "target_param_data_ratio"
    else:
        raise NanolitError("no training horizon: set num_iterations, target_flops or target_param_data_ratio > 0")
    if num_iterations < 1:
        raise NanolitError(f"{source} gives {num_iterations} iterations at {total_batch_size:,} tokens per step; "
                           f"raise it or lower total_batch_size")

    lrs = dict(embedding_lr=knobs.embedding_lr * batch_lr_scale, unembedding_lr=knobs.unembedding_lr * batch_lr_scale,
               matrix_lr=knobs.matrix_lr * batch_lr_scale, scalar_lr=knobs.scalar_lr * batch_lr_scale)
    settings = group_hyperparameters(model.config.n_embd, weight_decay=weight_decay, **lrs)
    group_lrs = {name: group["lr"] for name, group in settings.items()}
    return Plan2026(knobs=knobs, world_size=world_size, model_config=model.config, param_counts=counts,
                    flops_per_token=flops_per_token, scaling_params=scaling_params, target_tokens=target_tokens,
                    d_ref=d_ref, total_batch_size=total_batch_size, batch_size_source=batch_source,
                    grad_accum_steps=accum, batch_lr_scale=batch_lr_scale, weight_decay=weight_decay,
                    num_iterations=num_iterations, horizon_source=source, group_lrs=group_lrs, **lrs)

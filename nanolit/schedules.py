"""nanochat's schedules: the base LR multiplier, the Muon momentum ramp, and the mid-training LR multiplier.

Pure functions of the step (or progress) so that a resumed run recomputes exactly the value the original
run would have used; nothing here holds state (nanochat d575940 scripts/base_train.py, scripts/mid_train.py). The
``*_2026`` functions are the
schedules of nanochat 92d63d4 scripts/base_train.py (the 2026 recipe).
"""
from __future__ import annotations

import math

from nanolit.common import NanolitError


def lr_multiplier(
    it: int,
    num_iterations: int,
    warmup_ratio: float = 0.0,
    warmdown_ratio: float = 0.2,
    final_lr_frac: float = 0.0,
) -> float:
    """Base-training LR multiplier for optimizer step ``it`` (nanochat d575940 scripts/base_train.py; 0-based, evaluated
    before the step).

    Linear warmup over ``round(warmup_ratio*N)`` steps, then constant, then a linear warmdown over the last
    ``round(warmdown_ratio*N)`` steps towards ``final_lr_frac``. Python's ``round`` (half to even) is used on
    purpose: it is what nanochat uses, and it decides where the warmdown starts. Because the last trained step
    is N-1, the multiplier never reaches ``final_lr_frac`` at a step (d20: the last step gets 1/4280).
    """
    _check_horizon(num_iterations, warmdown_ratio)
    if not 0.0 <= warmup_ratio <= 1.0:
        raise NanolitError(f"warmup_ratio must be in [0, 1] (got {warmup_ratio}); it is a fraction of num_iterations")
    return _warmup_constant_warmdown(it, num_iterations, round(warmup_ratio * num_iterations),
                                     round(warmdown_ratio * num_iterations), final_lr_frac)


def _check_horizon(num_iterations: int, warmdown_ratio: float) -> None:
    if num_iterations < 1:
        raise NanolitError(f"num_iterations must be >= 1 (got {num_iterations}); set a positive training horizon")
    if not 0.0 <= warmdown_ratio <= 1.0:
        raise NanolitError(f"warmdown_ratio must be in [0, 1] (got {warmdown_ratio}); it is a fraction of "
                           f"num_iterations")


def _warmup_constant_warmdown(it: int, num_iterations: int, warmup_iters: int, warmdown_iters: int,
                              final_lr_frac: float) -> float:
    """Linear warmup to 1 over ``warmup_iters`` steps, 1, then linear towards ``final_lr_frac`` over the last
    ``warmdown_iters`` steps. The warmup wins where the two overlap (a run shorter than its warmup)."""
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(it: int) -> float:
    """Muon momentum for step ``it``: linear from 0.85 to 0.95 over the first 300 steps, then 0.95 (nanochat d575940
    scripts/base_train.py, scripts/mid_train.py).

    The low early momentum keeps the first, noisy updates from being amplified by a long momentum tail.
    """
    frac = min(it / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def mid_lr_multiplier(progress: float) -> float:
    """Mid-training LR multiplier from epoch progress in [0, 1]: 1 for the first 80%, then linear to 0 (nanochat d575940
    scripts/mid_train.py).

    Mid-training has no fixed step count (the mixture is consumed once), so it schedules on data progress.
    """
    return 1.0 if progress < 0.8 else 1 - (progress - 0.8) / 0.2


def sft_lr_multiplier(it: int, num_iterations: int) -> float:
    """SFT LR multiplier for step ``it`` of ``num_iterations``: linear from 1 at step 0 towards 0 at step N, no warmup
    (nanochat d575940 scripts/chat_sft.py). chat_sft's loop stops at step N-1 without training it, so the last
    trained step gets 2/N."""
    _check_horizon(num_iterations, 0.0)
    return 1.0 - it / num_iterations


# ------------------------------------------------------------------------------------------------------------------
# The 2026 recipe (nanochat 92d63d4 scripts/base_train.py)

MUON_MOMENTUM_RAMP_2026 = 400  # steps over which the Muon momentum rises from 0.85 to 0.97


def lr_multiplier_2026(it: int, num_iterations: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                       final_lr_frac: float = 0.05) -> float:
    """LR multiplier for step ``it``: warmup over ``warmup_steps`` absolute steps (not a fraction any more), 1, then
    the last ``round(warmdown_ratio*N)`` steps down towards ``final_lr_frac`` (Python's round, half to even: 0.65*50
    gives 32). In a run shorter than warmup + warmdown the warmup ends straight into the warmdown (d2 fixture, step
    40 of 50: 0.35)."""
    _check_horizon(num_iterations, warmdown_ratio)
    if warmup_steps < 0:
        raise NanolitError(f"warmup_steps must be >= 0 (got {warmup_steps})")
    return _warmup_constant_warmdown(it, num_iterations, warmup_steps, round(warmdown_ratio * num_iterations),
                                     final_lr_frac)


def muon_momentum_2026(it: int, num_iterations: int, warmdown_ratio: float = 0.65) -> float:
    """Muon momentum for step ``it``: 0.85 -> 0.97 linearly over the first 400 steps, 0.97, then 0.97 -> 0.90 over
    the LR warmdown. The ramp takes precedence: the warmdown only lowers it from step 400 on."""
    _check_horizon(num_iterations, warmdown_ratio)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_iters
    if it < MUON_MOMENTUM_RAMP_2026:
        frac = it / MUON_MOMENTUM_RAMP_2026
        return (1 - frac) * 0.85 + frac * 0.97
    if warmdown_iters > 0 and it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown_iters
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay_2026(it: int, num_iterations: int, weight_decay: float) -> float:
    """Muon's (cautious) weight decay for step ``it``: ``weight_decay`` (already scaled, see nanolit.recipe2026)
    times a cosine from 1 at step 0 to 0 at step N."""
    _check_horizon(num_iterations, 0.0)
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))

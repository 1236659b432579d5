"""nanochat's schedules: the base LR multiplier, the Muon momentum ramp, and the mid-training LR multiplier.

Pure functions of the step (or progress) so that a resumed run recomputes exactly the value the original
run would have used; nothing here holds state. Spec §4.7, §4.8, §5.6.
"""
from __future__ import annotations

from nanolit.common import NanolitError


def lr_multiplier(
    it: int,
    num_iterations: int,
    warmup_ratio: float = 0.0,
    warmdown_ratio: float = 0.2,
    final_lr_frac: float = 0.0,
) -> float:
    """Base-training LR multiplier for optimizer step ``it`` (0-based, evaluated before the step; §4.7).

    Linear warmup over ``round(warmup_ratio*N)`` steps, then constant, then a linear warmdown over the last
    ``round(warmdown_ratio*N)`` steps towards ``final_lr_frac``. Python's ``round`` (half to even) is used on
    purpose: it is what nanochat uses, and it decides where the warmdown starts. Because the last trained step
    is N-1, the multiplier never reaches ``final_lr_frac`` at a step (d20: the last step gets 1/4280).
    """
    if num_iterations < 1:
        raise NanolitError(f"num_iterations must be >= 1 (got {num_iterations}); set a positive training horizon")
    for name, value in (("warmup_ratio", warmup_ratio), ("warmdown_ratio", warmdown_ratio)):
        if not 0.0 <= value <= 1.0:
            raise NanolitError(f"{name} must be in [0, 1] (got {value}); it is a fraction of num_iterations")
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(it: int) -> float:
    """Muon momentum for step ``it``: linear from 0.85 to 0.95 over the first 300 steps, then 0.95 (§4.8, §5.6).

    The low early momentum keeps the first, noisy updates from being amplified by a long momentum tail.
    """
    frac = min(it / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def mid_lr_multiplier(progress: float) -> float:
    """Mid-training LR multiplier from epoch progress in [0, 1]: 1 for the first 80%, then linear to 0 (§5.6).

    Mid-training has no fixed step count (the mixture is consumed once), so it schedules on data progress.
    """
    return 1.0 if progress < 0.8 else 1 - (progress - 0.8) / 0.2

"""Schedules against hand-computed values (nanochat d575940 scripts/base_train.py, scripts/mid_train.py)."""
from __future__ import annotations

import pytest

from nanolit.common import NanolitError
from nanolit.schedules import lr_multiplier, mid_lr_multiplier, muon_momentum


def test_d20_example():
    # nanochat d575940 scripts/base_train.py: N=21400, warmdown_iters=round(0.2*21400)=4280; constant through it=17120,
    # last step 1/4280
    n = 21400
    assert lr_multiplier(0, n) == 1.0
    assert lr_multiplier(17120, n) == 1.0
    assert lr_multiplier(17121, n) == pytest.approx(4279 / 4280, rel=1e-15)
    assert lr_multiplier(21399, n) == pytest.approx(1 / 4280, rel=1e-12)
    assert lr_multiplier(19260, n) == pytest.approx(0.5, rel=1e-15)  # halfway through the warmdown


def test_warmdown_decays_linearly_and_monotonically():
    n = 100  # warmdown_iters = 20: constant through it=80
    values = [lr_multiplier(it, n) for it in range(n)]
    assert values[:81] == [1.0] * 81
    assert values[81:] == pytest.approx([(n - it) / 20 for it in range(81, n)], rel=1e-15)
    assert all(a > b for a, b in zip(values[80:], values[81:]))


def test_round_is_pythons_half_to_even():
    # 0.25*10 = 2.5 rounds to 2, not 3: constant through it=8
    assert round(0.25 * 10) == 2
    assert lr_multiplier(8, 10, warmdown_ratio=0.25) == 1.0
    assert lr_multiplier(9, 10, warmdown_ratio=0.25) == pytest.approx(0.5)
    # 0.35*10 = 3.5 rounds to 4 (half to even): constant through it=6
    assert lr_multiplier(6, 10, warmdown_ratio=0.35) == 1.0
    assert lr_multiplier(7, 10, warmdown_ratio=0.35) == pytest.approx(3 / 4)


def test_warmup():
    # warmup_iters = round(0.1*50) = 5: (it+1)/5 for it < 5
    got = [lr_multiplier(it, 50, warmup_ratio=0.1) for it in range(6)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_final_lr_frac():
    # p = (N-it)/warmdown_iters; lrm = p + (1-p)*final
    n, final = 100, 0.1
    assert lr_multiplier(90, n, final_lr_frac=final) == pytest.approx(0.5 + 0.5 * 0.1)
    assert lr_multiplier(99, n, final_lr_frac=final) == pytest.approx(0.05 + 0.95 * 0.1)
    assert lr_multiplier(80, n, final_lr_frac=final) == 1.0


def test_no_warmdown_is_constant():
    assert [lr_multiplier(it, 7, warmdown_ratio=0.0) for it in range(7)] == [1.0] * 7


def test_bad_inputs_raise():
    with pytest.raises(NanolitError, match="num_iterations"):
        lr_multiplier(0, 0)
    with pytest.raises(NanolitError, match="warmdown_ratio"):
        lr_multiplier(0, 10, warmdown_ratio=1.5)
    with pytest.raises(NanolitError, match="warmup_ratio"):
        lr_multiplier(0, 10, warmup_ratio=-0.1)


def test_muon_momentum_ramp():
    assert muon_momentum(0) == pytest.approx(0.85, abs=1e-15)
    assert muon_momentum(150) == pytest.approx(0.90, abs=1e-15)
    assert muon_momentum(300) == pytest.approx(0.95, abs=1e-15)
    assert muon_momentum(10_000) == pytest.approx(0.95, abs=1e-15)
    ramp = [muon_momentum(it) for it in range(301)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))


def test_mid_lr_multiplier():
    assert mid_lr_multiplier(0.0) == 1.0
    assert mid_lr_multiplier(0.79) == 1.0
    assert mid_lr_multiplier(0.8) == pytest.approx(1.0)
    assert mid_lr_multiplier(0.9) == pytest.approx(0.5)
    assert mid_lr_multiplier(1.0) == pytest.approx(0.0, abs=1e-12)

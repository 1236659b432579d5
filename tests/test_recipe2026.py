"""The 2026 recipe's schedules and derived hyperparameters (nanochat 92d63d4 scripts/base_train.py)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from nanolit.common import NanolitError
from nanolit.recipe2026 import B_REF, Knobs2026, plan_2026
from nanolit.schedules import lr_multiplier_2026, muon_momentum_2026, muon_weight_decay_2026

FIXTURE_KNOBS = dict(vocab_size=4096, depth=2, max_seq_len=256, device_batch_size=4, total_batch_size=4096,
                     num_iterations=50)


def test_lr_multiplier_matches_the_fixture_log(expected_2026):
    for step, logged in expected_2026["lrm_logged"].items():
        assert f"{lr_multiplier_2026(int(step), 50):.2f}" == f"{logged:.2f}"


def test_lr_multiplier_shape():
    N = 1000  # warmdown round(650) steps from step 350, warmup 40
    assert lr_multiplier_2026(0, N) == 1 / 40 and lr_multiplier_2026(39, N) == 1.0
    assert lr_multiplier_2026(40, N) == 1.0 and lr_multiplier_2026(350, N) == 1.0
    assert lr_multiplier_2026(351, N) == pytest.approx(649 / 650 + (1 / 650) * 0.05)
    assert lr_multiplier_2026(999, N) == pytest.approx(1 / 650 + (649 / 650) * 0.05)
    assert lr_multiplier_2026(5, 50, warmup_steps=0, warmdown_ratio=0.0) == 1.0
    assert round(0.65 * 50) == 32  # half to even: the fixture's warmdown starts at step 18, inside the warmup
    with pytest.raises(NanolitError, match="warmup_steps"):
        lr_multiplier_2026(0, 10, warmup_steps=-1)
    with pytest.raises(NanolitError, match="num_iterations"):
        lr_multiplier_2026(0, 0)


def test_muon_momentum_ramp_then_warmdown():
    N = 2000  # warmdown: the last 1300 steps, from step 700
    assert muon_momentum_2026(0, N) == 0.85
    assert muon_momentum_2026(200, N) == pytest.approx(0.91)
    assert muon_momentum_2026(400, N) == 0.97 and muon_momentum_2026(700, N) == 0.97
    # a warmdown that starts (step 350 of 1000) inside the ramp only takes over at step 400
    assert muon_momentum_2026(399, 1000) == pytest.approx(0.85 + 0.12 * 399 / 400)
    assert muon_momentum_2026(400, 1000) == pytest.approx(0.97 * (1 - 50 / 650) + 0.90 * 50 / 650)
    assert muon_momentum_2026(1999, N) == pytest.approx(0.97 * (1 - 1299 / 1300) + 0.90 * 1299 / 1300)
    assert muon_momentum_2026(500, 20000) == 0.97  # between the ramp and a late warmdown
    assert muon_momentum_2026(49, 50) == pytest.approx(0.8647)  # the ramp wins in short runs (fixture's last step)


def test_muon_weight_decay_cosine(nanochat_2026):
    assert muon_weight_decay_2026(0, 100, 0.3) == 0.3
    assert muon_weight_decay_2026(50, 100, 0.3) == pytest.approx(0.15)
    assert muon_weight_decay_2026(100, 100, 0.3) == pytest.approx(0.0, abs=1e-17)
    saved = torch.load(nanochat_2026 / "optim_000050_rank0.pt", map_location="cpu", weights_only=True)
    wd = plan_2026(Knobs2026(**FIXTURE_KNOBS)).weight_decay
    assert saved["param_groups"][-1]["weight_decay"] == muon_weight_decay_2026(49, 50, wd)


def test_fixture_plan(nanochat_2026, expected_2026):
    plan = plan_2026(Knobs2026(**FIXTURE_KNOBS))
    assert plan.model_config.to_dict() == expected_2026["model_config"]
    assert plan.param_counts == expected_2026["num_params"]
    assert (plan.total_batch_size, plan.grad_accum_steps, plan.num_iterations, plan.horizon_source) == (
        4096, 4, 50, "num_iterations")
    assert plan.batch_lr_scale == math.sqrt(4096 / 2**19)
    assert plan.weight_decay == pytest.approx(2.375859, abs=5e-7)  # the fixture's README, 6 decimals
    saved = torch.load(nanochat_2026 / "optim_000050_rank0.pt", map_location="cpu", weights_only=True)
    names = ["lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas", "smear"] + ["muon"] * 4
    # the same Python float arithmetic as nanochat's: equal to the last bit
    assert [plan.group_lrs[n] for n in names] == [g["initial_lr"] for g in saved["param_groups"]]
    json.dumps(plan.as_dict())
    rows = dict(plan.table_rows())
    assert rows["iterations"] == "50 (from num_iterations)" and "2.37586" in rows["weight decay"]


def test_d12_reference_and_auto_batch():
    # d12 at vocab 32768: 12 layers x 12 x 768^2 matrices, 6 value-embedding gates of 6x12, lm_head 32768 x 768
    d12 = plan_2026(Knobs2026(vocab_size=32768, depth=12))
    assert d12.scaling_params == 12 * 12 * 768**2 + 6 * 6 * 12 + 32768 * 768 == 110_100_912
    assert d12.d_ref == 12 * 110_100_912 and d12.target_tokens == 12 * 110_100_912
    assert d12.total_batch_size == B_REF and d12.batch_size_source == "auto" and d12.weight_decay == 0.28
    assert d12.num_iterations == d12.target_tokens // B_REF and d12.horizon_source == "target_param_data_ratio"
    d20 = plan_2026(Knobs2026(vocab_size=32768, depth=20))
    ratio = d20.target_tokens / d20.d_ref
    assert d20.total_batch_size == 2 ** round(math.log2(B_REF * ratio**0.383)) == 2**20
    assert d20.matrix_lr == 0.02 * math.sqrt(2) and d20.weight_decay == pytest.approx(0.28 * math.sqrt(2) / ratio)
    assert d20.grad_accum_steps == 2**20 // (32 * 2048)


def test_horizon_precedence_and_errors():
    base = dict(vocab_size=4096, depth=2, max_seq_len=256, device_batch_size=4, total_batch_size=4096)
    flops = plan_2026(Knobs2026(**base)).flops_per_token
    assert plan_2026(Knobs2026(**base, num_iterations=7, target_flops=1e15)).num_iterations == 7
    by_flops = plan_2026(Knobs2026(**base, target_flops=1e12))
    assert (by_flops.num_iterations, by_flops.horizon_source) == (round(1e12 / (flops * 4096)), "target_flops")
    by_ratio = plan_2026(Knobs2026(**base, target_param_data_ratio=20))
    assert by_ratio.num_iterations == int(20 * by_ratio.scaling_params) // 4096
    with pytest.raises(NanolitError, match="no training horizon"):
        plan_2026(Knobs2026(**base, target_param_data_ratio=-1))
    with pytest.raises(NanolitError, match="ratio 0"):
        plan_2026(Knobs2026(**base, target_param_data_ratio=0))
    with pytest.raises(NanolitError, match="multiple of"):
        plan_2026(Knobs2026(**{**base, "total_batch_size": 5000}))
    with pytest.raises(NanolitError, match="gives 0 iterations"):
        plan_2026(Knobs2026(**base, target_flops=1.0))
    assert plan_2026(Knobs2026(**base, num_iterations=10), world_size=2).grad_accum_steps == 2

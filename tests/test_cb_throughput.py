"""TokenThroughputMonitor: tokens/s, MFU and training time like nanochat (nanochat d575940 scripts/base_train.py)."""
from __future__ import annotations

import csv
import time

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from test_cb_toys import FakeClock, make_trainer, toy_pair

from nanolit.callbacks import BPBValidation, TokenThroughputMonitor, peak_bf16_flops
from nanolit.common import NanolitError

STEP_SECONDS = 0.5


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """Time advances only inside training_step (0.5 s) and loss_per_token (the eval), so every number is exact."""
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake)
    return fake


def _fit(root, callbacks, max_steps, clock, ckpt_path=None, **module_kwargs):
    module, data = toy_pair(num_iterations=max_steps, step_seconds=STEP_SECONDS, **module_kwargs)
    module.clock = clock
    trainer = make_trainer(root, callbacks, max_steps=max_steps, enable_checkpointing=True)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


def _rows(root) -> list[dict]:
    with open(root / "run" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_tokens_per_second_and_mfu_with_a_configured_peak(tmp_path, clock):
    monitor = TokenThroughputMonitor(peak_flops=1e7)
    module, _ = _fit(tmp_path, [monitor], 4, clock)
    tokens = module.tokens_per_step  # 4 x 8
    assert monitor.run_state.dt == pytest.approx(STEP_SECONDS)
    assert monitor.run_state.tok_per_sec == tokens / STEP_SECONDS == 64
    expected_mfu = 100 * module.flops_per_token * tokens / STEP_SECONDS / 1e7
    assert monitor.run_state.mfu == pytest.approx(expected_mfu)
    assert monitor.run_state.total_training_flops == pytest.approx(module.flops_per_token * tokens * 4)

    rows = [r for r in _rows(tmp_path) if r["train/tok_per_sec"]]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert all(float(r["train/mfu"]) == pytest.approx(expected_mfu) for r in rows)
    assert all(float(r["train/dt"]) == pytest.approx(STEP_SECONDS) for r in rows)
    assert float(rows[-1]["train/total_training_flops"]) == pytest.approx(monitor.run_state.total_training_flops)
    # one set of throughput metrics, all under train/ (no parallel per-device set)
    assert {k for k in rows[0] if "sec" in k or "mfu" in k or "flops" in k} == {
        "train/tok_per_sec", "train/mfu", "train/total_training_flops"}


def test_no_mfu_on_cpu_without_a_peak(tmp_path, clock):
    monitor = TokenThroughputMonitor()
    _fit(tmp_path, [monitor], 3, clock)
    assert monitor.available_flops is None
    assert monitor.run_state.mfu is None
    assert monitor.run_state.tok_per_sec == 64
    rows = _rows(tmp_path)
    assert "train/mfu" not in rows[0]


def test_total_training_time_skips_the_first_steps_and_survives_resume(tmp_path, clock):
    full = TokenThroughputMonitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    _fit(tmp_path / "full", [full, ckpt], 15, clock)
    # nanochat counts dt only when step > 10: steps 11..14 of 0..14.
    assert full.run_state.total_training_time == pytest.approx(4 * STEP_SECONDS)

    resumed = TokenThroughputMonitor()
    _fit(tmp_path / "resumed", [resumed], 15, clock, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=12.ckpt")
    assert resumed.run_state.total_training_time == pytest.approx(full.run_state.total_training_time)


def test_evaluation_time_is_not_training_time(tmp_path, clock):
    """The val eval advances the clock 2 s per batch; listed after the monitor, it still is not counted."""
    monitor = TokenThroughputMonitor(warmup_steps=0)
    bpb = BPBValidation(eval_every=2)
    _fit(tmp_path, [monitor, bpb], 5, clock, eval_seconds=2.0)
    assert bpb.run_state.eval_seconds == pytest.approx(4 * 3 * 2.0)  # evals at steps 0, 2, 4 and the end, 3 batches each
    dts = [float(r["train/dt"]) for r in _rows(tmp_path) if r["train/dt"]]
    assert dts == pytest.approx([STEP_SECONDS] * 5)
    assert monitor.run_state.total_training_time == pytest.approx(4 * STEP_SECONDS)  # steps 1..4


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 3090", 71e12),
    ("NVIDIA A10G", None),
    ("Tesla T4", None),
])
def test_peak_table(name, peak):
    assert peak_bf16_flops(name) == peak


def test_module_without_the_protocol_is_a_clear_error(tmp_path):
    module, data = toy_pair()
    del module.tokens_per_step
    trainer = make_trainer(tmp_path, [TokenThroughputMonitor()], max_steps=1)
    with pytest.raises(NanolitError, match="tokens_per_step"):
        trainer.fit(module, datamodule=data)


@pytest.mark.parametrize("kwargs", [{"peak_flops": 0}, {"peak_flops": "989e12"}, {"warmup_steps": -1},
                                    {"warmup_steps": 2.0}])
def test_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(NanolitError):
        TokenThroughputMonitor(**kwargs)

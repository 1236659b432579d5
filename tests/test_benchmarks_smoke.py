"""The benchmark scripts run end to end at toy sizes and report consistent numbers; no timing asserts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.cli import SaveConfigCallback

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(name: str, *args: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_step_overhead_runs_both_loops(tiny_base_dir, tmp_path):
    out = tmp_path / "overhead.json"
    run_script("step_overhead.py", "--device", "cpu", "--depth", "2", "--device-batch-size", "2", "--seq-len", "32",
               "--steps", "2", "--warmup", "1", "--rounds", "2", "--threads", "1", "--base-dir", str(tiny_base_dir),
               "--json", str(out))
    result = json.loads(out.read_text())
    for clock in ("wall", "cpu"):
        numbers = result[clock]
        assert len(numbers["lightning_ms"]) == len(numbers["plain_ms"]) == 2  # interleaved rounds, both sides
        assert all(t > 0 for t in numbers["lightning_ms"] + numbers["plain_ms"])
        assert numbers["ratio"] == pytest.approx(numbers["median_lightning_ms"] / numbers["median_plain_ms"],
                                                 rel=1e-3)


def test_step_overhead_mirrors_the_cli(tiny_base_dir, tmp_path, monkeypatch):
    """Side (a) must be what `nanolit fit` builds: the same callback classes and trainer defaults."""
    monkeypatch.setattr(sys, "argv", ["nanolit"])  # LightningCLI reads args=, and warns about pytest's own argv
    sys.path.insert(0, str(BENCH))
    try:
        import step_overhead
    finally:
        sys.path.remove(str(BENCH))
    from nanolit.lightning_cli import NanoCLI

    cli = NanoCLI(args=["--model=nanolit.module.GPTModule", f"--data.base_dir={tiny_base_dir}",
                        f"--trainer.default_root_dir={tmp_path}",
                        "--trainer.accelerator=cpu"], run=False)
    ours = {type(cb) for cb in step_overhead.cli_callbacks(tmp_path / "ckpt")}
    nanolit_or_lr = {type(cb) for cb in cli.trainer.callbacks  # the CLI's config writer is no training callback
                     if (type(cb).__module__.startswith("nanolit.") or type(cb).__name__ == "LearningRateMonitor")
                     and not isinstance(cb, SaveConfigCallback)}
    assert ours == nanolit_or_lr
    defaults = step_overhead.parse_args([])
    assert cli.trainer.log_every_n_steps == defaults.log_every
    assert (cli.trainer.limit_val_batches, cli.trainer.num_sanity_val_steps, cli.trainer.max_epochs) == (0, 0, -1)


def test_gpu_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    run_script("gpu.py", "--device", "cpu", "--depths", "2", "--device-batch-size", "2", "--seq-len", "32",
               "--vocab-size", "256", "--steps", "2", "--warmup", "1", "--no-compile", "--loss-chunk-size", "16",
               "--json", str(out))
    (result,) = json.loads(out.read_text())
    assert result["depth"] == 2 and result["tokens_per_step"] == 64 and result["grad_accum"] == 1
    assert result["loss_chunk_size"] == 16
    assert 0 < result["muon_ms"] < result["step_ms"] and result["mfu_pct"] is None  # no peak FLOP/s on CPU
    # both numbers are rounded (tok/s to 0.1, the step to 0.01 ms), so they agree to those roundings, however slow
    # the CPU: 0.05 tok/s, plus the 0.005 ms of the step time as a fraction of it.
    expected = 64 / (result["step_ms"] / 1000)
    assert abs(result["tok_per_sec"] - expected) <= 0.05 + expected * 0.005 / result["step_ms"] + 1e-9


def test_dataloader_benchmark_on_real_text(tiny_base_dir, tmp_path):
    out = tmp_path / "loader.json"
    shards = sorted(str(p) for p in (tiny_base_dir / "base_data").glob("*.parquet"))[:-1]
    run_script("dataloader.py", "--tokenizer-dir", str(tiny_base_dir / "tokenizer"), "--shards", *shards,
               "--device-batch-size", "2", "--seq-len", "64", "--seconds", "0.5", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["cores"] == 1 and result["tokenizer_threads"] == 1 and result["vocab_size"] == 4096
    assert result["steps"] >= 1 and result["tok_per_sec"] > 0
    assert 1 < result["bytes_per_token"] < 8  # FineWeb-Edu text through a 4096-token BPE
    assert result["meets_target"] == (result["x_d20"] >= 10)


def test_loss_head_benchmark_compares_variants(tmp_path):
    out = tmp_path / "loss_head.json"
    run_script("loss_head.py", "--depth", "2", "--vocab-size", "8192", "--device-batch-size", "2", "--seq-len", "64",
               "--chunks", "16", "--steps", "1", "--warmup", "1", "--rounds", "2", "--threads", "1", "--json", str(out))
    variants = json.loads(out.read_text())["variants"]
    assert [v["chunk"] for v in variants] == [0, 16]  # the one-shot baseline is always measured first
    base, chunked = variants
    assert len(base["runs"]) == len(chunked["runs"]) == 2 and base["time_ratio"] == 1.0
    # same loss, computed two ways: a mean of 128 fp32 losses in another order is a few ulps (2^-24) apart
    assert chunked["loss"] == pytest.approx(base["loss"], rel=1e-5)
    assert chunked["memory_ratio"] == pytest.approx(chunked["peak_growth_mib"] / base["peak_growth_mib"])
    assert base["peak_growth_mib"] > chunked["peak_growth_mib"] > 0  # 128 x 8192 fp32 logits: 4 MiB a copy


@pytest.mark.slow
def test_attention_benchmark_runs_both_paths(tmp_path):
    out = tmp_path / "attention.json"
    run_script("attention.py", "--threads", "1", "--steps", "1", "--rounds", "2", "--shapes", "1,1,64,16,16",
               "--depth", "1", "--seq-len", "256", "--batch", "1", "--json", str(out))
    op, model = json.loads(out.read_text())
    for case in (op, model):
        assert case["ratio"] == pytest.approx(case["flex_ms"] / case["sdpa_ms"])
        assert case["max_abs_diff"] < 1e-5  # the same attention by both paths
    assert op["train_sdpa_ms"] > 0 and "train_sdpa_ms" not in model

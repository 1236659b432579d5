"""The benchmark scripts run end to end at toy sizes and report consistent numbers; no timing asserts."""
from __future__ import annotations

import json
import math
import os
import statistics
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


FAKE_BASE_TRAIN = '''"""Prints base_train's lines the way nanochat d575940 does, without training: the driver's parsing is under test."""
import sys

knobs = dict(arg[2:].split("=", 1) for arg in sys.argv[1:])
steps, every = int(knobs["num_iterations"]), int(knobs["eval_every"])
for step in range(steps + 1):
    if step % every == 0 or step == steps:
        print(f"Step {step:05d} | Validation bpb: {3.0 - step / 100:.4f}")
    if step < steps:
        print(f"step {step:05d}/{steps:05d} ({100 * step / steps:.2f}%) | loss: {8.0 - step / 10:.6f} | grad norm: 1.0 "
              f"| lrm: 1.00 | dt: {50.0 + step:.2f}ms | tok/sec: 1,000 | mfu: 0.00 | total time: 0.00m")
'''


def test_vs_nanochat_reads_both_programs(tiny_base_dir, tmp_path):
    """The driver against a stand-in nanochat checkout that prints base_train's lines: nanolit runs for real
    with StepClock, both sides' step lines, val bpb lines and whole-step times are read, rounds alternate."""
    fake = tmp_path / "nanochat"
    (fake / "scripts").mkdir(parents=True)
    (fake / "scripts" / "__init__.py").write_text("")
    (fake / "scripts" / "base_train.py").write_text(FAKE_BASE_TRAIN)
    out = tmp_path / "vs.json"
    run_script("vs_nanochat.py", "--nanochat", str(fake), "--nanochat-python", sys.executable,
               "--base-dir", str(tiny_base_dir), "--depth", "1", "--max-seq-len", "32", "--device-batch-size", "2",
               "--total-batch-size", "128", "--steps", "5", "--eval-every", "2", "--eval-tokens", "128",
               "--rounds", "2", "--nanolit-args", "--model.compile=false --data.tokenizer_threads=1",
               "--work", str(tmp_path / "work"), "--json", str(out))
    result = json.loads(out.read_text())
    rounds = result["rounds"]
    assert [r["order"] for r in rounds] == [["nanochat", "nanolit"], ["nanolit", "nanochat"]]
    for r in rounds:
        nanochat, nanolit = r["nanochat"], r["nanolit"]
        # steps 1..3 counted on both sides: step 0 is the cold start, step 4 has no next step to close its clock
        assert nanochat["whole"]["n"] == nanolit["whole"]["n"] == nanolit["own_dt"]["n"] == 3
        assert nanochat["whole"]["median_ms"] == pytest.approx(52.0)  # the stand-in's dt of steps 1..3
        assert nanochat["first_step_ms"] == pytest.approx(50.0)
        # the whole step holds the step nanolit's own dt times and the work between steps
        assert nanolit["whole"]["median_ms"] > 0 and nanolit["own_dt"]["median_ms"] > 0
        assert r["ratio_median"] == pytest.approx(nanolit["whole"]["median_ms"] / 52.0)
        assert sorted(map(int, nanolit["loss"])) == list(range(5))
        assert sorted(map(int, nanolit["val_bpb"])) == sorted(map(int, nanochat["val_bpb"])) == [0, 2, 4, 5]
        assert math.isfinite(r["loss_max_rel_diff"]) and math.isfinite(r["val_bpb_max_rel_diff"])
    assert result["summary"]["ratio_median"] == pytest.approx(statistics.median(r["ratio_median"] for r in rounds))


def test_cpu_memory_benchmark_runs_eager(tmp_path):
    out = tmp_path / "mem.json"
    run_script("cpu_memory.py", "--depth", "1", "--seq-len", "32", "--device-batch-size", "2", "--accum", "2",
               "--steps", "2", "--warmup", "1", "--rounds", "1", "--modes", "eager", "--json", str(out))
    results = json.loads(out.read_text())
    assert [(r["memory"], r["compiled"]) for r in results] == [("returned", False), ("kept", False)]
    assert results[1]["took"] is True  # glibc took the setting on this Linux machine
    assert all(r["faults_per_step"] >= 0 and r["step_ms"] > 0 for r in results)

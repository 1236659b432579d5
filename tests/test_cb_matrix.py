"""Every callback under every common Lightning set-up, on a toy module that is not nanolit's GPT: {manual,
automatic optimization} x {accumulate 1, 4} x {1 process, 2 processes gloo} x {fresh, resumed}. The numbers are
asserted, not only that nothing crashed: one logged row per optimizer step, tok/s against the (fake) wall clock,
the EMA against its formula, which step each checkpoint holds, and a resumed run ending where the fresh one did.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
SCRIPT = TESTS_DIR / "_cb_matrix_script.py"
CELLS = [f"{mode}-{accum}" for mode in ("manual", "automatic") for accum in (1, 4)]
B, T, STEPS, MICRO_SECONDS = 2, 8, 4, 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-processes"])
def matrix(request, tmp_path_factory) -> tuple[int, dict]:
    out = tmp_path_factory.mktemp(f"matrix{request.param}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    if request.param == 1:
        command = [sys.executable, str(SCRIPT), str(out)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max_restarts=0",
                   f"--master_port={free_port()}", str(SCRIPT), str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return request.param, {cell: json.loads((out / f"{cell}.json").read_text()) for cell in CELLS}


def steps_logged(run: dict, key: str) -> list[int]:
    return [step for step, metrics in run["logged"] if key in metrics]


def logged(run: dict, key: str) -> list[float]:
    return [metrics[key] for _, metrics in run["logged"] if key in metrics]


@pytest.mark.slow  # two runs of 8 fits each, one of them on 2 processes (~60 s)
@pytest.mark.parametrize("cell", CELLS)
def test_callbacks_count_optimizer_steps(matrix, cell):
    world, runs = matrix
    accum = int(cell.split("-")[1])
    fresh, resumed = runs[cell]["fresh"], runs[cell]["resumed"]
    assert fresh["world_size"] == world and fresh["global_step"] == resumed["global_step"] == STEPS

    # one row per optimizer step, never a micro-batch's (no step -1, no duplicates)
    for key in ("train/loss", "train/loss_raw", "train/tok_per_sec", "train/dt"):
        assert steps_logged(fresh, key) == list(range(STEPS)), key
        assert steps_logged(resumed, key) == list(range(2, STEPS)), key
    assert len(fresh["lines"]) == STEPS and fresh["lines"][0].startswith("step 00000/00004 (0.00%) | loss: ")

    # the step's time is its micro-batches' (the fake clock moves 0.25 s each), evaluations left out
    dt = accum * MICRO_SECONDS
    tokens = B * T * accum * world
    for run in (fresh, resumed):
        assert logged(run, "train/dt") == pytest.approx([dt] * len(logged(run, "train/dt")))
        assert logged(run, "train/tok_per_sec") == pytest.approx([tokens / dt] * len(logged(run, "train/dt")))
        # nanochat counts steps after warmup_steps (here 0): steps 1, 2 and 3
        assert run["state"]["total_training_time"] == pytest.approx((STEPS - 1) * dt)
        assert run["state"]["mfu"] == pytest.approx(100 * 6.0 * 82 ** 2 * tokens / dt / (1e9 * world))

    # the EMA of the step's mean micro-batch loss, debiased, as nanochat's formula
    smooth, losses = 0.0, fresh["step_losses"]
    for step, value in zip(range(STEPS), logged(fresh, "train/loss")):
        smooth = 0.9 * smooth + 0.1 * losses[str(step)]
        assert value == pytest.approx(smooth / (1 - 0.9 ** (step + 1)), rel=1e-6)  # fp32 sums of 4 losses
    assert logged(resumed, "train/loss") == pytest.approx(logged(fresh, "train/loss")[2:], rel=1e-6)

    # checkpoints: saved once per save step, after the step's last micro-batch
    assert fresh["saved_at"] == [2, 4] and resumed["saved_at"] == [4]
    batches_per_step = 1 if cell.startswith("manual") else accum  # manual: one batch holds the whole step
    if fresh["checkpoints"]:  # rank zero's folder
        assert fresh["checkpoints"] == {
            f"step={s:06d}.ckpt": {"global_step": s, "batches_processed": s * batches_per_step} for s in (2, 4)}

    # the resumed run ends exactly where the fresh one did
    for key in ("min_val_bpb", "smooth_train_loss", "train_loss", "total_training_time"):
        assert resumed["state"][key] == pytest.approx(fresh["state"][key]), key
    assert resumed["state"]["val_bpb_history"] == fresh["state"]["val_bpb_history"]
    assert [s for s, _ in fresh["state"]["val_bpb_history"]] == [0, 2, 4]
    assert fresh["state"]["core"]["step"] == 4 and resumed["state"]["core"] == fresh["state"]["core"]
    assert resumed["weights"] == fresh["weights"]
    if fresh["report"] is not None:  # rank zero
        assert fresh["report"] and [s for s, _ in fresh["series"]] == list(range(STEPS))
        assert fresh["state"]["samples"]["step"] == 4

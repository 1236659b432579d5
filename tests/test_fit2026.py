"""The 2026 recipe through `nanolit fit`: the fixture's run reproduced step by step, its export, exact resume, and
continuing nanochat 92d63d4's own checkpoint (--resume_from_nanochat).

Tolerances (as tests/test_train2026.py, which runs the same recipe as a plain loop): step 0 depends only on the init
and one forward (the logged loss has 6 decimals, +-5e-7, and a fp32 mean of 1024 losses carries ~1e-6 of summation
order); later steps also carry eager-vs-compiled arithmetic (nanochat compiled the model and its optimizer steps):
O(fp32 eps) relative in ~100 rounded operations per value per step, accumulating over 50 steps to at most
50 * 100 * 6e-8 = 3e-4. The LR multiplier is printed to 2 decimals (+-0.005).
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

from nanolit.checkpoint import load_nanochat
from nanolit.cli import main
from nanolit.model2026 import GPT2026
from nanolit.schedules import lr_multiplier_2026

ACCUMULATED = 3e-4


def config(tmp_path: Path, base: Path, root: Path, **model) -> Path:
    """The fixture's flags: depth 2, seq 256, batch 4, 4096 tokens/step, 50 iterations, val bpb every 10 steps on
    32768 tokens, no CORE, no samples."""
    args = {"depth": 2, "max_seq_len": 256, "device_batch_size": 4, "total_batch_size": 4096, "num_iterations": 50,
            "compile": False, **model}  # eager, as the tolerances below were derived
    path = tmp_path / f"{root.name}.json"
    path.write_text(json.dumps({
        "model": {"class_path": "nanolit.module2026.GPT2026Module", "init_args": args},
        "data": {"class_path": "nanolit.data.datamodule.BestFitDataModule",
                 "init_args": {"base_dir": str(base), "eval_tokens": 32768, "tokenizer_threads": 1}},
        "trainer": {"precision": "32-true", "default_root_dir": str(root), "enable_progress_bar": False,
                    "accelerator": "cpu", "devices": 1},
        "bpb": {"eval_every": 10}, "core": {"core_metric_every": -1}, "sample": {"sample_every": -1},
        "checkpoint": {"save_every": 25}}))
    return path


def logged(root: Path, key: str) -> dict[int, float]:
    with open(next(root.glob("logs/version_*/metrics.csv"))) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


@pytest.fixture(scope="module")
def fixture_run(nanochat_2026, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fit2026")
    base = tmp / "base"
    for name in ("base_data", "tokenizer"):
        shutil.copytree(nanochat_2026 / name, base / name)
    root = tmp / "run"
    argv = sys.argv
    sys.argv = ["nanolit"]
    try:
        main(["fit", "-c", str(config(tmp, base, root))])
    finally:
        sys.argv = argv
    return {"tmp": tmp, "base": base, "root": root}


@pytest.mark.slow  # 50 steps of a d2 model and 6 evaluations (~25 s)
def test_nanolit_fit_reproduces_nanochats_2026_run(fixture_run, expected_2026):
    root = fixture_run["root"]
    loss, lrm, bpb = logged(root, "train/loss"), logged(root, "train/lrm"), logged(root, "val/bpb")
    assert sorted(loss) == list(range(50)) and sorted(bpb) == [0, 10, 20, 30, 40, 50]
    assert loss[0] == pytest.approx(expected_2026["train_loss_step0"], abs=1.5e-6)
    for step, value in expected_2026["train_loss_logged"].items():
        assert loss[int(step)] == pytest.approx(value, rel=ACCUMULATED, abs=5e-7), step
    for step, value in expected_2026["lrm_logged"].items():
        assert abs(lrm[int(step)] - value) <= 0.005 + 1e-12, step
    for step, value in expected_2026["val_bpb_curve"].items():
        assert bpb[int(step)] == pytest.approx(value, rel=1e-3), step  # within 0.1%; ACCUMULATED holds too
        assert bpb[int(step)] == pytest.approx(value, rel=ACCUMULATED, abs=5e-7), step


@pytest.mark.slow
def test_the_export_is_nanochats_2026_layout(fixture_run, expected_2026, nanochat_2026):
    export = fixture_run["base"] / "base_checkpoints" / "d2"
    model, meta = load_nanochat(export)
    assert isinstance(model, GPT2026) and meta["step"] == 50
    theirs = json.loads((nanochat_2026 / "meta_000050.json").read_text())
    assert set(theirs) <= set(meta) and meta["model_config"] == theirs["model_config"]
    assert meta["dataloader_state_dict"]["pq_idx"] == theirs["dataloader_state_dict"]["pq_idx"]
    assert {k: v for k, v in meta["user_config"].items() if k in theirs["user_config"] and k in (
        "depth", "aspect_ratio", "head_dim", "window_pattern", "warmup_steps", "warmdown_ratio")} == {
        k: theirs["user_config"][k] for k in ("depth", "aspect_ratio", "head_dim", "window_pattern", "warmup_steps",
                                              "warmdown_ratio")}
    ours = torch.load(export / "optim_000050_rank0.pt", weights_only=True)
    saved = torch.load(nanochat_2026 / "optim_000050_rank0.pt", weights_only=True)
    assert [sorted(g) for g in ours["param_groups"]] == [sorted(g) for g in saved["param_groups"]]
    ids = torch.tensor(expected_2026["batch_ids"]).view(2, 257)
    with torch.no_grad():
        assert model(ids[:, :-1], ids[:, 1:]).item() == pytest.approx(expected_2026["loss_mean"], rel=ACCUMULATED)


@pytest.mark.slow  # 25 more steps (~12 s)
def test_a_resumed_2026_run_ends_bitwise_where_the_fresh_one_did(fixture_run, monkeypatch):
    tmp, root = fixture_run["tmp"], fixture_run["tmp"] / "resumed"
    monkeypatch.setattr(sys, "argv", ["nanolit"])
    path = config(tmp, fixture_run["base"], root, export=False)
    main(["fit", "-c", str(path), "--ckpt_path", str(fixture_run["root"] / "checkpoints" / "step=000025.ckpt")])
    fresh = torch.load(fixture_run["root"] / "checkpoints" / "step=000050.ckpt", weights_only=True)
    resumed = torch.load(root / "checkpoints" / "step=000050.ckpt", weights_only=True)
    for key, value in fresh["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert fresh["BestFitDataModule"] == resumed["BestFitDataModule"]  # the best-fit loader's position, epoch included
    assert fresh["callbacks"]["RunState"]["val_bpb_history"] == resumed["callbacks"]["RunState"]["val_bpb_history"]


class StartWeights(L.Callback):
    """The weights and LR multiplier training starts from, after the restore."""

    seen: dict = {}

    def on_train_start(self, trainer, pl_module):
        StartWeights.seen = {"step": trainer.global_step,
                             "weights": {k: v.clone() for k, v in pl_module.gpt.state_dict().items()},
                             "optimizer_steps": {s.get("step") for s in trainer.optimizers[0].state.values()}}


@pytest.mark.slow  # 2 steps from nanochat's step 50 (~8 s)
def test_resume_from_nanochats_own_2026_checkpoint(fixture_run, nanochat_2026, monkeypatch):
    tmp, root = fixture_run["tmp"], fixture_run["tmp"] / "from_nanochat"
    monkeypatch.setattr(sys, "argv", ["nanolit"])
    path = config(tmp, fixture_run["base"], root, num_iterations=52, export=False)
    main(["fit", "-c", str(path), "--resume_from_nanochat", str(nanochat_2026),
          "--trainer.callbacks+=test_fit2026.StartWeights"])
    seen = StartWeights.seen
    assert seen["step"] == 50
    theirs = torch.load(nanochat_2026 / "model_000050.pt", weights_only=True)
    for key, value in theirs.items():
        assert torch.equal(seen["weights"][key].to(value.dtype), value), key
    assert {int(s) for s in seen["optimizer_steps"] if s is not None} == {50}  # nanochat's moments, not fresh ones
    lrm = logged(root, "train/lrm")
    assert sorted(lrm) == [50, 51] and lrm[50] == pytest.approx(lr_multiplier_2026(50, 52))


@pytest.mark.slow
def test_a_2026_lightning_checkpoint_evaluates_through_the_cli(fixture_run, eval_bundle, tmp_path):
    """`nanolit eval core` (and every tool that loads a .ckpt) reads a GPT2026Module checkpoint."""
    out = tmp_path / "core.csv"
    main(["eval", "core", "--checkpoint", str(fixture_run["root"] / "checkpoints" / "last.ckpt"), "--bundle",
          str(eval_bundle), "--tasks", "copa", "--max_per_task", "4", "--output", str(out)])
    rows = [line.split(",")[0].strip() for line in out.read_text().splitlines()]
    assert rows == ["Task", "copa", "CORE"]

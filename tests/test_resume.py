"""Exact resume: SIGKILL anywhere, even mid-save, then ``--ckpt_path last`` gives bitwise the uninterrupted
run; and resuming a nanochat checkpoint folder (``--resume_from_nanochat``, nanolit/resume.py)."""
from __future__ import annotations

import copy
import subprocess

import lightning.pytorch as L
import pyarrow.parquet as pq
import pytest
import torch
from _train_script import callback, command, read_log, write_config
from test_preemption import build, fit, run, saved_step, step_files

from nanolit.callbacks import BPBValidation, EMALossLogger, RunState, StepCheckpoint, TokenThroughputMonitor
from nanolit.checkpoint import save_nanochat_checkpoint
from nanolit.common import NanolitError
from nanolit.data.shards import list_parquet_files
from nanolit.model import GPTConfig
from nanolit.resume import locate_nanochat_step, resume_from_nanochat

# total_training_time counts steps after 10 (nanochat d575940 scripts/base_train.py): resume at 12 tests it
STEPS, SAVE_EVERY = 20, 4


def launch(root, name: str, base_dir, callbacks: list, *args: str) -> subprocess.CompletedProcess:
    """One ``nanolit fit`` process of the run in ``root``, logging each step to ``root/<name>.jsonl``."""
    config = write_config(root / f"{name}.json", base_dir, root / "run", STEPS, SAVE_EVERY,
                          callbacks=[callback("StepLog", path=str(root / f"{name}.jsonl")), *callbacks])
    return subprocess.run(command("fit", "-c", str(config), *args), capture_output=True, text=True, timeout=300)


def same(a, b) -> bool:
    """Bitwise equality of nested checkpoint content."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(reference: dict, resumed: dict) -> None:
    """Weights, optimizer state (LR, momentum, moments), data position and training state match bitwise."""
    assert resumed["global_step"] == reference["global_step"] == STEPS
    assert same(reference["state_dict"], resumed["state_dict"])
    assert same(reference["optimizer_states"], resumed["optimizer_states"])
    assert same(reference["BaseDataModule"], resumed["BaseDataModule"])
    state, reference_state = resumed["callbacks"]["RunState"], reference["callbacks"]["RunState"]
    for key in ("smooth_train_loss", "train_loss", "last_train_loss", "min_val_bpb", "val_bpb"):
        assert state[key] == reference_state[key], key


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tmp_path_factory):
    """The uninterrupted run: its folder, final checkpoint and step log."""
    root = tmp_path_factory.mktemp("reference")
    proc = launch(root, "log", tiny_base_dir, [])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, steps = read_log(root / "log.jsonl")
    checkpoints = root / "run" / "checkpoints"
    return {"checkpoints": checkpoints, "steps": steps,
            "final": torch.load(checkpoints / f"step={STEPS:06d}.ckpt", weights_only=True)}


@pytest.mark.slow  # four `nanolit fit` processes plus the reference (~40 s)
def test_sigkill_anywhere_then_resume_last_is_bitwise_identical(tiny_base_dir, tmp_path, reference):
    ckpt = tmp_path / "run" / "checkpoints"

    # killed while writing step 8's checkpoint: a half-written temporary file, last.ckpt still step 4
    proc = launch(tmp_path, "a", tiny_base_dir, [callback("KillDuringSave", step=8, truncate=True)], "--ckpt_path",
                  "last")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (ckpt / ".step=000008.ckpt.tmp").exists() and step_files(ckpt) == ["last.ckpt", "step=000004.ckpt"]
    assert saved_step(ckpt / "last.ckpt") == 4

    # killed after step 12's file is complete but before it is renamed: last.ckpt is step 8
    proc = launch(tmp_path, "b", tiny_base_dir, [callback("KillDuringSave", step=12)], "--ckpt_path", "last")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert saved_step(ckpt / "last.ckpt") == 8 and not (ckpt / "step=000012.ckpt").exists()
    # the relaunch cleared the first kill's dead temporary when it took the folder
    assert not (ckpt / ".step=000008.ckpt.tmp").exists() and (ckpt / ".step=000012.ckpt.tmp").exists()

    # killed at the start of step 15, between checkpoints: last.ckpt is step 12
    proc = launch(tmp_path, "c", tiny_base_dir, [callback("KillAt", step=15)], "--ckpt_path", "last")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert saved_step(ckpt / "last.ckpt") == 12
    at_12 = torch.load(ckpt / "step=000012.ckpt", weights_only=True)["callbacks"]["RunState"]

    proc = launch(tmp_path, "d", tiny_base_dir, [], "--ckpt_path", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = torch.load(ckpt / f"step={STEPS:06d}.ckpt", weights_only=True)
    assert_same_run(reference["final"], final)
    assert final["callbacks"]["RunState"]["val_bpb_history"] == \
        reference["final"]["callbacks"]["RunState"]["val_bpb_history"]

    starts, steps = read_log(tmp_path / "d.jsonl")
    for step in range(13, STEPS + 1):  # the same loss and EMA at every step after the resume
        assert (steps[step]["loss"], steps[step]["smooth"]) == (reference["steps"][step]["loss"],
                                                                 reference["steps"][step]["smooth"])
    # total_training_time goes on from the checkpoint's value, which counts every timed step up to 12 (index 11 is
    # the first after nanochat's 10 warm-up steps), and grows with this run's steps
    assert starts == [{"start": 12, "total_training_time": at_12["total_training_time"]}]
    totals = [steps[s]["total_training_time"] for s in range(13, STEPS + 1)]
    assert 0 < at_12["total_training_time"] < totals[-1] and totals == sorted(totals)


def nanochat_folder(lightning_ckpt, out_dir, exact_position: bool = True):
    """Write a Lightning checkpoint's step in nanochat's layout (nanochat d575940 base_train): model, meta, [adamw, muon] optimizer.

    ``exact_position=False`` keeps only nanochat's ``{pq_idx, rg_idx}`` in the meta; nanolit's own export adds the
    exact position (epoch, document, token).
    """
    ck = torch.load(lightning_ckpt, weights_only=True)
    hp, cb, step = ck["hyper_parameters"], ck["callbacks"], ck["global_step"]
    model = {k.removeprefix("gpt."): v for k, v in ck["state_dict"].items()}
    loader = ck["BaseDataModule"]["train_loader"][0]
    meta = {
        "step": step,
        "val_bpb": cb["RunState"]["val_bpb"],
        "model_config": GPTConfig.from_depth(hp["depth"], model["transformer.wte.weight"].shape[0],
                                             hp["max_seq_len"]).to_dict(),
        "user_config": {"depth": hp["depth"], "num_iterations": hp["num_iterations"]},
        "device_batch_size": hp["device_batch_size"],
        "max_seq_len": hp["max_seq_len"],
        "dataloader_state_dict": loader if exact_position else {k: loader[k] for k in ("pq_idx", "rg_idx")},
        "loop_state": {key: cb["RunState"][key] for key in ("min_val_bpb", "smooth_train_loss", "total_training_time")},
    }
    save_nanochat_checkpoint(out_dir, step, model, ck["optimizer_states"], meta)
    return out_dir, meta


@pytest.mark.slow  # two `nanolit fit` processes (~15 s) after the reference
def test_cli_resumes_a_nanochat_folder_then_its_own_last_checkpoint(tiny_base_dir, tmp_path, reference):
    """``--resume_from_nanochat DIR --ckpt_path last``: the first launch starts from nanochat's step 8, the relaunch
    after a kill continues from last.ckpt; with the exact data position the run is bitwise the uninterrupted one."""
    source, meta = nanochat_folder(reference["checkpoints"] / "step=000008.ckpt", tmp_path / "base_checkpoints" / "d1")
    args = ("--resume_from_nanochat", str(source), "--ckpt_path", "last")
    proc = launch(tmp_path, "first", tiny_base_dir, [callback("KillAt", step=14)], *args)
    assert proc.returncode == -9, proc.stderr[-3000:]
    starts, _ = read_log(tmp_path / "first.jsonl")
    assert starts == [{"start": 8, "total_training_time": meta["loop_state"]["total_training_time"]}]

    proc = launch(tmp_path, "second", tiny_base_dir, [], *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s["start"] for s in read_log(tmp_path / "second.jsonl")[0]] == [12]  # last.ckpt won over nanochat
    assert_same_run(reference["final"], torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True))


class StartState(L.Callback):
    """What the run holds when training starts, right after the restore."""

    def on_train_start(self, trainer, pl_module) -> None:
        state = RunState.of(trainer)
        self.global_step = trainer.global_step
        self.smooth = state.smooth_train_loss
        self.min_val_bpb = state.min_val_bpb
        self.last_val_bpb = state.val_bpb
        self.total_training_time = state.total_training_time
        self.optimizer_states = copy.deepcopy([opt.state_dict() for opt in trainer.optimizers])  # updated in place
        self.weights = {k: v.clone() for k, v in pl_module.gpt.state_dict().items()}


def test_nanochat_meta_restores_step_optimizers_loop_state_and_data_rule(tiny_base_dir, tmp_path):
    """A true nanochat meta (only {pq_idx, rg_idx}): everything restored, data from nanochat's skip-ahead rule."""
    fit(tiny_base_dir, tmp_path / "first", 4, [StepCheckpoint(str(tmp_path / "ckpt"), save_every=4), EMALossLogger(),
                                               BPBValidation(eval_every=2), TokenThroughputMonitor(warmup_steps=1)])
    source, meta = nanochat_folder(tmp_path / "ckpt" / "last.ckpt", tmp_path / "d1", exact_position=False)
    saved = torch.load(source / "optim_000004_rank0.pt", weights_only=True)

    start = StartState()
    callbacks = [StepCheckpoint(str(tmp_path / "ckpt2"), save_every=4), EMALossLogger(), BPBValidation(eval_every=2),
                 TokenThroughputMonitor(warmup_steps=1), start]
    trainer, module, data = build(tiny_base_dir, tmp_path / "second", 6, callbacks)
    ckpt_path = resume_from_nanochat(trainer, source / "model_000004.pt", None)
    assert ckpt_path == str(source / "meta_000004.json")
    with pytest.warns(UserWarning, match="next row-group stride"):
        run(trainer, module, data, ckpt_path)

    loop = meta["loop_state"]
    assert start.global_step == 4 and module.global_step == 6
    assert (start.smooth, start.min_val_bpb, start.total_training_time) == (
        loop["smooth_train_loss"], loop["min_val_bpb"], loop["total_training_time"])
    assert start.total_training_time > 0 and start.last_val_bpb == meta["val_bpb"]
    assert same(start.optimizer_states, saved)
    assert same(start.weights, torch.load(source / "model_000004.pt", weights_only=True))
    # nanochat's rule (nanochat d575940 nanochat/dataloader.py) on one rank: start at the row group after the saved one
    # (the next shard's first
    # if there is none); 2 steps take far fewer tokens than a row group holds, so the run is still in it
    pq_idx, rg_idx = meta["dataloader_state_dict"]["pq_idx"], meta["dataloader_state_dict"]["rg_idx"]
    row_groups = pq.ParquetFile(list_parquet_files(tiny_base_dir / "base_data")[pq_idx]).num_row_groups
    expected = (pq_idx, rg_idx + 1) if rg_idx + 1 < row_groups else (pq_idx + 1, 0)
    position = data.state_dict()["train_loader"][0]
    assert (position["pq_idx"], position["rg_idx"]) == expected


def test_resume_errors(tiny_base_dir, tmp_path):
    fit(tiny_base_dir, tmp_path / "first", 2, [StepCheckpoint(str(tmp_path / "ckpt"), save_every=2), EMALossLogger(),
                                               BPBValidation(eval_every=2), TokenThroughputMonitor()])
    source, _ = nanochat_folder(tmp_path / "ckpt" / "last.ckpt", tmp_path / "d1")
    assert locate_nanochat_step(source) == (source, 2)
    trainer, _, _ = build(tiny_base_dir, tmp_path / "second", 4, [StepCheckpoint(str(tmp_path))])

    with pytest.raises(NanolitError, match="both name a starting point"):
        resume_from_nanochat(trainer, source, "some.ckpt")
    with pytest.raises(NanolitError, match="neither a nanochat checkpoint folder nor"):
        resume_from_nanochat(trainer, tmp_path / "nothing.txt", None)
    (tmp_path / "last.ckpt").touch()
    assert resume_from_nanochat(trainer, source, "last") == "last"  # a run's own last checkpoint wins
    torch.save([{}, {}], source / "optim_000002_rank1.pt")
    with pytest.raises(NanolitError, match="saved by several ranks"):
        resume_from_nanochat(trainer, source, None)
    (source / "optim_000002_rank1.pt").unlink()
    (source / "optim_000002_rank0.pt").unlink()
    with pytest.raises(NanolitError, match=r"optim_000002_rank0.pt is missing"):
        resume_from_nanochat(trainer, source, None)


def test_resume_refuses_a_model_of_another_shape(tiny_base_dir, tmp_path):
    fit(tiny_base_dir, tmp_path / "first", 2, [StepCheckpoint(str(tmp_path / "ckpt"), save_every=2), EMALossLogger(),
                                               BPBValidation(eval_every=2), TokenThroughputMonitor()])
    source, _ = nanochat_folder(tmp_path / "ckpt" / "last.ckpt", tmp_path / "d1")
    trainer, module, data = build(tiny_base_dir, tmp_path / "second", 4, [StepCheckpoint(str(tmp_path / "ckpt2"))],
                                  depth=2)
    with pytest.raises(NanolitError, match=r"does not match this run's \(n_layer 1 vs 2, n_embd 64 vs 128\)"):
        run(trainer, module, data, resume_from_nanochat(trainer, source, None))

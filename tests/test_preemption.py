"""Runs that survive faults: SIGTERM/SIGUSR1 save and exit, SLURM requeue, keep-last-k rotation,
the checkpoint written before CORE and sampling, and a NaN loss that stops the run and keeps the last good file."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import warnings

import lightning.pytorch as L
import pytest
import torch
from _train_script import SignalAt, callback, command, write_config
from test_cb_core import make_bundle

from nanolit.callbacks import (BPBValidation, COREEvaluation, EMALossLogger, PreemptionCheckpoint, Sampler,
                               StepCheckpoint, TokenThroughputMonitor)
from nanolit.common import NanolitError
from nanolit.data.datamodule import BaseDataModule
from nanolit.module import GPTModule

TINY = dict(device_batch_size=2, max_seq_len=16, total_batch_size=64)  # 2 micro-batches of 2 x 16 per step


def build(base_dir, root, steps: int, callbacks: list, depth: int = 1):
    """``(trainer, module, datamodule)`` for a d``depth`` GPT trained ``steps`` steps in this process (quiet)."""
    module = GPTModule(depth=depth, num_iterations=steps, compile=False, export=False, **TINY)
    data = BaseDataModule(str(base_dir), eval_tokens=64, tokenizer_threads=1, **TINY)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=root, callbacks=callbacks)
    return trainer, module, data


def run(trainer: L.Trainer, module: GPTModule, data: BaseDataModule, ckpt_path=None) -> GPTModule:
    threads = torch.get_num_threads()
    # One thread: on the shared 2-core machine two OpenMP threads contend and make this tiny model ~20x slower.
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*(val_dataloader|LeafSpec|callbacks used to create the checkpoint).*")
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    finally:
        torch.set_num_threads(threads)
    return module


def fit(base_dir, root, steps: int, callbacks: list, ckpt_path=None) -> GPTModule:
    """Train a d1 GPT for ``steps`` steps in this process with ``callbacks``; returns the module."""
    return run(*build(base_dir, root, steps, callbacks), ckpt_path=ckpt_path)


def step_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def saved_step(path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_signal_saves_at_step_end_stops_and_resumes_exactly(tiny_base_dir, tmp_path, signame):
    ckpt = tmp_path / "ckpt"
    full = fit(tiny_base_dir, tmp_path / "full", 8, [StepCheckpoint(str(tmp_path / "full_ckpt"), save_every=2)])

    before = signal.getsignal(signal.Signals[signame])
    bpb = BPBValidation(eval_every=100)  # step 0, then only the final evaluation
    callbacks = [StepCheckpoint(str(ckpt), save_every=2, keep_last=2), PreemptionCheckpoint(), bpb,
                 SignalAt(step=4, signal=signame)]
    with pytest.raises(SystemExit) as stopped:
        fit(tiny_base_dir, tmp_path / "run", 8, callbacks)
    assert stopped.value.code is None  # exit status 0, as Lightning's own SIGTERM stop
    # the signal came during step 4: step 4 finished and was saved, as 5, although 5 is no save_every step
    assert step_files(ckpt) == ["last.ckpt", "step=000004.ckpt", "step=000005.ckpt"]
    assert saved_step(ckpt / "last.ckpt") == 5
    assert [s for s, _ in bpb.run_state.val_bpb_history] == [0]  # stopped without the final evaluation
    assert signal.getsignal(signal.Signals[signame]) is before  # handlers restored

    resumed = fit(tiny_base_dir, tmp_path / "run", 8, [StepCheckpoint(str(ckpt), save_every=2, keep_last=2)],
                  ckpt_path=str(ckpt / "last.ckpt"))
    assert resumed.global_step == 8
    assert step_files(ckpt) == ["last.ckpt", "step=000006.ckpt", "step=000008.ckpt"]  # keep_last=2 rotation
    for name, weight in full.gpt.state_dict().items():
        assert torch.equal(weight, resumed.gpt.state_dict()[name]), name


class HandlerAtTrainStart(L.Callback):
    """Records the SIGUSR1 handler that is installed when training starts (before PreemptionCheckpoint's own)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.handler = signal.getsignal(signal.SIGUSR1)


def test_slurm_requeue_signal_saves_requeues_and_beats_lightning_handler(tiny_base_dir, tmp_path, monkeypatch):
    """Under SLURM, SIGUSR1 is Lightning's requeue signal: nanolit saves at the step end, then requeues the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "nanolit", "SLURM_JOB_ID": "4242",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    ckpt, lightning_handler = tmp_path / "ckpt", HandlerAtTrainStart()
    with pytest.raises(SystemExit):
        fit(tiny_base_dir, tmp_path / "run", 6, [StepCheckpoint(str(ckpt), save_every=4), lightning_handler,
                                                  PreemptionCheckpoint(), SignalAt(step=2, signal="SIGUSR1")])
    assert type(lightning_handler.handler).__name__ == "_HandlersCompose"  # Lightning's SLURM requeue handler
    assert saved_step(ckpt / "last.ckpt") == 3
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not list((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))  # Lightning's mid-step save never ran


def test_preemption_needs_a_step_checkpoint(tiny_base_dir, tmp_path):
    with pytest.raises(NanolitError, match="PreemptionCheckpoint saves through a StepCheckpoint"):
        fit(tiny_base_dir, tmp_path, 2, [PreemptionCheckpoint()])
    with pytest.raises(NanolitError, match="signals must be signal names"):
        PreemptionCheckpoint(signals=["SIGNOPE"])


@pytest.mark.slow  # one `nanolit fit` subprocess (~10 s)
def test_sigterm_stops_the_cli_run_with_a_checkpoint(tiny_base_dir, tmp_path):
    """The CLI's default callbacks include PreemptionCheckpoint: SIGTERM mid-run saves, exits 0, skips final evals."""
    config = write_config(tmp_path / "config.json", tiny_base_dir, tmp_path / "run", num_iterations=10,
                          save_every=4, callbacks=[callback("SignalAt", step=5, signal="SIGTERM")])
    proc = subprocess.run(command("fit", "-c", str(config)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    assert step_files(ckpt) == ["last.ckpt", "step=000004.ckpt", "step=000006.ckpt"]
    assert saved_step(ckpt / "last.ckpt") == 6
    assert "received SIGTERM" in proc.stderr + proc.stdout
    assert "Step 00010 | Validation bpb" not in proc.stdout  # no final evaluation after a preemption


def test_checkpoint_is_on_disk_before_core_and_sampling(tiny_base_dir, tmp_path):
    """nanochat users lost runs to an OOM in CORE (nanochat's issue tracker): at steps where they coincide, the save
    comes first."""
    ckpt = tmp_path / "ckpt"
    checkpoint = StepCheckpoint(str(ckpt), save_every=2)
    core = COREEvaluation(bundle_dir=str(make_bundle(tmp_path / "bundle")), core_metric_every=2)
    sampler = Sampler(sample_every=2, prompts=["the"], max_tokens=2)
    events = []

    def spy(name, fn):
        def wrapped(trainer, *args):
            step = trainer.global_step
            events.append((name, step, (ckpt / f"step={step:06d}.ckpt").exists()))
            return fn(trainer, *args)
        return wrapped

    checkpoint.save = spy("save", checkpoint.save)
    core.evaluate, sampler.evaluate = spy("core", core.evaluate), spy("sample", sampler.evaluate)
    # evaluations listed first: whatever the callback order, the save must still come first
    fit(tiny_base_dir, tmp_path / "run", 4, [core, sampler, checkpoint])
    assert [(name, step) for name, step, _ in events] == [
        ("save", 2), ("core", 2), ("sample", 2), ("save", 4), ("core", 4), ("sample", 4)]
    assert all(on_disk for name, _, on_disk in events if name != "save")


class PoisonAt(L.Callback):
    """Make the weights NaN at the start of step ``step``, so that step's loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.gpt.lm_head.weight.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_base_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    # step 3 goes bad; its end (global_step 4) is a save_every step, which must not be written
    with pytest.raises(NanolitError, match=r"training loss is nan at step 3; the run stopped and the last good"):
        fit(tiny_base_dir, tmp_path / "run", 8, [StepCheckpoint(str(ckpt), save_every=2), PoisonAt(3),
                                                  EMALossLogger(), TokenThroughputMonitor()])
    assert step_files(ckpt) == ["last.ckpt", "step=000002.ckpt"]
    last = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(w).all() for w in last["state_dict"].values())

"""No run is ever lost: one run per checkpoint folder (a lock, stale once its process dies), a full disk stops the
run cleanly with the last checkpoint intact, a retrained tokenizer needs --force, and relaunching a finished run
changes nothing."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from _train_script import callback, command, write_config
from conftest import checkpoint_names

from nanolit.cli import main


def config(tmp_path, base, name, callbacks=(), steps=6):
    return write_config(tmp_path / f"{name}.json", base, tmp_path / "run", steps, 2, callbacks=list(callbacks))


def last_step(folder) -> int:
    return torch.load(folder / "last.ckpt", weights_only=True, mmap=True)["global_step"]


@pytest.mark.slow  # two `nanolit fit` processes (~15 s)
def test_a_second_run_into_the_same_folder_is_refused_and_a_killed_runs_lock_is_stale(tiny_base_dir, tmp_path):
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen(command("fit", "-c", str(config(tmp_path, tiny_base_dir, "a", [
        callback("PauseAt", step=3, ready=str(ready), go=str(go))]))), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.1)
        # the first run holds its folder (it saved step 2 and is paused at step 3)
        second = subprocess.run(command("fit", "-c", str(config(tmp_path, tiny_base_dir, "b")), "--ckpt_path",
                                        "last"), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        error = [line for line in second.stderr.splitlines() if line.startswith("nanolit: error:")]
        assert len(error) == 1 and f"pid {first.pid}" in error[0] and "another run" in error[0], error
        assert last_step(tmp_path / "run" / "checkpoints") == 2  # untouched by the refused run
        first.kill()  # SIGKILL: no cleanup, the lock file stays behind with its owner
        first.wait()
    finally:
        first.kill()
    assert (tmp_path / "run" / "checkpoints" / ".lock.owner").exists()
    # the OS released the dead run's lock: a relaunch resumes, and finishes the run
    third = subprocess.run(command("fit", "-c", str(config(tmp_path, tiny_base_dir, "c")), "--ckpt_path", "last"),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    folder = tmp_path / "run" / "checkpoints"
    assert last_step(folder) == 6 and checkpoint_names(folder)[-1] == "step=000006.ckpt"
    assert not (folder / ".lock.owner").exists()  # released at the end of the run


def test_a_full_disk_stops_the_run_with_the_last_checkpoint_intact(tiny_base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nanolit"])
    folder = tmp_path / "run" / "checkpoints"
    path = config(tmp_path, tiny_base_dir, "a", [callback("DiskFullAt", step=4)])
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "-c", str(path)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err, err[-3000:]
    (error,) = [line for line in err.splitlines() if line.startswith("nanolit: error:")]
    assert "no space left" in error and "bytes" in error and str(folder) in error and "--ckpt_path last" in error
    assert checkpoint_names(folder) == ["last.ckpt", "step=000002.ckpt"]  # the partial step 4 was removed
    assert last_step(folder) == 2
    torch.load(folder / "last.ckpt", weights_only=True)  # whole and readable


def test_tokenizer_train_replaces_a_tokenizer_only_with_force(tiny_base_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    before = (base / "tokenizer" / "tokenizer.pkl").read_bytes()
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--base_dir", str(base), "--vocab_size", "300"])
    assert (base / "tokenizer" / "tokenizer.pkl").read_bytes() == before
    main(["tokenizer", "train", "--base_dir", str(base), "--vocab_size", "300", "--force"])
    from nanolit.tokenizer import Tokenizer

    assert Tokenizer.from_directory(base / "tokenizer").get_vocab_size() == 300


def test_relaunching_a_finished_run_changes_nothing(tiny_base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["nanolit"])
    path = config(tmp_path, tiny_base_dir, "a", steps=2)
    main(["fit", "-c", str(path)])
    logs = tmp_path / "run" / "logs"
    report = next(logs.glob("version_*/report.md"))
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    main(["fit", "-c", str(path), "--ckpt_path", "last"])
    out = capsys.readouterr().out
    assert "already finished" in out and "Report written" not in out
    assert report.exists() and len(list(logs.glob("version_*/report.md"))) == 1
    for p, (data, mtime) in files.items():
        assert (p.read_bytes(), p.stat().st_mtime_ns) == (data, mtime), p

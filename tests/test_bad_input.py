"""Every bad input a user can give the `nanolit` command: exit status 2, one line naming the problem and the fix, no
traceback, and nothing on disk changed (no file written, none modified or removed).

Each case runs the real command entry point (``nanolit.cli.main``, what the console script calls); two of them also
run as a separate ``python -m nanolit`` process, to see what a terminal shows.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanolit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.depth=1", "--model.max_seq_len=16", "--model.device_batch_size=2", "--model.total_batch_size=64",
        "--data.eval_tokens=64", "--data.tokenizer_threads=1", "--trainer.enable_progress_bar=false",
        "--core.core_metric_every=-1", "--sample.sample_every=-1", "--bpb.eval_every=-1", "--model.compile=false"]


# ---------------------------------------------------------------------------------------------- workspaces
class Workspace:
    """A base dir with the tiny shards and tokenizer, a run root, and what each case adds."""

    def __init__(self, root: Path, tiny_base_dir: Path) -> None:
        self.root = root
        self.base = root / "base"
        shutil.copytree(tiny_base_dir, self.base)
        self.run = root / "run"

    def fit(self, *extra: str, config: str = "configs/quickstart.yaml") -> list[str]:
        return ["fit", "-c", str(ROOT / config), f"--data.base_dir={self.base}",
                f"--trainer.default_root_dir={self.run}", *TINY, *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_run(ws: Workspace) -> None:
    """A finished 2-step run in ``ws.run``, its export in the base dir."""
    main(ws.fit("--model.num_iterations=2", "--checkpoint.save_every=1"))


def write_shards(base: Path, texts: list, binary: bool = False) -> None:
    """Replace the base dir's shards by two (train, val) holding ``texts``."""
    shutil.rmtree(base / "base_data")
    (base / "base_data").mkdir()
    column = pa.array(texts, type=pa.binary() if binary else pa.string())
    for i in range(2):
        pq.write_table(pa.table({"text": column}), base / "base_data" / f"shard_{i:05d}.parquet")


class Evil:
    """Unpickling this runs a command: the safe loaders must refuse it."""

    def __reduce__(self):
        return (print, ("owned",))


def mid_config(ws: Workspace) -> list[str]:
    return ["fit", "-c", str(ROOT / "configs/mid.yaml"), f"--data.base_dir={ws.base}",
            f"--trainer.default_root_dir={ws.run}", "--model.max_seq_len=16", "--model.device_batch_size=2",
            "--model.total_batch_size=64", "--data.eval_tokens=64", "--trainer.enable_progress_bar=false"]


# ------------------------------------------------------------------------------------------------- cases
# (id, prepare(ws) -> argv, words the one line must contain)
CASES: list[tuple[str, Callable[[Workspace], list[str]], tuple[str, ...]]] = [
    ("device_batch_size=0", lambda ws: ws.fit("--model.device_batch_size=0"),
     ("device_batch_size", "positive")),
    ("device_batch_size=-1", lambda ws: ws.fit("--model.device_batch_size=-1"),
     ("device_batch_size", "positive")),
    ("max_seq_len=0", lambda ws: ws.fit("--model.max_seq_len=0"), ("max_seq_len", "positive")),
    ("num_iterations=0", lambda ws: ws.fit("--model.num_iterations=0"), ("num_iterations=0", "-1")),
    ("batch not divisible", lambda ws: ws.fit("--model.total_batch_size=100"), ("total_batch_size", "multiple")),
    ("depth=0", lambda ws: ws.fit("--model.depth=0"), ("depth",)),
    ("depth with indivisible heads", lambda ws: ws.fit("--model.depth=5"), ("depth 5", "divisible")),
    ("negative loss_chunk_size", lambda ws: ws.fit("--model.loss_chunk_size=-3"), ("loss_chunk_size",)),
    ("eval_every=0", lambda ws: ws.fit("--bpb.eval_every=0"), ("eval_every", "-1")),
    ("save_every=0", lambda ws: ws.fit("--checkpoint.save_every=0"), ("save_every",)),
    ("eval_tokens=0", lambda ws: ws.fit("--data.eval_tokens=0"), ("eval_tokens",)),
    ("unknown knob", lambda ws: ws.fit("--model.dept=3"), ("dept",)),
    ("wrong type", lambda ws: ws.fit("--model.depth=four"), ("depth",)),
    ("missing config", lambda ws: ["fit", "-c", str(ws.root / "nope.yaml")], ("nope.yaml",)),
    ("malformed config", lambda ws: (ws.root.joinpath("bad.yaml").write_text("model: [unclosed\n"),
                                     ["fit", "-c", str(ws.root / "bad.yaml")])[1], ("bad.yaml",)),
    ("missing base dir", lambda ws: ws.fit(f"--data.base_dir={ws.root / 'typo'}"), ("typo", "does not exist")),
    ("no shards", lambda ws: (shutil.rmtree(ws.base / "base_data"), ws.fit())[1], ("shards", "nanolit data")),
    ("no tokenizer", lambda ws: (shutil.rmtree(ws.base / "tokenizer"), ws.fit())[1], ("tokenizer", "train")),
    ("binary text column", lambda ws: (write_shards(ws.base, [b"\x00\x01"] * 8, binary=True), ws.fit())[1],
     ("text", "string")),
    ("only empty documents", lambda ws: (write_shards(ws.base, [""] * 50), ws.fit())[1], ("no text",)),
    ("malicious tokenizer.pkl", lambda ws: (ws.base.joinpath("tokenizer", "tokenizer.pkl").write_bytes(
        pickle.dumps(Evil())), ws.fit())[1], ("tokenizer.pkl",)),
    ("malicious token_bytes.pt", lambda ws: (torch.save(Evil(), ws.base / "tokenizer" / "token_bytes.pt"),
                                             ws.fit())[1], ("token_bytes.pt",)),
    ("ckpt_path not a checkpoint", lambda ws: (ws.root.joinpath("x.ckpt").write_text("hello"),
                                               ws.fit("--ckpt_path", str(ws.root / "x.ckpt")))[1],
     ("x.ckpt", "checkpoint")),
    ("ckpt_path malicious pickle", lambda ws: (torch.save({"state_dict": Evil()}, ws.root / "evil.ckpt"),
                                               ws.fit("--ckpt_path", str(ws.root / "evil.ckpt")))[1],
     ("evil.ckpt",)),
    ("ckpt_path missing", lambda ws: ws.fit("--ckpt_path", str(ws.root / "gone.ckpt")), ("gone.ckpt",)),
    ("resume with another depth", lambda ws: (finished_run(ws), ws.fit("--model.num_iterations=4", "--model.depth=2",
                                                                       "--ckpt_path", "last"))[1],
     ("last.ckpt", "depth")),
    ("resume with another tokenizer", lambda ws: (
        finished_run(ws), _swap_tokenizer(ws), ws.fit("--model.num_iterations=4", "--ckpt_path", "last"))[2],
     ("vocab",)),
    ("new run over another run's checkpoints", lambda ws: (finished_run(ws), ws.fit("--model.num_iterations=3"))[1],
     ("--ckpt_path last", "--checkpoint.overwrite")),
    ("truncated last.ckpt", lambda ws: (finished_run(ws), _truncate(ws.run / "checkpoints" / "last.ckpt"),
                                        ws.fit("--model.num_iterations=2", "--ckpt_path", "last"))[2],
     ("last.ckpt", "step=000002.ckpt")),
    ("export over another run's export", lambda ws: (
        finished_run(ws), ws.fit("--model.num_iterations=2", "--trainer.default_root_dir", str(ws.root / "run2")))[1],
     ("base_checkpoints", "--model.model_tag")),
    ("resume_from_nanochat missing", lambda ws: ws.fit("--resume_from_nanochat", str(ws.root / "nc")), ("nc",)),
    ("mid-training without its data", lambda ws: (finished_run(ws), mid_config(ws))[1],
     ("mid-training data", "download")),
    ("tokenizer train over a tokenizer", lambda ws: ["tokenizer", "train", "--base_dir", str(ws.base),
                                                     "--vocab_size", "300"], ("--force",)),
    ("from-text non-UTF-8", lambda ws: (ws.root.joinpath("bad.txt").write_bytes(b"caf\xe9 au lait\n"),
                                        ["data", "from-text", str(ws.root / "bad.txt"), "--out",
                                         str(ws.root / "out")])[1], ("bad.txt", "UTF-8")),
    ("from-text missing file", lambda ws: ["data", "from-text", str(ws.root / "none.txt"), "--out",
                                           str(ws.root / "out")], ("none.txt",)),
    ("eval core max_per_task 0", lambda ws: ["eval", "core", "--checkpoint", str(ws.root), "--max_per_task", "0"],
     ("max_per_task", "-1")),
    ("eval core missing bundle", lambda ws: (finished_run(ws), ["eval", "core", "--checkpoint",
                                                                str(ws.run / "checkpoints" / "last.ckpt"),
                                                                "--bundle", str(ws.root / "nobundle")])[1],
     ("nanolit eval download-core",)),
    ("eval core missing task file", lambda ws: (finished_run(ws), _bundle_missing_task(ws), [
        "eval", "core", "--checkpoint", str(ws.run / "checkpoints" / "last.ckpt"), "--bundle",
        str(ws.root / "bundle")])[2], ("--skip_missing",)),
    ("eval core bad jsonl", lambda ws: (finished_run(ws), _bundle_bad_line(ws), [
        "eval", "core", "--checkpoint", str(ws.run / "checkpoints" / "last.ckpt"), "--bundle",
        str(ws.root / "bundle")])[2], ("line",)),
    ("eval core unknown task", lambda ws: (finished_run(ws), _bundle_bad_line(ws), [
        "eval", "core", "--checkpoint", str(ws.run / "checkpoints" / "last.ckpt"), "--bundle", str(ws.root / "bundle"),
        "--tasks", "no_such_task"])[2], ("no_such_task",)),
    ("eval core missing checkpoint", lambda ws: ["eval", "core", "--checkpoint", str(ws.root / "nothing")],
     ("nothing",)),
]


def _swap_tokenizer(ws: Workspace) -> None:
    """A 270-token tokenizer in place of the run's 4096-token one."""
    from nanolit.tokenizer import Tokenizer

    shutil.rmtree(ws.base / "tokenizer")
    Tokenizer.train_from_iterator(iter(["hello world, the quick brown fox"] * 10), 270).save(ws.base / "tokenizer")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # a separate file: last.ckpt is a hard link to the newest step file
    path.write_bytes(data[: len(data) // 2])


def _bundle(ws: Workspace, rows: str) -> Path:
    bundle = ws.root / "bundle"
    (bundle / "eval_data" / "language_modeling").mkdir(parents=True)
    (bundle / "core.yaml").write_text(
        "icl_tasks:\n- label: lambada_openai\n  dataset_uri: language_modeling/lambada_openai.jsonl\n"
        "  num_fewshot: [0]\n  icl_task_type: language_modeling\n")
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nlambada_openai,0.0\n")
    if rows is not None:
        (bundle / "eval_data" / "language_modeling" / "lambada_openai.jsonl").write_text(rows)
    return bundle


def _bundle_missing_task(ws: Workspace) -> None:
    _bundle(ws, None)


def _bundle_bad_line(ws: Workspace) -> None:
    _bundle(ws, '{"context": "a b", "continuation": " c"}\n{not json\n')


IDS = [case[0] for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_gets_one_line_and_changes_nothing(case, tiny_base_dir, tmp_path, capsys, monkeypatch):
    name, prepare, words = case
    monkeypatch.chdir(tmp_path)  # anything written to a relative path would land here, and be seen
    monkeypatch.setattr(sys, "argv", ["nanolit"])  # LightningCLI warns when pytest's own argv is there too
    # Lightning's and torch's log handlers hold the stderr of the test that imported them; point them at this one's
    for logger in [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                monkeypatch.setattr(handler, "stream", sys.stderr)
    ws = Workspace(tmp_path / "ws", tiny_base_dir)
    argv = prepare(ws)
    capsys.readouterr()
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (out + err)[-3000:]
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith(("nanolit: error:", "error:"))] or \
        [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert snapshot(tmp_path) == before, name


@pytest.mark.slow  # two separate processes (~10 s)
@pytest.mark.parametrize("case", ["num_iterations=0", "ckpt_path malicious pickle"])
def test_a_terminal_sees_one_line(case, tiny_base_dir, tmp_path):
    name, prepare, words = next(c for c in CASES if c[0] == case)
    ws = Workspace(tmp_path / "ws", tiny_base_dir)
    argv = prepare(ws)
    proc = subprocess.run([sys.executable, "-m", "nanolit", *argv], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nanolit: error:")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), proc.stderr[-3000:]
    assert "owned" not in proc.stdout  # the pickle's payload never ran

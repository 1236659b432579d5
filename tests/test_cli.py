"""The `nanolit` command end to end: fit with the shipped config, tools, and one-line errors for bad input."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import checkpoint_names
import torch

from nanolit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.depth=2", "--model.max_seq_len=32", "--model.device_batch_size=2", "--model.total_batch_size=128",
        "--data.eval_tokens=256", "--data.tokenizer_threads=1", "--model.compile=false"]  # eager: seconds saved a run


def fit(base, root, *extra):
    main(["fit", "-c", str(ROOT / "configs/quickstart.yaml"), f"--data.base_dir={base}",
          f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", *TINY, *extra])


def metrics(root):
    files = sorted(Path(root).glob("logs/version_*/metrics.csv"))
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_run(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    fit(tiny_base_dir, root, "--model.num_iterations=4", "--bpb.eval_every=2", "--sample.sample_every=2",
        "--checkpoint.save_every=2", "--model.model_tag=cli_test")
    return root


def test_fit_writes_everything(quick_run, tiny_base_dir):
    assert checkpoint_names(quick_run / "checkpoints") == \
        ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
    rows = metrics(quick_run)
    bpb = [float(r["val/bpb"]) for r in rows if r.get("val/bpb")]
    assert len(bpb) == 3  # steps 0, 2 and the final step 4
    assert any(r.get("train/loss") for r in rows) and any(r.get("lr-AdamW/wte") for r in rows)
    export = tiny_base_dir / "base_checkpoints" / "cli_test"
    meta = json.loads((export / "meta_000004.json").read_text())
    assert meta["step"] == 4 and meta["model_config"]["n_layer"] == 2
    assert set(meta) >= {"val_bpb", "user_config", "dataloader_state_dict", "loop_state", "device_batch_size"}
    assert meta["val_bpb"] == pytest.approx(bpb[-1], rel=1e-5)
    assert (export / "optim_000004_rank0.pt").exists()
    assert (next(quick_run.glob("logs/version_*")) / "report.md").exists()


def test_export_loads_with_nanochat_layout_and_evaluates(quick_run, tiny_base_dir, tmp_path, eval_bundle):
    out = tmp_path / "core.csv"
    main(["eval", "core", "--checkpoint", str(tiny_base_dir / "base_checkpoints" / "cli_test"),
          "--bundle", str(eval_bundle), "--tasks", "copa,winograd", "--max_per_task", "4", "--output", str(out)])
    rows = list(csv.reader(out.read_text().splitlines()))
    assert [r[0].strip() for r in rows] == ["Task", "copa", "winograd", "CORE"]
    # the Lightning checkpoint works for the same command
    main(["eval", "core", "--checkpoint", str(quick_run / "checkpoints" / "last.ckpt"), "--bundle", str(eval_bundle),
          "--tasks", "copa", "--max_per_task", "4", "--output", str(tmp_path / "core2.csv"),
          "--tokenizer", str(tiny_base_dir / "tokenizer")])
    assert (tmp_path / "core2.csv").exists()


def test_resume_from_last_continues_the_step_count(quick_run, tiny_base_dir, tmp_path):
    ckpt = torch.load(quick_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    root = tmp_path / "resumed"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes((quick_run / "checkpoints" / "last.ckpt").read_bytes())
    fit(tiny_base_dir, root, "--model.num_iterations=6", "--bpb.eval_every=-1", "--sample.sample_every=-1",
        "--model.export=false", "--ckpt_path=last")
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert not any(r.get("val/bpb") for r in metrics(root))  # -1 really disables, even the final eval


def test_chunked_loss_head_gives_the_same_run_start(quick_run, tiny_base_dir, tmp_path):
    """--model.loss_chunk_size reaches training and the BPB evaluation: step 0 matches the one-shot run."""
    fit(tiny_base_dir, tmp_path, "--model.num_iterations=2", "--bpb.eval_every=2", "--sample.sample_every=-1",
        "--model.export=false", "--model.loss_chunk_size=24")  # 64 rows per micro-batch: chunks of 24, 24, 16
    ours, ref = metrics(tmp_path), metrics(quick_run)
    for key in ("val/bpb", "train/loss"):
        first = [float(r[key]) for r in ours if r.get(key)][0]
        assert first == pytest.approx([float(r[key]) for r in ref if r.get(key)][0], rel=1e-5), key


def test_print_config_links_shared_knobs(tiny_base_dir, capsys):
    with pytest.raises(SystemExit) as e:
        fit(tiny_base_dir, "/tmp/unused", "--print_config")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "device_batch_size: 2" in out and "total_batch_size: 128" in out and "max_seq_len: 32" in out


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "nanolit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in err[-1] or needle in proc.stderr, proc.stderr[-2000:]


def test_impossible_batch_math(tiny_base_dir, tmp_path):
    proc = run_cli("fit", "-c", "configs/quickstart.yaml", f"--data.base_dir={tiny_base_dir}",
                   f"--trainer.default_root_dir={tmp_path}", "--model.total_batch_size=1000")
    assert_one_line_error(proc, "nanolit: error: total_batch_size=1000", "use total_batch_size=")


def test_unknown_knob(tiny_base_dir, tmp_path):
    proc = run_cli("fit", "-c", "configs/quickstart.yaml", f"--data.base_dir={tiny_base_dir}",
                   f"--trainer.default_root_dir={tmp_path}", "--model.learning_rate=3")
    assert proc.returncode != 0 and "learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_shards_and_missing_base_dir(tmp_path, nanochat_d2):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("fit", "-c", "configs/quickstart.yaml", f"--data.base_dir={empty}",
                   f"--trainer.default_root_dir={tmp_path}")
    assert_one_line_error(proc, "no parquet shards")
    proc = run_cli("--base_dir", str(tmp_path / "nope"), "tokenizer", "eval")
    assert_one_line_error(proc, "does not exist")


def test_vocab_mismatch_between_checkpoint_and_tokenizer(nanochat_d2, tmp_path, eval_bundle):
    from nanolit.tokenizer import Tokenizer
    Tokenizer.train_from_iterator(iter(fixture_texts(nanochat_d2)[:50]), 300).save(tmp_path / "tok")
    with pytest.raises(SystemExit) as e:
        main(["eval", "core", "--checkpoint", str(nanochat_d2), "--bundle", str(eval_bundle),
              "--tokenizer", str(tmp_path / "tok"), "--tasks", "copa"])
    assert e.value.code == 2


def fixture_texts(folder):
    import pyarrow.parquet as pq
    return pq.read_table(folder / "base_data" / "shard_00004.parquet").column("text").to_pylist()


def test_tools_build_shards_and_tokenizer(tmp_path, nanochat_d2):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(fixture_texts(nanochat_d2)[:30]):
        (docs / f"{i}.txt").write_text(text)
    base = tmp_path / "base"
    base.mkdir()
    main(["--base_dir", str(base), "data", "from-text", str(docs)])
    assert len(list((base / "base_data").glob("*.parquet"))) >= 2
    main(["tokenizer", "train", "--base_dir", str(base), "--vocab_size", "300"])
    assert (base / "tokenizer" / "tokenizer.pkl").exists() and (base / "tokenizer" / "token_bytes.pt").exists()
    main(["tokenizer", "eval", "--base_dir", str(base)])


def test_root_cli_script_is_the_same_command():
    proc = subprocess.run([sys.executable, "cli.py", "fit", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0 and "--model" in proc.stdout and "--bpb.eval_every" in proc.stdout

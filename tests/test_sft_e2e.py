"""The road from nothing to a chat model through the real ``nanolit`` command, at tiny sizes on the CPU:
``nanolit fit`` with configs/quickstart.yaml (base), configs/mid.yaml, configs/sft.yaml, then ``nanolit eval chat`` and
``nanolit chat -p`` on the SFT export, on task files in the datasets' real schemas."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import _jsonl, write_task_data, write_word_shards

from nanolit.checkpoint import checkpoint_phase, load_lightning_checkpoint, load_model
from nanolit.cli import main
from nanolit.data.tasks import task_folder
from nanolit.eval.chat import evaluate_chat

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false"]
BATCH = ["--model.max_seq_len=32", "--model.device_batch_size=2", "--model.total_batch_size=64",
         "--model.loss_chunk_size=0", "--data.eval_tokens=64"]


def metrics(root: Path) -> list[dict]:
    with open(next(root.glob("logs/version_*/metrics.csv"))) as f:
        return list(csv.DictReader(f))


def last_logged(root: Path, key: str) -> tuple[int, float]:
    step, value = [(int(r["step"]), float(r[key])) for r in metrics(root) if r.get(key)][-1]
    return step, value


@pytest.fixture(scope="module")
def road(tmp_path_factory, byte_tokenizer) -> dict:
    """base (3 steps) -> mid (2 steps) -> SFT (2 steps), each through `nanolit fit`, in one base dir."""
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "datasets", None)  # every task file is local: never reach for the hub
    tmp = tmp_path_factory.mktemp("road")
    base = write_task_data(tmp / "base")
    byte_tokenizer.save(base / "tokenizer")
    write_word_shards(base, num_docs=200, max_words=30, chars_per_shard=4000, seed=0)
    _jsonl(task_folder(base, "mmlu-auxiliary_train") / "train.jsonl",  # cais/mmlu wraps these rows in "train"
           [{"train": {"question": f"Aux {i}?", "subject": "misc", "choices": ["a", "b", "c", "d"], "answer": i % 4}}
            for i in range(4)])
    runs = {name: tmp / name for name in ("base_run", "mid_run", "sft_run")}
    try:
        main(["fit", "-c", str(ROOT / "configs/quickstart.yaml"), f"--data.base_dir={base}",
              f"--trainer.default_root_dir={runs['base_run']}", "--model.depth=1", "--model.num_iterations=3",
              "--bpb.eval_every=-1", "--sample.sample_every=-1", "--checkpoint.save_every=-1",
              "--data.tokenizer_threads=1", *BATCH, *CPU])
        main(["fit", "-c", str(ROOT / "configs/mid.yaml"), f"--data.base_dir={base}",
              f"--trainer.default_root_dir={runs['mid_run']}", "--data.num_iterations=3", "--bpb.eval_every=-1",
              *BATCH, *CPU])
        main(["fit", "-c", str(ROOT / "configs/sft.yaml"), f"--data.base_dir={base}",
              f"--trainer.default_root_dir={runs['sft_run']}", "--model.num_iterations=3",
              "--model.device_batch_size=2", "--model.target_examples_per_step=4", "--model.max_seq_len=128",
              "--data.eval_steps=2", "--val_loss.eval_every=1", "--chat_eval.eval_metrics_every=1",
              "--chat_eval.eval_metrics_max_problems=3", *CPU])
        yield {"base": base, **runs}
    finally:
        mp.undo()


def test_each_stage_starts_from_the_last_and_sft_exports_in_nanochats_layout(road):
    base = road["base"]
    assert sorted(p.name for p in (base / "base_checkpoints" / "d1").glob("model_*")) == ["model_000003.pt"]
    assert sorted(p.name for p in (base / "mid_checkpoints" / "d1").glob("model_*")) == ["model_000002.pt"]
    sft = base / "chatsft_checkpoints" / "d1"
    # chat_sft's files: the model and its meta at step num_iterations - 1, no optimizer
    assert sorted(p.name for p in sft.iterdir()) == ["meta_000002.json", "model_000002.pt"]
    meta = json.loads((sft / "meta_000002.json").read_text())
    assert set(meta) == {"step", "val_loss", "mmlu_acc", "arc_easy_acc", "model_config", "user_config", "nanolit_run"}
    assert meta["step"] == 2 and meta["user_config"]["source"] == "mid" and meta["user_config"]["init_lr_frac"] == 0.02
    # the final evaluations are the ones the meta holds, and both were logged at the final step
    assert last_logged(road["sft_run"], "val/loss") == (2, pytest.approx(meta["val_loss"], rel=1e-6))
    assert last_logged(road["sft_run"], "chat/MMLU") == (2, meta["mmlu_acc"])
    assert [int(r["step"]) for r in metrics(road["sft_run"]) if r.get("chat/ARC-Easy")] == [1, 2]
    # nanochat's chat_cli loads it as load_model("sft") does; its weights are the run's last checkpoint's
    model, tokenizer, loaded_meta = load_model("sft", base)
    ckpt_model, ckpt = load_lightning_checkpoint(road["sft_run"] / "checkpoints" / "last.ckpt")
    assert loaded_meta["step"] == ckpt["global_step"] == 2
    assert all(torch.equal(v, ckpt_model.state_dict()[k]) for k, v in model.state_dict().items())
    assert checkpoint_phase(ckpt["hyper_parameters"]) == "chat"  # `nanolit chat` takes the .ckpt too
    mid = load_model("mid", base)[0]
    assert not all(torch.equal(v, mid.state_dict()[k]) for k, v in model.state_dict().items())  # it trained


def test_eval_chat_and_chat_on_the_sft_export(road, capsys):
    base, sft = road["base"], road["base"] / "chatsft_checkpoints" / "d1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "datasets", None)
        main(["eval", "chat", "--checkpoint", str(sft), "-a", "ARC-Easy|GSM8K", "-x", "2", "-m", "8"])
        model, tokenizer, _ = load_model("sft", base)
        direct = evaluate_chat(model, tokenizer, tasks="ARC-Easy|GSM8K", base_dir=base, max_problems=2,
                               max_new_tokens=8)
    want = [f"{name} accuracy: {100 * acc:.2f}% ({direct['counts'][name][0]}/2)" for name, acc in
            direct["results"].items()]
    assert capsys.readouterr().out.splitlines() == want
    replies = []
    for checkpoint in (sft, road["sft_run"] / "checkpoints" / "last.ckpt"):
        main(["chat", "--checkpoint", str(checkpoint), "-p", "Who are you?", "--max_tokens", "8", "-t", "0"])
        captured = capsys.readouterr()
        assert captured.err == ""
        replies.append(captured.out)
    assert replies[0] == replies[1] and replies[0].strip()  # the same model either way, and it answers

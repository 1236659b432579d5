"""ChatEvaluation: chat_sft's in-training chat metrics on a toy (automatic optimization, gradient accumulation), equal
to a direct ``evaluate_chat``; missing task data turns it off with one warning; its protocol is checked at setup."""
from __future__ import annotations

import csv
import sys
import warnings

import lightning.pytorch as L
import pytest
import torch
from conftest import write_task_data
from test_cb_toys import make_trainer
from torch.utils.data import DataLoader

from nanolit.callbacks import ChatEvaluation, ReportWriter
from nanolit.callbacks import chat_eval as chat_eval_module
from nanolit.common import NanolitError
from nanolit.eval.chat import evaluate_chat
from nanolit.model import GPTConfig, build_gpt

TASKS = "MMLU|ARC-Easy|GSM8K"  # both kinds: categorical (one forward) and generative (sampled with the engine)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # a missing task file must fail, never reach for the hub


@pytest.fixture(scope="module")
def task_base(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("chat_tasks"))


class ChatToy(L.LightningModule):
    """A d1 GPT trained by Lightning's automatic optimization on fixed random tokens. Its lm_head is random (nanochat's
    init zeroes it, which would make every answer the first letter), so the answers change as it trains."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.gpt = build_gpt(GPTConfig.from_depth(1, vocab_size, 64), seed=0)
        with torch.no_grad():
            self.gpt.lm_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))

    @property
    def eval_model(self):
        return self.gpt

    def training_step(self, batch, batch_idx):
        return self.gpt(batch[:, :-1], batch[:, 1:])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class ChatToyData(L.LightningDataModule):
    def __init__(self, tokenizer, base_dir):
        super().__init__()
        self.tokenizer, self.base_dir = tokenizer, str(base_dir)
        generator = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, 256, (2, 17), generator=generator) for _ in range(4)]

    def train_dataloader(self):
        return DataLoader(self.batches * 100, batch_size=None)


def test_every_n_optimizer_steps_under_accumulation_and_equal_to_evaluate_chat(task_base, byte_tokenizer, tmp_path,
                                                                                monkeypatch, capsys):
    calls = []

    def counting(model, *args, **kwargs):
        calls.append(trainer.global_step)
        return evaluate_chat(model, *args, **kwargs)

    monkeypatch.setattr(chat_eval_module, "evaluate_chat", counting)
    module = ChatToy(byte_tokenizer.get_vocab_size())
    data = ChatToyData(byte_tokenizer, task_base)
    chat = ChatEvaluation(eval_metrics_every=2, eval_metrics_max_problems=2, tasks=TASKS, max_new_tokens=8)
    trainer = make_trainer(tmp_path, [chat, ReportWriter()], max_steps=5, accumulate_grad_batches=3)
    trainer.fit(module, datamodule=data)
    # 15 batches, 5 optimizer steps: at the start of steps 2 and 4 (once, not once per micro-batch) and at the end
    assert trainer.global_step == 5 and calls == [2, 4, 5]
    direct = evaluate_chat(module.gpt, byte_tokenizer, tasks=TASKS, base_dir=task_base, max_problems=2,
                           max_new_tokens=8)
    state = chat.run_state.chat
    assert state["step"] == 5 and state["results"] == direct["results"]
    assert state["counts"] == {name: list(count) for name, count in direct["counts"].items()}
    assert state["chatcore"] is None  # three of the six tasks: no ChatCORE
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("chat/ARC-Easy")]
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    assert float(rows[-1]["chat/GSM8K"]) == direct["results"]["GSM8K"]
    out = capsys.readouterr().out
    line = ", ".join(f"{key}: {direct['results'][name]:.6f}"
                     for key, name in (("mmlu_acc", "MMLU"), ("arc_easy_acc", "ARC-Easy"), ("gsm8k_acc", "GSM8K")))
    assert f"Step 00005 | {line}" in out.splitlines()
    report = (tmp_path / "run" / "version_0" / "report.md").read_text()
    assert "## Chat evaluation (step 00005)" in report and "ChatCORE" not in report
    passed, total = direct["counts"]["GSM8K"]
    assert f"| GSM8K | {direct['results']['GSM8K']:.4f} | {passed} / {total} |" in report


def test_missing_task_data_switches_it_off_with_one_warning(byte_tokenizer, tmp_path):
    base = write_task_data(tmp_path / "tasks")
    (base / "mid_data" / "mmlu" / "all" / "test.jsonl").unlink()
    chat = ChatEvaluation(eval_metrics_every=1, eval_metrics_max_problems=2)
    trainer = make_trainer(tmp_path, [chat], max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ChatToy(byte_tokenizer.get_vocab_size()), datamodule=ChatToyData(byte_tokenizer, base))
    off = [str(w.message) for w in caught if "chat evaluation is OFF" in str(w.message)]
    assert len(off) == 1 and "mmlu" in off[0].lower()
    assert trainer.global_step == 3 and chat.run_state.chat is None and not chat.enabled


class NoEvalModel(L.LightningModule):
    """Trains, but offers no ``eval_model`` to evaluate."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(256, 1)

    def training_step(self, batch, batch_idx):
        return self.embedding(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_protocol_and_knobs_are_checked(byte_tokenizer, task_base, tmp_path):
    trainer = make_trainer(tmp_path, [ChatEvaluation(eval_metrics_every=1)], max_steps=1)
    with pytest.raises(NanolitError, match="ChatEvaluation needs NoEvalModel to have eval_model"):
        trainer.fit(NoEvalModel(), datamodule=ChatToyData(byte_tokenizer, task_base))
    with pytest.raises(NanolitError, match="unknown chat task 'MMLU-Pro'"):
        ChatEvaluation(tasks="MMLU-Pro")
    with pytest.raises(NanolitError, match="eval_metrics_every must be a positive number of steps or -1"):
        ChatEvaluation(eval_metrics_every=0)
    with pytest.raises(NanolitError, match="eval_metrics_max_problems must be a positive number or -1"):
        ChatEvaluation(eval_metrics_max_problems=0)
    assert not ChatEvaluation(eval_metrics_every=-1).enabled

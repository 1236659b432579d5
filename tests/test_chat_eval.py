"""Chat evaluation (chat_eval's scoring) on small task files in the datasets' real schemas."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_task_data

from nanolit.checkpoint import load_any
from nanolit.cli import main
from nanolit.common import NanolitError
from nanolit.data.tasks import ARC, GSM8K, HumanEval, SpellingBee, task_folder
from nanolit.eval.chat import (
    BASELINES, CHAT_TASKS, check_humaneval, check_number, evaluate_chat, extract_answer, extract_program,
    load_chat_task, run_categorical,
)
from nanolit.model import GPTConfig

TESTS_DIR = Path(__file__).parent
TINY = GPTConfig(sequence_len=64, vocab_size=265, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)


@pytest.fixture(scope="module")
def task_base(tmp_path_factory) -> Path:
    return write_task_data(tmp_path_factory.mktemp("tasks"))


class LetterModel(torch.nn.Module):
    """Prefers token ``favourite`` at every position (no cache: categorical scoring is one forward)."""

    def __init__(self, favourite: int, vocab: int):
        super().__init__()
        self.favourite, self.vocab, self.anchor = favourite, vocab, torch.nn.Parameter(torch.zeros(1))

    def get_device(self):
        return self.anchor.device

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)
        logits[..., self.favourite] = 1.0
        return logits


class ReplyModel(torch.nn.Module):
    """Greedy decoding gives the same reply to every prompt, then ``<|assistant_end|>``."""

    def __init__(self, reply: list[int], end: int, config: GPTConfig):
        super().__init__()
        self.reply, self.end, self.config = reply, end, config
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.prompt_len = 0

    def get_device(self):
        return self.anchor.device

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        start = kv_cache.get_pos()
        c = self.config
        for layer in range(c.n_layer):  # fill the cache like a real model, so positions advance
            kv = torch.zeros(B, c.n_kv_head, T, c.n_embd // c.n_head)
            kv_cache.insert_kv(layer, kv, kv)
        if start == 0:
            self.prompt_len = T  # the prefill is the prompt
        k = start + T - self.prompt_len  # index in the reply of the token to predict
        logits = torch.zeros(B, T, c.vocab_size)
        logits[:, -1, self.reply[k] if k < len(self.reply) else self.end] = 1.0
        return logits


def reply_model(tokenizer, text: str) -> ReplyModel:
    return ReplyModel(tokenizer.encode(text), tokenizer.encode_special("<|assistant_end|>"), TINY)


def test_categorical_scores_the_letter_logits(task_base, byte_tokenizer):
    task = load_chat_task("ARC-Easy", task_base)
    # The model always prefers "A"; where "A" is not a choice all letters tie and argmax takes the first.
    want = sum(c["messages"][-1]["content"] == ("A" if "A" in c["letters"] else c["letters"][0]) for c in task)
    model = LetterModel(byte_tokenizer.encode("A")[0], 265)
    for batch_size in (1, 2, 8):
        assert run_categorical(task, model, byte_tokenizer, batch_size) == (want, len(task))
    assert run_categorical(task, model, byte_tokenizer, 2, max_problems=3)[1] == 3
    out = evaluate_chat(model, byte_tokenizer, tasks="MMLU", base_dir=task_base)
    mmlu = load_chat_task("MMLU", task_base)
    assert out["counts"]["MMLU"] == (sum(c["messages"][-1]["content"] == "A" for c in mmlu), 6)
    assert out["chatcore"] is None  # not all six tasks ran


def test_padding_does_not_change_a_real_models_answers(task_base, mid_d2):
    loaded = load_any(mid_d2)
    task = load_chat_task("ARC-Easy", task_base)
    counts = {b: run_categorical(task, loaded.model, loaded.tokenizer, b) for b in (1, 5)}
    assert counts[1] == counts[5] and counts[1][1] == 5


def test_generative_tasks(task_base, byte_tokenizer):
    gsm = load_chat_task("GSM8K", task_base)
    out = evaluate_chat(reply_model(byte_tokenizer, "So the answer is\n#### 1,200"), byte_tokenizer,
                        tasks={"GSM8K": gsm})
    assert out["counts"]["GSM8K"] == (1, 3)  # only 600+600 is 1,200 (commas are dropped on both sides)
    code = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    out = evaluate_chat(reply_model(byte_tokenizer, code), byte_tokenizer, tasks="HumanEval", base_dir=task_base)
    assert out["counts"]["HumanEval"] == (2, 3)  # both `add` problems pass; `double` is not defined
    bee = load_chat_task("SpellingBee", task_base)
    answers = [extract_answer(c["messages"][-1]["content"][-1]["text"]) for c in bee]
    out = evaluate_chat(reply_model(byte_tokenizer, "#### 1"), byte_tokenizer, tasks={"SpellingBee": bee},
                        max_problems=40)
    assert len(bee) == 256 and out["counts"]["SpellingBee"] == (answers[:40].count("1"), 40)


def test_answer_checks():
    reference = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "text", "text": "It is "}, {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"},
        {"type": "text", "text": ".\n#### 42"}]}]}
    assert check_number(reference, "blah #### 42 more") and not check_number(reference, "#### 41")
    assert not check_number(reference, "42")  # no marker, no answer
    assert extract_answer("#### -1,234.5") == "-1234.5"
    assert extract_program("text\n```\nx = 1\n```\n```python\ny = 2\n```") == "x = 1"
    assert extract_program("  def f(): pass  ") == "def f(): pass"


def test_humaneval_solutions_that_loop_or_reach_out_fail_harmlessly(task_base, tmp_path):
    import socket
    import time

    problem = load_chat_task("HumanEval", task_base)[0]
    assert check_humaneval(problem, problem["messages"][-1]["content"])  # the canonical solution passes
    start = time.monotonic()
    assert not check_humaneval(problem, "def add(a, b):\n    while True:\n        pass\n")
    assert time.monotonic() - start < 5.0 + 5.0  # the 5 s limit plus the interpreter's start, not forever
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    sneaky = f"import socket\ndef add(a, b):\n    socket.create_connection(('127.0.0.1', {port}))\n    return a + b\n"
    assert not check_humaneval(problem, sneaky)
    with pytest.raises(socket.timeout):
        server.accept()  # nothing ever connected
    server.close()
    victim = tmp_path / "keep.txt"
    victim.write_text("still here")
    wipe = f"import os, shutil\ndef add(a, b):\n    os.remove({str(victim)!r})\n    return a + b\n"
    assert not check_humaneval(problem, wipe) and victim.read_text() == "still here"


def test_unknown_task_and_missing_data_are_one_line(task_base, tiny_chat_ckpt, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["eval", "chat", "--checkpoint", str(tiny_chat_ckpt), "-a", "ARC-Easy|TriviaQA",
              "--base_dir", str(task_base)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown chat task 'TriviaQA'" in err[0]
    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub fallback: tests never touch the network
    with pytest.raises(NanolitError, match=r"no local allenai/ai2_arc 'test' split in .*pip install nanolit\[hf\]"):
        load_chat_task("ARC-Challenge", tmp_path)


def test_cli_all_tasks_and_chatcore(task_base, tiny_chat_ckpt, capsys):
    main(["eval", "chat", "--checkpoint", str(tiny_chat_ckpt), "--base_dir", str(task_base), "-x", "3", "-m", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" accuracy: ")[0] for line in lines[:-1]] == list(CHAT_TASKS)
    accs = {line.split(" accuracy: ")[0]: float(line.split(": ")[1].split("%")[0]) / 100 for line in lines[:-1]}
    want = sum((accs[n] - BASELINES[n]) / (1 - BASELINES[n]) for n in CHAT_TASKS) / len(CHAT_TASKS)
    assert lines[-1] == f"ChatCORE metric: {want:.4f}" or abs(float(lines[-1].split(": ")[1]) - want) < 1e-4


def test_tasks_read_the_real_schemas(task_base):
    easy = ARC("ARC-Easy", "test", task_folder(task_base, "ARC-Easy"))
    rows = [json.loads(line) for line in (task_folder(task_base, "ARC-Easy") / "test.jsonl").read_text().splitlines()]
    # hub tasks are shuffled like datasets' .shuffle(seed=42); every row appears once
    assert sorted(c["messages"][-1]["content"] + c["letters"][0] for c in easy) == sorted(
        r["answerKey"] + r["choices"]["label"][0] for r in rows)
    numeric = next(c for c in easy if c["letters"][0] == "1")
    assert "- choice 4=4\n" in numeric["messages"][0]["content"]
    problem = HumanEval(task_folder(task_base, "humaneval"))[0]
    assert problem["messages"][1]["content"].startswith(problem["messages"][0]["content"] + "\n")
    assert {"test", "entry_point"} <= set(problem)
    assert isinstance(GSM8K("main", "test", task_folder(task_base, "gsm8k-main"))[0]["messages"][1]["content"], list)
    assert SpellingBee(task_base / "words_alpha.txt", size=3, split="test")[0]["messages"][0]["content"]


def test_counts_are_summed_over_ranks(task_base, tiny_chat_ckpt, tmp_path):
    """Two gloo ranks, each taking every other problem (or batch), report the one-process counts."""
    loaded = load_any(tiny_chat_ckpt)
    tasks = "ARC-Easy|MMLU|GSM8K|HumanEval"
    want = evaluate_chat(loaded.model, loaded.tokenizer, tasks=tasks, base_dir=task_base, batch_size=2,
                         max_new_tokens=6)
    proc = subprocess.run([sys.executable, str(TESTS_DIR / "_chat_eval_ddp.py"), str(tiny_chat_ckpt), str(task_base),
                           tasks, str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["counts"] == {k: list(v) for k, v in want["counts"].items()}
    # ARC 5 and MMLU 6 in batches of 2: rank 0 takes batches 0 and 2, rank 1 batch 1; GSM8K and HumanEval 3 problems
    assert got["rank_totals"] == [[3, 4, 2, 2], [2, 2, 1, 1]]

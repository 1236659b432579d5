"""The offline chat data's ARC files (``nanolit quickstart``'s SFT and chat evaluation): allenai/ai2_arc's schema,
right answers, and the files written before them unchanged by their being added."""
from __future__ import annotations

import json
import sys

import pytest

from nanolit.data import offline_chat
from nanolit.data.sft import build_sft_mixture
from nanolit.data.tasks import ARC, task_folder
from nanolit.eval.chat import load_chat_task


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    base = tmp_path_factory.mktemp("offline")
    return base, offline_chat.write_offline_chat_data(base)


def test_arc_rows_read_as_arc_and_name_the_right_function(offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # every split is local
    base, counts = offline
    docs = {f"{m}.{f}": d for m, f, d in offline_chat.stdlib_functions()}
    easy = ARC("ARC-Easy", "train", task_folder(base, "ARC-Easy"))
    challenge = ARC("ARC-Challenge", "test", task_folder(base, "ARC-Challenge"))
    assert len(easy) + len(challenge) + len(ARC("ARC-Easy", "test", task_folder(base, "ARC-Easy"))) + \
        len(ARC("ARC-Challenge", "train", task_folder(base, "ARC-Challenge"))) == counts["arc"] == 2 * len(docs)
    rows = [json.loads(line) for line in (task_folder(base, "ARC-Easy") / "train.jsonl").read_text().splitlines()]
    for row in rows:
        name = row["question"].split("`")[1]
        answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        assert answer == docs[name] and len(set(row["choices"]["text"])) == 4
    rows = [json.loads(line) for line in (task_folder(base, "ARC-Challenge") / "test.jsonl").read_text().splitlines()]
    for row in rows:
        answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        assert row["question"].endswith(docs[answer])
    assert {c["messages"][-1]["content"] for c in easy} <= {"A", "B", "C", "D"}
    # SFT trains on the offline set, and chat evaluation reads its ARC-Easy and MMLU
    assert len(build_sft_mixture(base)) > len(easy)
    assert len(load_chat_task("ARC-Easy", base)) == len(load_chat_task("MMLU", base)) > 0


def test_adding_arc_left_the_other_files_as_they_were(offline, tmp_path, monkeypatch):
    base, _ = offline
    monkeypatch.setattr(offline_chat, "arc_rows", lambda functions, rng, challenge: [])
    offline_chat.write_offline_chat_data(tmp_path)
    for name in ("smoltalk", "mmlu-auxiliary_train", "mmlu-all", "gsm8k-main"):
        for path in task_folder(tmp_path, name).iterdir():
            assert path.read_bytes() == (task_folder(base, name) / path.name).read_bytes(), path

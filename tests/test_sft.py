"""SFT batches (chat_sft's padded, masked rows) and its task mixture, on small files in the real schemas."""
from __future__ import annotations

import itertools
import sys

import pytest
import torch
from conftest import write_task_data

from nanolit.common import NanolitError
from nanolit.data.chat import render_conversation
from nanolit.data.sft import (
    build_sft_mixture, build_sft_val, collate_sft, sft_batches, sft_grad_accum_steps, sft_num_iterations,
)


@pytest.fixture(scope="module")
def task_base(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("sft"))


def test_collate_pads_and_masks():
    rows = [([9, 1, 2, 3, 4], [0, 0, 1, 1, 1]), ([9, 5, 6], [0, 1, 0])]
    inputs, targets = collate_sft(rows, pad_id=7)
    assert inputs.tolist() == [[9, 1, 2, 3], [9, 5, 7, 7]]
    assert targets.tolist() == [[-1, 2, 3, 4], [5, -1, -1, -1]]
    assert inputs.dtype == targets.dtype == torch.long


def test_targets_are_what_the_assistant_writes(task_base, byte_tokenizer):
    val = build_sft_val(task_base)
    inputs, targets = next(sft_batches(val, byte_tokenizer, batch_size=4))
    end = byte_tokenizer.encode_special("<|assistant_end|>")
    for i in range(4):
        conversation = val[i]
        reply = conversation["messages"][-1]["content"]
        assert targets[i][targets[i] >= 0].tolist() == byte_tokenizer.encode(reply) + [end]
        ids, _ = render_conversation(byte_tokenizer, conversation)
        assert inputs[i, :len(ids) - 1].tolist() == ids[:-1] and (inputs[i, len(ids) - 1:] == end).all()
    assert inputs.shape[1] == max(len(render_conversation(byte_tokenizer, val[i])[0]) for i in range(4)) - 1


def test_mixture_is_chat_sfts(task_base, byte_tokenizer):
    mixture = build_sft_mixture(task_base)
    # ARC-Easy 3, ARC-Challenge 2, GSM8K 3, SmolTalk 6 (of at most 10,000), identity 2, spelling 300 + 300
    assert [len(t) for t in mixture.tasks] == [3, 2, 3, 6, 2, 300, 300] and len(mixture) == 616
    again = build_sft_mixture(task_base)
    assert [mixture[i] for i in range(20)] == [again[i] for i in range(20)]  # Random(42): the same order each time
    assert {mixture.locate(i)[0] for i in range(len(mixture))} == set(range(7))
    tool_calls = [c for c in (mixture[i] for i in range(len(mixture))) if isinstance(c["messages"][-1]["content"], list)]
    assert len(tool_calls) == 3 + 300  # GSM8K and SpellingBee answers use the calculator


def test_ranks_split_each_epoch_and_batches_carry_over(task_base, byte_tokenizer):
    val = build_sft_val(task_base)  # 4 conversations
    firsts = {}
    for rank in (0, 1):
        batches = sft_batches(val, byte_tokenizer, batch_size=3, rank=rank, world_size=2)
        rows = [row for inputs, _ in itertools.islice(batches, 2) for row in inputs]
        firsts[rank] = [row[1:3].tolist() for row in rows]  # <|user_start|> and the first byte tell rows apart
    # rank 0 renders examples 0, 2, 0, 2, ... and rank 1 examples 1, 3, 1, 3, ... across epochs
    starts = [render_conversation(byte_tokenizer, val[i])[0][1:3] for i in range(4)]
    assert firsts[0] == [starts[0], starts[2], starts[0], starts[2], starts[0], starts[2]]
    assert firsts[1] == [starts[1], starts[3], starts[1], starts[3], starts[1], starts[3]]


def test_step_math_and_bad_input(task_base, byte_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub fallback: tests never touch the network
    assert sft_grad_accum_steps(32, 4, 2) == 4 and sft_num_iterations(23_000, 32, 2) == 1436
    with pytest.raises(NanolitError, match="not a multiple of device_batch_size"):
        sft_grad_accum_steps(32, 3, 1)
    with pytest.raises(NanolitError, match="identity_conversations.jsonl not found"):
        (tmp_path / "words_alpha.txt").write_text("kiwi\n")
        build_sft_mixture(tmp_path)
    with pytest.raises(NanolitError):
        next(sft_batches(build_sft_val(task_base), byte_tokenizer, batch_size=0))

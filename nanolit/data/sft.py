"""Supervised fine-tuning data (nanochat d575940 scripts/chat_sft.py): the task mixture and its batches.

Unlike mid-training, SFT does not pack: every row of a batch is one whole conversation (rendered by
:func:`nanolit.data.chat.render_conversation`, at most 2048 tokens), rows are padded to the batch's longest one,
and the loss sees only the tokens the assistant writes. Inputs are padded with ``<|assistant_end|>`` and targets
with -1, the ignore index; a target whose mask is 0 (user turns, tool outputs, ``<|assistant_start|>``) is -1 too.
Batches come on the CPU; the trainer moves them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from nanolit.common import NanolitError
from nanolit.data.chat import MAX_TOKENS, render_conversation
from nanolit.data.tasks import (
    ARC, GSM8K, IDENTITY_FILE, IDENTITY_URL, WORDS_FILE, WORDS_URL, CustomJSON, SimpleSpelling, SmolTalk, SpellingBee,
    Task, TaskMixture, _require, task_folder,
)
from nanolit.loss import IGNORE_INDEX

# chat_sft's knobs that shape the data
DEVICE_BATCH_SIZE = 4
TARGET_EXAMPLES_PER_STEP = 32
SMOLTALK_ROWS = 10_000  # SmolTalk train[:10000]
SPELLING_ROWS = 300  # SimpleSpelling and SpellingBee examples each


def build_sft_mixture(base_dir: str | os.PathLike) -> TaskMixture:
    """chat_sft's training mixture (about 23K conversations with the full datasets), shuffled with Random(42):
    ARC-Easy and ARC-Challenge train, GSM8K main train, SmolTalk train[:10000], the identity conversations,
    SimpleSpelling and SpellingBee 300 each. Files as laid out in :mod:`nanolit.data.tasks`."""
    base = Path(base_dir)
    words, identity = _require(base / WORDS_FILE, WORDS_URL), _require(base / IDENTITY_FILE, IDENTITY_URL)
    return TaskMixture([
        ARC("ARC-Easy", "train", task_folder(base, "ARC-Easy")),
        ARC("ARC-Challenge", "train", task_folder(base, "ARC-Challenge")),
        GSM8K("main", "train", task_folder(base, "gsm8k-main")),
        SmolTalk("train", task_folder(base, "smoltalk"), stop=SMOLTALK_ROWS),
        CustomJSON(identity),
        SimpleSpelling(words, size=SPELLING_ROWS, split="train"),
        SpellingBee(words, size=SPELLING_ROWS, split="train"),
    ])


def build_sft_val(base_dir: str | os.PathLike) -> Task:
    """chat_sft's validation conversations: SmolTalk test (about 24K; its loss uses the first batches only)."""
    return SmolTalk("test", task_folder(Path(base_dir), "smoltalk"))


def collate_sft(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` int64 ``[len(rows), longest - 1]`` from rendered ``(ids, mask)`` rows.

    Row i holds ``ids[:-1]`` as inputs and ``ids[1:]`` as targets, targets set to -1 where ``mask[1:]`` is 0;
    the rest of the row is ``pad_id`` (inputs) and -1 (targets).
    """
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        row = torch.tensor(ids, dtype=torch.long)
        inputs[i, :len(ids) - 1] = row[:-1]
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        targets[i, :len(ids) - 1] = torch.where(keep, row[1:], IGNORE_INDEX)
    return inputs, targets


def sft_batches(dataset: Task, tokenizer, batch_size: int = DEVICE_BATCH_SIZE, rank: int = 0, world_size: int = 1,
                start: int = 0, max_tokens: int = MAX_TOKENS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``batch_size`` conversations forever: rank r renders examples ``r, r + W, ...`` of each epoch in
    order, and a batch left unfinished at the end of an epoch is completed from the next, as chat_sft's generator.

    ``start``: how many of this rank's examples were consumed already (a resumed run), skipped without rendering;
    ``max_tokens``: where a conversation is cut.
    """
    if batch_size < 1 or len(dataset) < 1:
        raise NanolitError(f"need batch_size >= 1 and a non-empty dataset, got {batch_size} and {len(dataset)} rows")
    if len(dataset) <= rank:
        raise NanolitError(f"the dataset has {len(dataset)} conversations, fewer than the {world_size} ranks; add "
                           "data or use fewer devices")
    pad = tokenizer.encode_special("<|assistant_end|>")  # padded positions are masked out of the loss
    batch = []
    skip = start % len(range(rank, len(dataset), world_size))  # whole epochs of this rank's share need no skipping
    while True:
        for i in range(rank, len(dataset), world_size):
            if skip:
                skip -= 1
                continue
            batch.append(render_conversation(tokenizer, dataset[i], max_tokens, where=dataset.where(i)))
            if len(batch) == batch_size:
                yield collate_sft(batch, pad)
                batch = []


def sft_grad_accum_steps(target_examples_per_step: int = TARGET_EXAMPLES_PER_STEP,
                         device_batch_size: int = DEVICE_BATCH_SIZE, world_size: int = 1) -> int:
    """Micro-batches per optimizer step so that each step sees ``target_examples_per_step`` conversations."""
    per_step = device_batch_size * world_size
    if target_examples_per_step % per_step:
        raise NanolitError(f"target_examples_per_step={target_examples_per_step} is not a multiple of "
                           f"device_batch_size*world_size = {device_batch_size}*{world_size}; change one of them")
    return target_examples_per_step // per_step


def sft_num_iterations(num_examples: int, target_examples_per_step: int = TARGET_EXAMPLES_PER_STEP,
                       num_epochs: int = 1) -> int:
    """chat_sft's horizon when ``num_iterations`` is -1: whole steps per epoch times the epochs."""
    if num_epochs < 1:
        raise NanolitError(f"num_epochs must be positive when num_iterations is -1, got {num_epochs}")
    return (num_examples // target_examples_per_step) * num_epochs

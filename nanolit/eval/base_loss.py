"""Bits per byte of a model on the train and val shards of a base dir (nanochat d575940 scripts/base_loss.py)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from nanolit.common import NanolitError, autocast_context
from nanolit.data.loader import val_batches
from nanolit.data.shards import list_parquet_files
from nanolit.eval.bpb import evaluate_bpb

DEVICE_BATCH_SIZE = 32  # base_loss's defaults
SPLIT_TOKENS = 20 * 524288
SPLITS = ("train", "val")


def split_files(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shards of ``split``: every shard but the last for train, the last for val (nanochat's rule)."""
    if split not in SPLITS:
        raise NanolitError(f"unknown split {split!r}; use train and/or val")
    files = list_parquet_files(data_dir)
    if not files:
        raise NanolitError(f"no parquet shards in {data_dir}; pass --base_dir with a base_data/ folder "
                           "or build shards with `nanolit data ...`")
    if split == "val":
        return files[-1:]
    if len(files) < 2:
        raise NanolitError(f"{data_dir} holds only the val shard, so there is no train split; add shards or "
                           "pass --splits val")
    return files[:-1]


def evaluate_splits(model, tokenizer, data_dir: str | os.PathLike, device_batch_size: int = DEVICE_BATCH_SIZE,
                    split_tokens: int = SPLIT_TOKENS, splits=SPLITS, rank: int = 0, world_size: int = 1
                    ) -> dict[str, float]:
    """``{split: bpb}`` over the first ``split_tokens`` tokens of each split, rows of the model's sequence_len.

    As base_loss, ``split_tokens`` must be a whole number of steps of ``device_batch_size * sequence_len`` tokens per
    rank; under torch.distributed each rank reads its own row groups and the sums are all-reduced.
    """
    B, T = device_batch_size, model.config.sequence_len
    tokens_per_step = B * T * world_size
    if split_tokens < tokens_per_step or split_tokens % tokens_per_step:
        nearest = max(1, round(split_tokens / tokens_per_step)) * tokens_per_step
        raise NanolitError(f"split_tokens={split_tokens} is not a multiple of device_batch_size*sequence_len*"
                           f"world_size = {B}*{T}*{world_size}; use --split_tokens {nearest}")
    device = model.get_device()
    token_bytes = tokenizer.token_bytes().to(device)
    results = {}
    for split in splits:
        batches = val_batches(split_files(data_dir, split), tokenizer, B, T, split_tokens, rank, world_size)
        on_device = ((x.to(device), y.to(device)) for x, y in batches)
        with torch.no_grad(), autocast_context(device):
            results[split] = evaluate_bpb(model, on_device, len(batches), token_bytes)
    return results

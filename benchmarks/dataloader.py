"""Tokens per second of the training loader alone, on one CPU core, against what d20 consumes.

The loader (``TrainTokenStream``: parquet row groups -> tiktoken with ``<|bos|>`` per document -> ``[A, B, T+1]``
steps, tokenized in a background thread) must outrun the GPU it feeds by 10x, per rank, on a single core, so that
one core per GPU is plenty and the model never waits on data. What d20 eats on one GPU: about 136K tok/s per
H100 in nanochat's speedrun (its speedrun; 48% MFU on 8xH100); nanolit's own step does 142K tok/s on one H100
(``benchmarks/gpu.py``, benchmarks/README.md). Target: >= 10x the larger, 1.42M tok/s.

The process is pinned to one core (``sched_setaffinity``) and the tokenizer gets one thread, so the main
thread, the background thread and tiktoken all share that core. Token counts depend on the vocabulary: nanochat's
65536-token tokenizer packs about 4.8 bytes of FineWeb-Edu text per token (nanochat d575940 scripts/tok_train.py),
smaller vocabularies fewer, so the script also reports text bytes/s and the 65536-vocab tokens/s they amount to
(bytes / 4.8).

    python benchmarks/dataloader.py                              # embedded corpus, BPE vocab 16384
    python benchmarks/dataloader.py --tokenizer-dir ../shared/fixtures/nanochat_d2/tokenizer \\
        --shards ../shared/fixtures/nanochat_d2/base_data/*.parquet   # FineWeb-Edu text, nanochat's tokenizer
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from nanolit.data.loader import TrainTokenStream
from nanolit.data.shards import iter_row_groups, list_parquet_files, train_val_split
from nanolit.tokenizer import Tokenizer
from step_overhead import default_base_dir, prepare_base_dir  # sibling script: benchmarks/ is sys.path[0]

D20_TOK_PER_SEC = 141_889  # benchmarks/gpu.py, d20 on one H100 (its speedrun; nanochat's speedrun: ~136K per GPU)
NANOCHAT_BYTES_PER_TOKEN = 4.8  # the 65536 vocab on FineWeb-Edu (nanochat d575940 scripts/tok_train.py)
REQUIRED_MARGIN = 10  # the loader must outrun what d20 consumes per GPU tenfold


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=10.0, help="how long to pull steps after the first one")
    p.add_argument("--tokenizer-threads", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=16384,
                   help="BPE trained on the embedded corpus (its ~2 MB support at most ~31K tokens, not 65536)")
    p.add_argument("--base-dir", type=Path, default=None, help="nanochat-layout dir; built if empty")
    p.add_argument("--tokenizer-dir", type=Path, default=None, help="use this tokenizer instead")
    p.add_argument("--shards", type=Path, nargs="+", default=None, help="read these parquet files as train data")
    p.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def data_and_tokenizer(args: argparse.Namespace) -> tuple[list[Path], Tokenizer]:
    """The train shards and the tokenizer: given ones, or the embedded corpus's (built on first use)."""
    if args.shards and args.tokenizer_dir:
        return list(args.shards), Tokenizer.from_directory(args.tokenizer_dir)
    base = prepare_base_dir(args.base_dir or default_base_dir(args.vocab_size), args.vocab_size)
    files = list(args.shards) if args.shards else train_val_split(list_parquet_files(base / "base_data"))[0]
    return files, Tokenizer.from_directory(args.tokenizer_dir or base / "tokenizer")


def bytes_per_token(files: list[Path], tokenizer: Tokenizer, max_docs: int = 2000) -> float:
    """UTF-8 bytes per token (``<|bos|>`` excluded) over the first documents of ``files``."""
    texts: list[str] = []
    for _, _, docs in iter_row_groups(files, (0, 0), 0, 1):
        texts.extend(docs)
        if len(texts) >= max_docs:
            break
    num_tokens = sum(len(ids) for ids in tokenizer.encode(texts[:max_docs]))
    return sum(len(t.encode("utf-8")) for t in texts[:max_docs]) / num_tokens


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pinnable = hasattr(os, "sched_setaffinity")  # Linux; elsewhere the tokenizer thread count is the only limit
    if not args.all_cores and pinnable:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for every thread of the process
    torch.set_num_threads(1)
    files, tokenizer = data_and_tokenizer(args)
    B, T = args.device_batch_size, args.seq_len
    stream = TrainTokenStream(files, tokenizer, B, T, tokenizer_threads=args.tokenizer_threads)
    next(stream)  # thread start and the first row group are a one-off, not throughput
    steps, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        next(stream)
        steps += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stream.close()
    tok_per_sec = steps * B * T / wall
    ratio = bytes_per_token(files, tokenizer)
    nanochat_tok_per_sec = tok_per_sec * ratio / NANOCHAT_BYTES_PER_TOKEN
    result = {
        "cores": len(os.sched_getaffinity(0)) if pinnable else os.cpu_count(),
        "tokenizer_threads": args.tokenizer_threads,
        "vocab_size": tokenizer.get_vocab_size(), "files": len(files), "B": B, "T": T, "steps": steps,
        "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "tok_per_sec": int(tok_per_sec),
        "bytes_per_token": round(ratio, 3), "text_mb_per_sec": round(tok_per_sec * ratio / 1e6, 2),
        "nanochat_vocab_tok_per_sec": int(nanochat_tok_per_sec),
        "x_d20": round(min(tok_per_sec, nanochat_tok_per_sec) / D20_TOK_PER_SEC, 1),
    }
    result["meets_target"] = result["x_d20"] >= REQUIRED_MARGIN
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

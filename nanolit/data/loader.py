"""Pretraining token streams: the training stream with exact resume, and the fixed validation batches (nanochat d575940
nanochat/dataloader.py).

The document stream is nanochat's: each rank reads row groups ``rank, rank + W, ...`` of every shard in order,
documents are tokenized with ``<|bos|>`` prepended and concatenated (no EOS, no masks), and after the last shard it
starts over (a new epoch). Each micro-batch pops ``B*T + 1`` tokens: inputs are the first ``B*T``, targets the last
``B*T``, so one token per micro-batch is consumed without ever being an input.

nanolit changes (nanochat d575940 nanochat/dataloader.py resumes only approximately): one item is a whole optimizer
step, and its state names the
exact position of the next unconsumed token, so a fresh stream started from it yields exactly the following steps.
"""
from __future__ import annotations

import atexit
import itertools
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from nanolit.common import NanolitError
from nanolit.data.shards import iter_row_groups

# (epoch, pq_idx, rg_idx, doc_idx, token_idx): where a rank's stream stands. Epochs count from 1; doc_idx is the
# document's row in the row group, token_idx counts that document's tokens from its <|bos|>.
Position = tuple[int, int, int, int, int]
STATE_KEYS = ("epoch", "pq_idx", "rg_idx", "doc_idx", "token_idx")


def check_batch_knobs(max_seq_len: int, device_batch_size: int, total_batch_size: int) -> None:
    """One line for batch knobs no run can use (the module and the DataModule both take them)."""
    for name, value in (("max_seq_len", max_seq_len), ("device_batch_size", device_batch_size),
                        ("total_batch_size", total_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NanolitError(f"{name} must be a positive whole number, got {value!r}")


def grad_accum_steps(total_batch_size: int, device_batch_size: int, max_seq_len: int, world_size: int = 1) -> int:
    """Micro-batches per optimizer step so that every step sees ``total_batch_size`` tokens over all ranks, as
    nanochat's base_train derives them."""
    check_batch_knobs(max_seq_len, device_batch_size, total_batch_size)
    world_tokens = device_batch_size * max_seq_len * world_size
    if total_batch_size < world_tokens or total_batch_size % world_tokens:
        nearest = max(1, round(total_batch_size / world_tokens)) * world_tokens
        raise NanolitError(
            f"total_batch_size={total_batch_size} is not a multiple of device_batch_size*max_seq_len*world_size = "
            f"{device_batch_size}*{max_seq_len}*{world_size} = {world_tokens}; "
            f"use total_batch_size={nearest} or change device_batch_size"
        )
    return total_batch_size // world_tokens


def resume_state_for_rank(saved: list[dict], rank: int, world_size: int) -> tuple[dict, bool]:
    """``(this rank's start state, exact?)`` from the per-rank train loader states saved in a checkpoint.

    Exact when the checkpoint holds one nanolit state per rank of the same world size. Otherwise (another world
    size, or nanochat's ``{pq_idx, rg_idx}``) it falls back to nanochat's approximate rule (nanochat d575940
    nanochat/dataloader.py): skip ahead to the
    next full stride of row groups after rank 0's, ``rg = (rg_idx // W + 1) * W + rank``.
    """
    if len(saved) == world_size and all(set(STATE_KEYS) <= set(s) for s in saved):
        return dict(saved[rank]), True
    epoch, pq_idx, rg_idx = approximate_start(saved[0], rank, world_size)
    return {"epoch": epoch, "pq_idx": pq_idx, "rg_idx": rg_idx, "doc_idx": 0, "token_idx": 0}, False


def approximate_start(first: dict, rank: int, world_size: int) -> tuple[int, int, int]:
    """``(epoch, pq_idx, rg_idx)`` where nanochat resumes this rank from rank 0's saved ``{pq_idx, rg_idx[, epoch]}``:
    the first row group of the next full stride, ``(rg_idx // W + 1) * W + rank`` (a start past the file's last row
    group moves on to the next file)."""
    stride = first["rg_idx"] // world_size + 1
    return first.get("epoch", 1), first["pq_idx"], stride * world_size + rank


def _as_position(state: dict | None, rank: int) -> Position:
    if state is None:
        return (1, 0, rank, 0, 0)
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise NanolitError(f"train loader state {state} lacks {missing}; resume from a checkpoint written by nanolit")
    return tuple(int(state[k]) for k in STATE_KEYS)


def _doc_chunks(
    files: list[Path], start: Position, rank: int, world_size: int, chunk_size: int
) -> Iterator[tuple[Position, list[str]]]:
    """Chunks of at most ``chunk_size`` documents of this rank's row groups, forever, from ``start``.

    Yields ``(position of the chunk's first document, documents)``.
    """
    epoch, pq_idx, rg_idx, doc_idx, _ = start
    while True:
        found = False
        for p, r, texts in iter_row_groups(files, (pq_idx, rg_idx), rank, world_size):
            first = doc_idx if (p, r) == (pq_idx, rg_idx) else 0
            for d in range(first, len(texts), chunk_size):
                found = True
                yield (epoch, p, r, d, 0), texts[d : d + chunk_size]
        if not found and (pq_idx, rg_idx, doc_idx) == (0, rank, 0):
            raise NanolitError(
                f"rank {rank} of {world_size} gets no documents from {len(files)} shard(s); "
                "add shards or use fewer devices"
            )
        epoch, pq_idx, rg_idx, doc_idx = epoch + 1, 0, rank, 0


class _TokenBuffer:
    """Tokenized documents not yet consumed, each chunk remembering where its documents came from.

    That lets it name the position of the next unconsumed token at any time, which is the whole resume state:
    tokenization is per document, so re-reading from that document reproduces the stream exactly.
    """

    def __init__(self):
        self._chunks: deque[list] = deque()  # [position of first doc, tokens, start offset of each doc, consumed]
        self.size = 0

    def push(self, position: Position, rows: list[list[int]], skip: int = 0) -> None:
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        starts = np.concatenate(([0], np.cumsum(lengths[:-1])))
        tokens = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        if skip >= lengths[0]:
            raise NanolitError(
                f"resume position {position} is past the end of its document; the shards or tokenizer changed since "
                "the checkpoint was written"
            )
        self._chunks.append([position, tokens, starts, skip])
        self.size += len(tokens) - skip

    def pop(self, n: int) -> np.ndarray:
        parts = []
        self.size -= n
        while n > 0:
            chunk = self._chunks[0]
            tokens, consumed = chunk[1], chunk[3]
            take = min(n, len(tokens) - consumed)
            parts.append(tokens[consumed : consumed + take])
            chunk[3] += take
            n -= take
            if chunk[3] == len(tokens):
                self._chunks.popleft()
        return np.concatenate(parts)

    def position(self) -> Position | None:
        """Where the next unconsumed token sits; None when the buffer is empty."""
        if not self._chunks:
            return None
        (epoch, pq_idx, rg_idx, doc_idx, _), _, starts, consumed = self._chunks[0]
        j = int(np.searchsorted(starts, consumed, side="right")) - 1
        return (epoch, pq_idx, rg_idx, doc_idx + j, consumed - int(starts[j]))


def _token_steps(
    files: list[Path], tokenizer, B: int, T: int, micro_steps: int, rank: int, world_size: int,
    state: dict | None, tokenizer_threads: int, tokenizer_batch_size: int,
) -> Iterator[tuple[np.ndarray, dict]]:
    """Forever: ``(rows [micro_steps, B*T+1] int64, state after them)``, each row the next ``B*T+1`` stream tokens."""
    needed = B * T + 1
    bos = tokenizer.get_bos_token_id()
    start = _as_position(state, rank)
    chunks = _doc_chunks(files, start, rank, world_size, tokenizer_batch_size)
    skip = start[4]  # tokens of the first document already consumed before the resume
    buffer = _TokenBuffer()
    after_last_chunk = start
    while True:
        rows = np.empty((micro_steps, needed), dtype=np.int64)
        for i in range(micro_steps):
            while buffer.size < needed:
                position, docs = next(chunks)
                buffer.push(position, tokenizer.encode(docs, prepend=bos, num_threads=tokenizer_threads), skip)
                skip = 0
                after_last_chunk = position[:3] + (position[3] + len(docs), 0)
            rows[i] = buffer.pop(needed)
        yield rows, dict(zip(STATE_KEYS, buffer.position() or after_last_chunk))


class PrefetchedSteps:
    """Iterator of optimizer steps ``(tokens [A, B, T+1] int64, state)`` made by ``steps`` in a background thread.

    A daemon thread runs ``steps`` up to ``prefetch_steps`` steps ahead so the model never waits on the tokenizer; it
    starts at the first ``next()``, stops on :meth:`close` or garbage collection, and its errors re-raise here.
    """

    def __init__(self, steps: Iterator[tuple[torch.Tensor, dict]], prefetch_steps: int = 2, pin_memory: bool = False):
        self._steps, self._pin_memory = steps, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch_steps)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> "PrefetchedSteps":
        return self

    def __next__(self) -> tuple[torch.Tensor, dict]:
        if self._stop.is_set():
            raise StopIteration
        if self._thread is None:
            # The thread holds no reference to self, so dropping the stream lets __del__ stop it.
            self._thread = threading.Thread(
                target=_produce, args=(self._steps, self._pin_memory, self._queue, self._stop),
                name="nanolit-tokenizer", daemon=True,
            )
            self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the tokenizer thread stopped without an error; this is a nanolit bug")
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stop the background thread (it exits within 0.1 s of finishing the step it is on)."""
        self._stop.set()

    def __del__(self) -> None:
        if hasattr(self, "_stop"):  # a subclass may raise before calling __init__
            self.close()


def _overlapping_rows(steps: Iterator[tuple[np.ndarray, dict]], T: int) -> Iterator[tuple[torch.Tensor, dict]]:
    for rows, state in steps:
        yield torch.from_numpy(rows).unfold(1, T + 1, T).contiguous(), state  # [A, B, T+1], overlapping by 1 token


class TrainTokenStream(PrefetchedSteps):
    """Iterator of optimizer steps ``(tokens [A, B, T+1] int64, state)`` for one rank, tokenized in the background.

    Micro-batch ``a`` holds ``B*T + 1`` consecutive stream tokens laid out as overlapping rows,
    ``tokens[a, b] = stream[b*T : b*T + T + 1]``, so ``x, y = tokens[a, :, :-1], tokens[a, :, 1:]`` are exactly
    nanochat's inputs and targets. ``state`` (a dict of ints, safe for ``weights_only`` loading) passed back as
    ``resume_state`` makes a new stream continue with the step after this one. See :class:`PrefetchedSteps`.
    """

    def __init__(
        self,
        files: list[Path],
        tokenizer,
        B: int,
        T: int,
        grad_accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
        resume_state: dict | None = None,
        tokenizer_threads: int = 4,
        tokenizer_batch_size: int = 128,
        prefetch_steps: int = 2,
        pin_memory: bool = False,
    ):
        steps = _token_steps(files, tokenizer, B, T, grad_accum_steps, rank, world_size, resume_state,
                             tokenizer_threads, tokenizer_batch_size)
        super().__init__(_overlapping_rows(steps, T), prefetch_steps, pin_memory)


# Tokenizer threads still running, with their stop events. A daemon thread killed inside pyarrow or tiktoken at
# interpreter exit aborts the process ("terminate called without an active exception"), so exit stops and joins them.
_RUNNING: set[tuple[threading.Event, threading.Thread]] = set()


@atexit.register
def _stop_running_threads() -> None:
    for stop, _ in list(_RUNNING):
        stop.set()
    for _, thread in list(_RUNNING):
        thread.join(timeout=30)


def _produce(steps, pin_memory: bool, out: queue.Queue, stop: threading.Event) -> None:
    """Thread body: queue the steps, or the exception that stopped them."""
    entry = (stop, threading.current_thread())
    _RUNNING.add(entry)
    try:
        for tokens, state in steps:
            if pin_memory:
                tokens = tokens.pin_memory()
            if not _put(out, (tokens, state), stop):
                return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        _put(out, e, stop)
    finally:
        _RUNNING.discard(entry)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless asked to stop first; True if it was queued."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def val_batches(
    files: list[Path],
    tokenizer,
    B: int,
    T: int,
    eval_tokens: int,
    rank: int = 0,
    world_size: int = 1,
    tokenizer_threads: int = 4,
    tokenizer_batch_size: int = 128,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``eval_tokens // (B*T*W)`` batches ``(x [B, T], y [B, T])`` of the val stream: the same every call,
    like nanochat's val loader rebuilt fresh at each eval (nanochat d575940 scripts/base_train.py)."""
    steps = eval_tokens // (B * T * world_size)
    if steps < 1:
        raise NanolitError(
            f"eval_tokens={eval_tokens} is less than one batch over all ranks (B*T*W = {B}*{T}*{world_size}); "
            f"raise eval_tokens to at least {B * T * world_size}"
        )
    stream = _token_steps(files, tokenizer, B, T, 1, rank, world_size, None, tokenizer_threads, tokenizer_batch_size)
    batches = []
    for rows, _ in itertools.islice(stream, steps):
        flat = torch.from_numpy(rows[0])
        batches.append((flat[:-1].view(B, T), flat[1:].view(B, T)))  # two views of one buffer
    return batches

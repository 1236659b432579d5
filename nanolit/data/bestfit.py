"""BOS-aligned best-fit packing, the 2026 recipe's loader (nanochat 92d63d4 nanochat/dataloader.py), resumed exactly.

Every row of ``T + 1`` tokens starts with a document's ``<|bos|>``. Tokenized documents wait in a buffer that is
topped up to at least 1000 (one tokenizer batch of up to 128 documents at a time). A row takes the largest buffered
document that still fits whole, again and again; when none fits, it takes the shortest document cropped to fill the
row exactly, and the rest of that document is dropped. No padding; every token is a target. Ties go to the document
that entered the buffer first. Inputs and targets are ``row[:-1]`` and ``row[1:]``.

The document stream (shards, row groups, rank striding, epochs) is the one of ``nanolit.data.loader``.

State. nanochat saves where its last refill read, ``{pq_idx, rg_idx, epoch}``, and resumes from the next row group
with an empty buffer: close, not exact. The state here keeps those three (as nanochat would have saved them, so they
can go into its meta json) and adds ``next`` (``[epoch, pq_idx, rg_idx, doc_idx]``: where the next refill reads) and
``buffer`` (the documents still waiting, in buffer order, as runs ``[epoch, pq_idx, rg_idx, doc_idx, ...]`` of one
row group). Documents are tokenized one by one, so re-reading those from the shards restores the buffer exactly,
and a loader started from the state (with the same shards, tokenizer, B, T, world size, ``tokenizer_batch_size``
and ``buffer_size``) yields exactly the batches that would have followed.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from nanolit.common import NanolitError
from nanolit.data.loader import PrefetchedSteps, _doc_chunks, approximate_start
from nanolit.data.shards import read_texts

BUFFER_SIZE = 1000  # documents kept to choose from (nanochat's buffer_size)
NANOCHAT_KEYS = ("pq_idx", "rg_idx", "epoch")


class _DocBuffer:
    """Tokenized documents in the order they were read, with where each came from."""

    def __init__(self):
        self.docs: list[np.ndarray] = []
        self.positions: list[tuple[int, int, int, int]] = []  # (epoch, pq_idx, rg_idx, doc_idx)
        self.lengths = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.docs)

    def extend(self, positions: list[tuple[int, int, int, int]], docs: list[list[int]]) -> None:
        self.docs += [np.asarray(doc, dtype=np.int64) for doc in docs]
        self.positions += positions
        self.lengths = np.concatenate([self.lengths, np.fromiter(map(len, docs), np.int64, len(docs))])

    def pop(self, i: int) -> np.ndarray:
        self.positions.pop(i)
        self.lengths = np.delete(self.lengths, i)
        return self.docs.pop(i)

    def runs(self) -> list[list[int]]:
        """The positions as runs of one (epoch, pq_idx, rg_idx): ``[epoch, pq_idx, rg_idx, doc_idx, ...]``."""
        return [[*key, *(p[3] for p in group)] for key, group in itertools.groupby(self.positions, lambda p: p[:3])]


class _Packer:
    """Packs one rank's document stream into rows; ``state()`` at any row boundary resumes it exactly."""

    def __init__(self, files: list[Path], tokenizer, B: int, T: int, rank: int, world_size: int, state: dict | None,
                 tokenizer_threads: int, tokenizer_batch_size: int, buffer_size: int):
        self.tokenizer, self.B, self.T, self.buffer_size = tokenizer, B, T, buffer_size
        self.threads, self.bos = tokenizer_threads, tokenizer.get_bos_token_id()
        state = state or {"epoch": 1, "pq_idx": 0, "rg_idx": 0, "next": [1, 0, rank, 0], "buffer": []}
        missing = [k for k in (*NANOCHAT_KEYS, "next", "buffer") if k not in state]
        if missing:
            raise NanolitError(f"best-fit loader state lacks {missing}; pass a state this loader saved, or convert "
                               f"nanochat's with nanolit.data.bestfit.resume_state_for_rank")
        self.next = tuple(int(v) for v in state["next"])
        self.last_read = tuple(int(state[k]) for k in NANOCHAT_KEYS)
        self.chunks = _doc_chunks(files, (*self.next, 0), rank, world_size, tokenizer_batch_size)
        self.buffer = _DocBuffer()
        self._restore(files, state["buffer"])

    def _restore(self, files: list[Path], runs: list[list[int]]) -> None:
        texts: dict[tuple[int, int], list[str]] = {}
        for epoch, pq_idx, rg_idx, *doc_ids in runs:
            if (pq_idx, rg_idx) not in texts:
                texts[pq_idx, rg_idx] = read_texts(files[pq_idx], rg_idx)
            rows = texts[pq_idx, rg_idx]
            if max(doc_ids) >= len(rows):
                raise NanolitError(f"resume state names document {max(doc_ids)} of row group {rg_idx} in "
                                   f"{files[pq_idx].name}, which has {len(rows)}; the shards changed since it was "
                                   f"saved")
            self._add([(epoch, pq_idx, rg_idx, d) for d in doc_ids], [rows[d] for d in doc_ids])

    def _add(self, positions: list[tuple[int, int, int, int]], texts: list[str]) -> None:
        self.buffer.extend(positions, self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.threads))

    def _refill(self) -> None:
        (epoch, pq_idx, rg_idx, doc_idx, _), texts = next(self.chunks)
        self._add([(epoch, pq_idx, rg_idx, doc_idx + j) for j in range(len(texts))], texts)
        self.last_read = (pq_idx, rg_idx, epoch)
        self.next = (epoch, pq_idx, rg_idx, doc_idx + len(texts))

    def _fill_row(self, row: np.ndarray) -> None:
        pos, capacity = 0, row.shape[0]
        while pos < capacity:
            while len(self.buffer) < self.buffer_size:
                self._refill()
            remaining = capacity - pos
            lengths = self.buffer.lengths
            fitting = np.where(lengths <= remaining, lengths, 0)
            best = int(fitting.argmax())  # the first of the longest that fit whole (documents are >= 1 token)
            if fitting[best] > 0:
                doc = self.buffer.pop(best)
                row[pos:pos + doc.size] = doc
                pos += doc.size
            else:  # nothing fits: crop the shortest, which wastes the least
                doc = self.buffer.pop(int(lengths.argmin()))
                row[pos:] = doc[:remaining]
                pos = capacity

    def micro_batch(self) -> np.ndarray:
        """The next ``[B, T+1]`` rows."""
        rows = np.empty((self.B, self.T + 1), dtype=np.int64)
        for row in rows:
            self._fill_row(row)
        return rows

    def state(self) -> dict:
        """A fresh dict of ints and lists (safe for ``weights_only`` loading and for JSON)."""
        return {**dict(zip(NANOCHAT_KEYS, self.last_read)), "next": list(self.next), "buffer": self.buffer.runs()}


def _bestfit_steps(packer: _Packer, grad_accum_steps: int) -> Iterator[tuple[torch.Tensor, dict]]:
    """Forever: ``(tokens [A, B, T+1], state after them)``.

    nanochat's training loop fetches the next micro-batch right after each backward, so the loader state it saves
    with a step is the one after the following step's first micro-batch: that micro-batch is built ahead here and
    only its ``pq_idx, rg_idx, epoch`` go into the state, next to the exact resume position before it.
    """
    ahead = packer.micro_batch()
    while True:
        rows = [ahead] + [packer.micro_batch() for _ in range(grad_accum_steps - 1)]
        state = packer.state()
        ahead = packer.micro_batch()
        state.update(zip(NANOCHAT_KEYS, packer.last_read))
        yield torch.from_numpy(np.stack(rows)), state


class BestFitTokenStream(PrefetchedSteps):
    """Iterator of optimizer steps ``(tokens [A, B, T+1] int64, state)`` of best-fit packed rows for one rank.

    ``x, y = tokens[a, :, :-1], tokens[a, :, 1:]`` are the inputs and targets of micro-batch ``a``, exactly
    nanochat's. ``state`` passed back as ``resume_state`` makes a new stream continue with the next step (see the
    module docstring); tokenized in a background thread (:class:`nanolit.data.loader.PrefetchedSteps`).
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
        buffer_size: int = BUFFER_SIZE,
        prefetch_steps: int = 2,
        pin_memory: bool = False,
    ):
        packer = _Packer(files, tokenizer, B, T, rank, world_size, resume_state, tokenizer_threads,
                         tokenizer_batch_size, buffer_size)
        super().__init__(_bestfit_steps(packer, grad_accum_steps), prefetch_steps, pin_memory)


def bestfit_val_batches(
    files: list[Path],
    tokenizer,
    B: int,
    T: int,
    eval_tokens: int,
    rank: int = 0,
    world_size: int = 1,
    tokenizer_threads: int = 4,
    tokenizer_batch_size: int = 128,
    buffer_size: int = BUFFER_SIZE,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``eval_tokens // (B*T*W)`` batches ``(x [B, T], y [B, T])`` of a fresh best-fit loader on ``files``
    (the val shard): what nanochat's ``tokenizing_distributed_data_loader_bos_bestfit(tokenizer, B, T, "val")``
    yields, the same at every evaluation."""
    steps = eval_tokens // (B * T * world_size)
    if steps < 1:
        raise NanolitError(f"eval_tokens={eval_tokens} is less than one batch over all ranks (B*T*W = {B}*{T}*"
                           f"{world_size}); raise eval_tokens to at least {B * T * world_size}")
    packer = _Packer(files, tokenizer, B, T, rank, world_size, None, tokenizer_threads, tokenizer_batch_size,
                     buffer_size)
    batches = []
    for _ in range(steps):
        rows = torch.from_numpy(packer.micro_batch())
        batches.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
    return batches


def resume_state_for_rank(saved: list[dict], rank: int, world_size: int) -> tuple[dict, bool]:
    """``(this rank's start state, exact?)`` from the per-rank best-fit states saved in a checkpoint.

    Exact when there is one state of this loader per rank of the same world size. Otherwise (another world size, or
    nanochat's ``{pq_idx, rg_idx, epoch}``) nanochat's rule: an empty buffer, reading from the next full stride of
    row groups after rank 0's.
    """
    if len(saved) == world_size and all({"next", "buffer"} <= set(s) for s in saved):
        return dict(saved[rank]), True
    epoch, pq_idx, rg_idx = approximate_start(saved[0], rank, world_size)
    first = saved[0]
    state = {"pq_idx": first["pq_idx"], "rg_idx": first["rg_idx"], "epoch": epoch,
             "next": [epoch, pq_idx, rg_idx, 0], "buffer": []}
    return state, False

"""Mid-training data: the task mixture's conversations rendered and packed into optimizer steps (nanochat d575940
scripts/mid_train.py), and
``MidDataModule``.

The stream is nanochat's: rank r renders conversations ``r, r + W, r + 2W, ...`` of the mixture (nanochat d575940
nanochat/tokenizer.py; BOS first)
and appends them to one token buffer, so conversations pack across rows and batches; each micro-batch pops
``B*T + 1`` tokens. Passing the end of the mixture wraps the cursor and, on train, ends the epoch.

Like the base loader, one item is a whole optimizer step ``(tokens [A, B, T+1] int64, state)`` whose rows overlap
by one token, and ``state`` resumes the stream exactly. Two nanochat facts about the loop are folded into the state:

* ``last_step``: nanochat checks its ``last_step`` flag before training the micro-batch it has prefetched, so a
  step whose first micro-batch passed the end of the mixture (or whose index reached ``num_iterations``) is not
  trained: it is the signal to evaluate, save and stop (nanochat d575940 scripts/mid_train.py).
* ``progress``: nanochat updates progress after each prefetch, so the LR of a step uses the progress measured after
  fetching the next step's first micro-batch; the stream looks that far ahead to give exactly that number.

nanolit counts ``it`` and ``num_iterations`` in optimizer steps; nanochat counts micro-batches, which is the same
with one micro-batch per step (the d20 speedrun).

With ``mask_user_tokens`` a token that the mask of nanochat's render_conversation does not train on is stored as ``~id``
(negative) in ``tokens``;
:func:`inputs_and_targets` turns a micro-batch into ``(x, y)`` with such targets set to -1 (ignored by the loss).
"""
from __future__ import annotations

from typing import Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn

from nanolit.common import NanolitError, get_base_dir
from nanolit.data.chat import render_conversation
from nanolit.data.datamodule import BaseDataModule
from nanolit.data.loader import grad_accum_steps
from nanolit.data.tasks import Task, build_mid_mixture
from nanolit.tokenizer import Tokenizer

STATE_KEYS = ("cursor", "it", "wrapped", "progress", "buffer", "buffer_mask")


def inputs_and_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from rows of ``T+1`` tokens (``[..., T+1]``): inputs are ids, targets are ids or -1 where masked.

    Without masking this is just ``tokens[..., :-1], tokens[..., 1:]``.
    """
    x, y = tokens[..., :-1], tokens[..., 1:]
    return torch.where(x < 0, ~x, x), torch.where(y < 0, -1, y)


class _Packer:
    """One rank's packed conversation stream (nanochat d575940 scripts/mid_train.py), one micro-batch (``B*T + 1``
    tokens) per :meth:`fetch`."""

    def __init__(
        self,
        dataset: Task,
        tokenizer,
        needed: int,
        rank: int,
        world_size: int,
        mask_user_tokens: bool,
        train: bool,
        progress_horizon: int = -1,
        state: dict | None = None,
    ):
        self.dataset, self.tokenizer, self.needed = dataset, tokenizer, needed
        self.world_size, self.mask_user_tokens, self.train = world_size, mask_user_tokens, train
        self.progress_horizon = progress_horizon  # micro-batches in the run, or -1: progress by cursor
        self.size = len(dataset)
        if self.size < world_size:
            raise NanolitError(
                f"the mid-training mixture has {self.size} conversations, fewer than the {world_size} ranks; "
                "add data or use fewer devices"
            )
        self.micro = 0
        self.cursor, self.wrapped, self.progress = rank, False, 0.0
        self.ids: list[int] = []
        self.mask: list[int] = []
        if state is not None:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise NanolitError(f"mid loader state lacks {missing}; resume from a checkpoint written by MidDataModule")
        self.ids = state["buffer"].tolist()
        self.mask = state["buffer_mask"].tolist()
        if self.mask_user_tokens and len(self.mask) != len(self.ids):
            raise NanolitError("the checkpoint was written with mask_user_tokens=False; resume with the same setting")
        self.mask = self.mask if self.mask_user_tokens else []
        self.cursor, self.wrapped = int(state["cursor"]), bool(state["wrapped"])
        self.progress = float(state["progress"])
        # An approximate resume (other world size) may start past the end: wrap as the stream would have.
        while self.cursor >= self.size:
            self.cursor -= self.size
            self.wrapped = self.wrapped or self.train

    def fetch(self) -> tuple[list[int], list[int]]:
        """The next ``needed`` tokens and their render_conversation mask ([] when not masking)."""
        while len(self.ids) < self.needed:
            ids, mask = render_conversation(
                self.tokenizer, self.dataset[self.cursor], where=self.dataset.where(self.cursor)
            )
            self.ids += ids
            if self.mask_user_tokens:
                self.mask += mask
            self.cursor += self.world_size
            if self.cursor >= self.size:
                self.cursor -= self.size
                # nanochat d575940 scripts/mid_train.py: only the train split ends its epoch
                self.wrapped = self.wrapped or self.train
        ids, self.ids = self.ids[: self.needed], self.ids[self.needed :]
        mask, self.mask = self.mask[: self.needed], self.mask[self.needed :]
        self.micro += 1
        if self.train:
            # nanochat d575940 scripts/mid_train.py: by iterations when a horizon is set, else by position in the
            # mixture; the trainer keeps the max.
            if self.progress_horizon > 0:
                approx = self.micro / self.progress_horizon
            else:
                approx = self.cursor / self.size
            self.progress = max(self.progress, approx)
        return ids, mask

    def state(self) -> dict:
        """Everything a new packer needs to continue exactly from here (ints, floats and CPU tensors only)."""
        return {
            "cursor": self.cursor,
            "wrapped": self.wrapped,
            "progress": self.progress,
            "buffer": torch.tensor(self.ids, dtype=torch.int64),
            "buffer_mask": torch.tensor(self.mask, dtype=torch.int8),
        }


def _stream_tensor(micro_batches: list[tuple[list[int], list[int]]], masked: bool) -> torch.Tensor:
    """``[n, B*T+1]`` int64 from ``(ids, mask)`` micro-batches; when ``masked``, mask-0 tokens are stored as ``~id``."""
    tokens = torch.tensor([ids for ids, _ in micro_batches], dtype=torch.int64)
    if masked:
        mask = torch.tensor([mask for _, mask in micro_batches], dtype=torch.int8)
        tokens = torch.where(mask == 0, ~tokens, tokens)
    return tokens


def mid_train_steps(
    dataset: Task,
    tokenizer,
    B: int,
    T: int,
    grad_accum_steps: int = 1,
    rank: int = 0,
    world_size: int = 1,
    num_iterations: int = -1,
    mask_user_tokens: bool = False,
    resume_state: dict | None = None,
) -> Iterator[tuple[torch.Tensor, dict]]:
    """Forever: ``(tokens [A, B, T+1] int64, state)``, one optimizer step of the train mixture per item.

    ``state`` holds ``it`` (steps yielded so far, this one included), ``progress`` (nanochat d575940
    scripts/mid_train.py; for this step's LR),
    ``last_step`` (nanochat d575940 scripts/mid_train.py; do not train this step: the epoch or ``num_iterations`` is
    done) and the resume fields
    ``cursor``, ``wrapped``, ``buffer``, ``buffer_mask``; passed back as ``resume_state`` it continues exactly.
    """
    A = grad_accum_steps
    packer = _Packer(dataset, tokenizer, B * T + 1, rank, world_size, mask_user_tokens, train=True,
                     progress_horizon=num_iterations * A if num_iterations > 0 else -1, state=resume_state)
    it = int(resume_state["it"]) if resume_state is not None else 0
    packer.micro = it * A
    pending = packer.fetch()
    while True:
        epoch_done = packer.wrapped  # as of this step's first micro-batch, which nanochat already prefetched
        micro_batches = [pending] + [packer.fetch() for _ in range(A - 1)]
        it += 1
        state = {**packer.state(), "it": it}
        pending = packer.fetch()  # the next step's first micro-batch: its progress sets this step's LR
        state["progress"] = packer.progress
        state["last_step"] = epoch_done or 0 < num_iterations <= it
        rows = _stream_tensor(micro_batches, mask_user_tokens)
        yield rows.unfold(1, T + 1, T).contiguous(), state


def mid_val_batches(
    dataset: Task,
    tokenizer,
    B: int,
    T: int,
    eval_tokens: int,
    rank: int = 0,
    world_size: int = 1,
    mask_user_tokens: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``eval_tokens // (B*T*W)`` val batches ``(x [B, T], y [B, T])``: the same at every eval, like
    nanochat's val generator built afresh each time (nanochat d575940 scripts/mid_train.py)."""
    steps = eval_tokens // (B * T * world_size)
    if steps < 1:
        raise NanolitError(
            f"eval_tokens={eval_tokens} is less than one batch over all ranks (B*T*W = {B}*{T}*{world_size}); "
            f"raise eval_tokens to at least {B * T * world_size}"
        )
    packer = _Packer(dataset, tokenizer, B * T + 1, rank, world_size, mask_user_tokens, train=False)
    batches = []
    for _ in range(steps):
        x, y = inputs_and_targets(_stream_tensor([packer.fetch()], mask_user_tokens)[0])
        batches.append((x.view(B, T), y.view(B, T)))
    return batches


class MidDataModule(BaseDataModule):
    """nanochat's mid-training data (nanochat d575940 scripts/mid_train.py) from a base dir: ``tokenizer/``,
    ``mid_data/`` and the two files
    named in :mod:`nanolit.data.tasks`. Batches, resume and bpb inputs work as in :class:`BaseDataModule`.

    ``progress`` and ``last_step`` describe the step the model is consuming (set as each batch arrives): the mid
    LR schedule reads ``progress``, and a batch with ``last_step`` is not trained but ends the run (nanochat d575940
    scripts/mid_train.py).

    Args:
        base_dir: nanochat-layout base directory (see :func:`nanolit.common.get_base_dir`).
        device_batch_size, max_seq_len, total_batch_size, eval_tokens: mid_train's knobs (nanochat d575940
        scripts/mid_train.py).
        num_iterations: stop after this many steps; -1 runs one epoch of the mixture.
        mask_user_tokens: train only on the assistant's tokens (render_conversation's mask); nanochat trains on all
        (False).
    """

    def __init__(
        self,
        base_dir: str | None = None,
        device_batch_size: int = 32,
        max_seq_len: int = 2048,
        total_batch_size: int = 524288,
        eval_tokens: int = 20 * 524288,
        num_iterations: int = -1,
        mask_user_tokens: bool = False,
    ):
        super().__init__(base_dir, device_batch_size, max_seq_len, total_batch_size, eval_tokens)
        # Record mid's own arguments; the base class's tokenizer-thread knobs do not apply to chat rendering.
        self.save_hyperparameters(ignore=["tokenizer_threads", "tokenizer_batch_size"])
        self.num_iterations = num_iterations
        self.mask_user_tokens = mask_user_tokens
        self.progress = 0.0
        self.last_step = False
        self._train_mixture: Task | None = None
        self._val_mixture: Task | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and both mixtures (once), and work out ``grad_accum_steps`` for this world size."""
        if self._tokenizer is None:
            base = get_base_dir(self.base_dir)
            self._tokenizer = Tokenizer.from_directory(base / "tokenizer")
            self._train_mixture = build_mid_mixture(base, "train")
            self._val_mixture = build_mid_mixture(base, "val")
        _, world_size = self._rank_and_world()
        self.grad_accum_steps = grad_accum_steps(
            self.total_batch_size, self.device_batch_size, self.max_seq_len, world_size
        )

    def val_dataloader(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed val-mixture batches ``(x [B, T], y [B, T])`` this rank scores at every eval (built once)."""
        if self._val is None:
            self.setup()
            rank, world_size = self._rank_and_world()
            self._val = mid_val_batches(
                self._val_mixture, self._tokenizer, self.device_batch_size, self.max_seq_len, self.eval_tokens,
                rank, world_size, self.mask_user_tokens,
            )
        return self._val

    def _open_stream(self) -> Iterator[tuple[torch.Tensor, dict]]:
        if self._stream is not None:
            self._stream.close()
        if self.grad_accum_steps is None:
            self.setup()
        rank, world_size = self._rank_and_world()
        self._stream = mid_train_steps(
            self._train_mixture, self._tokenizer, self.device_batch_size, self.max_seq_len, self.grad_accum_steps,
            rank, world_size, self.num_iterations, self.mask_user_tokens, resume_state=self._consumed,
        )
        return self._stream

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Record the consumed step's loader state, ``progress`` and ``last_step``; pass the tokens on."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if self.trainer is not None and self.trainer.training:
            self.progress, self.last_step = self._consumed["progress"], self._consumed["last_step"]
        return batch

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume after the checkpoint's last consumed step: exact with the same number of ranks.

        With another number of ranks each rank restarts from the smallest saved cursor (offset by its rank) with
        an empty buffer, so a few conversations are seen twice.
        """
        saved = state_dict.get("train_loader")
        if not saved:
            return
        rank, world_size = self._rank_and_world()
        if len(saved) == world_size:
            self._consumed = dict(saved[rank])
        else:
            rank_zero_warn(
                f"the checkpoint's mid data position was saved by {len(saved)} rank(s) and this run has {world_size}; "
                "resuming each rank near the slowest saved one, which repeats a few conversations"
            )
            empty = torch.zeros(0, dtype=torch.int64)
            cursor = min(int(s["cursor"]) for s in saved) + rank
            self._consumed = {**saved[0], "cursor": cursor, "buffer": empty, "buffer_mask": empty.to(torch.int8)}
        self.progress, self.last_step = self._consumed["progress"], self._consumed["last_step"]

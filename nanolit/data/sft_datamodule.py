"""``SFTDataModule``: chat_sft's batches (nanochat d575940 scripts/chat_sft.py) as optimizer steps, exactly resumable.

One training item is one optimizer step: ``grad_accum_steps`` micro-batches ``(inputs, targets)`` of
``device_batch_size`` whole conversations each, padded to that micro-batch's longest conversation (widths differ
between micro-batches, so a step is a list of pairs rather than one tensor), targets -1 where the loss must not look
(:mod:`nanolit.data.sft`). The loader yields ``(micro_batches, state)``; as in :class:`BaseDataModule` the state of
the step the model consumed is recorded as the batch arrives and saved with that step's checkpoint.

The state is one number per rank, ``examples``: how many of its conversations the rank has consumed. After every
step it holds whole micro-batches, so no half-built batch is ever pending, and that number alone resumes exactly.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn

from nanolit.common import NanolitError, get_base_dir
from nanolit.data.chat import MAX_TOKENS
from nanolit.data.datamodule import BaseDataModule
from nanolit.data.loader import check_batch_knobs
from nanolit.data.sft import (
    DEVICE_BATCH_SIZE, TARGET_EXAMPLES_PER_STEP, build_sft_mixture, build_sft_val, sft_batches, sft_grad_accum_steps,
)
from nanolit.data.tasks import Task
from nanolit.tokenizer import Tokenizer

EVAL_STEPS = 100  # chat_sft's eval_steps: val batches per val-loss evaluation

Step = list[tuple[torch.Tensor, torch.Tensor]]


def sft_train_steps(dataset: Task, tokenizer, device_batch_size: int, grad_accum_steps: int, rank: int = 0,
                    world_size: int = 1, examples: int = 0, max_tokens: int = MAX_TOKENS
                    ) -> Iterator[tuple[Step, dict]]:
    """Forever: ``(grad_accum_steps micro-batches (inputs, targets), {"examples": n})``, ``n`` this rank's
    conversations consumed once the step is trained. ``examples`` resumes after that many."""
    batches = sft_batches(dataset, tokenizer, device_batch_size, rank, world_size, start=examples,
                          max_tokens=max_tokens)
    while True:
        step = list(itertools.islice(batches, grad_accum_steps))
        examples += grad_accum_steps * device_batch_size
        yield step, {"examples": examples}


def check_examples_knob(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NanolitError(f"{name} must be a positive whole number, got {value!r}")
    return value


class SFTDataModule(BaseDataModule):
    """chat_sft's data from a base dir: ``tokenizer/``, the task files of :func:`nanolit.data.sft.build_sft_mixture`
    (ARC, GSM8K, SmolTalk, identity conversations, a word list) and SmolTalk test for validation.

    Args:
        base_dir: nanochat-layout base directory (see :func:`nanolit.common.get_base_dir`).
        device_batch_size: conversations per micro-batch (linked from the module).
        target_examples_per_step: conversations per optimizer step over all ranks (linked from the module).
        max_seq_len: where a conversation is cut, in tokens (linked from the module; nanochat's 2048).
        eval_steps: val batches scored at each val-loss evaluation (chat_sft's ``eval_steps``).
    """

    def __init__(
        self,
        base_dir: str | None = None,
        device_batch_size: int = DEVICE_BATCH_SIZE,
        target_examples_per_step: int = TARGET_EXAMPLES_PER_STEP,
        max_seq_len: int = MAX_TOKENS,
        eval_steps: int = EVAL_STEPS,
    ):
        check_batch_knobs(max_seq_len, device_batch_size, 1)
        check_examples_knob("target_examples_per_step", target_examples_per_step)
        check_examples_knob("eval_steps", eval_steps)
        # The base class's token budgets, as the padded capacity they stand for here (nothing reads them as tokens).
        super().__init__(base_dir, device_batch_size, max_seq_len, target_examples_per_step * max_seq_len,
                         eval_steps * device_batch_size * max_seq_len)
        self.save_hyperparameters(ignore=["tokenizer_threads", "tokenizer_batch_size"])
        self.target_examples_per_step = target_examples_per_step
        self.eval_steps = eval_steps
        self._train_mixture: Task | None = None
        self._val_set: Task | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and both sets (once), and work out ``grad_accum_steps`` for this world size."""
        if self._tokenizer is None:
            base = get_base_dir(self.base_dir)
            self._tokenizer = Tokenizer.from_directory(base / "tokenizer")
            try:
                self._train_mixture, self._val_set = build_sft_mixture(base), build_sft_val(base)
            except NanolitError as e:
                raise NanolitError(f"SFT data is missing: {e}") from None
        _, world_size = self._rank_and_world()
        self.grad_accum_steps = sft_grad_accum_steps(self.target_examples_per_step, self.device_batch_size,
                                                     world_size)

    @property
    def num_train_examples(self) -> int:
        """Conversations in the train mixture (chat_sft's ``len(train_ds)``, which sets the horizon)."""
        self.setup()
        return len(self._train_mixture)

    def val_dataloader(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``eval_steps`` val batches of this rank: the same at every evaluation, as chat_sft builds its
        val loader afresh each time (built once here)."""
        if self._val is None:
            self.setup()
            rank, world_size = self._rank_and_world()
            batches = sft_batches(self._val_set, self._tokenizer, self.device_batch_size, rank, world_size,
                                  max_tokens=self.max_seq_len)
            self._val = list(itertools.islice(batches, self.eval_steps))
        return self._val

    def _open_stream(self) -> Iterator[tuple[Step, dict]]:
        if self._stream is not None:
            self._stream.close()
        self.setup()
        rank, world_size = self._rank_and_world()
        examples = self._consumed["examples"] if self._consumed is not None else 0
        self._stream = sft_train_steps(self._train_mixture, self._tokenizer, self.device_batch_size,
                                       self.grad_accum_steps, rank, world_size, examples, self.max_seq_len)
        return self._stream

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume after the checkpoint's last consumed step: exact with the same number of ranks.

        With another number of ranks the run continues from the same number of conversations over all ranks, each
        rank at its share of it; where an epoch ends a few conversations are then seen twice or skipped.
        """
        saved = state_dict.get("train_loader")
        if not saved:
            return
        if not all("examples" in s for s in saved):
            raise NanolitError("the checkpoint's data position is not an SFT one (no 'examples'); resume an SFT run "
                               "from its own checkpoint")
        rank, world_size = self._rank_and_world()
        if len(saved) == world_size:
            self._consumed = dict(saved[rank])
            return
        total = sum(int(s["examples"]) for s in saved)
        rank_zero_warn(f"the checkpoint's SFT data position was saved by {len(saved)} rank(s) and this run has "
                       f"{world_size}; continuing from the same {total} conversations over all ranks")
        self._consumed = {"examples": total // world_size}


__all__ = ["SFTDataModule", "sft_train_steps"]

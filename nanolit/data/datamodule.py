"""``BaseDataModule``: pretraining shards and tokenizer from a nanochat base dir, exactly resumable (nanochat d575940
scripts/base_train.py, nanochat/dataloader.py).

Each training batch is one optimizer step, ``tokens [A, B, T+1]`` with ``A = grad_accum_steps``. The loader yields
``(tokens, state)``; the state of the step the model actually consumed is recorded in ``on_before_batch_transfer`` and
saved through ``state_dict()``. Lightning's own stateful-loader support would save the state of the batch it has
already prefetched and skip one step on resume, so the returned loader has no ``state_dict``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import lightning.pytorch as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities import rank_zero_warn

from nanolit.common import NanolitError, get_base_dir
from nanolit.data.loader import TrainTokenStream, check_batch_knobs, grad_accum_steps, resume_state_for_rank, val_batches
from nanolit.data.bestfit import BestFitTokenStream, bestfit_val_batches
from nanolit.data.bestfit import resume_state_for_rank as bestfit_resume_state
from nanolit.data.shards import check_shards_have_text, data_dir_2026, list_parquet_files, train_val_split
from nanolit.tokenizer import Tokenizer


class _TrainSteps:
    """What ``train_dataloader()`` returns: each ``iter()`` opens a stream at the last consumed step.

    Opening at iteration time (not when Lightning asks for the loader) means a checkpoint restored in between is
    always honoured. No ``state_dict`` here on purpose: see the module docstring.
    """

    def __init__(self, datamodule: "BaseDataModule"):
        self._datamodule = datamodule

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        return self._datamodule._open_stream()


class BaseDataModule(L.LightningDataModule):
    """Pretraining data from ``<base_dir>/base_data/*.parquet`` (last file = val) and ``<base_dir>/tokenizer``.

    Argument names and defaults are base_train's (nanochat d575940 scripts/base_train.py). ``total_batch_size`` is
    tokens per optimizer step over all ranks; ``eval_tokens`` is how many val tokens the bpb evaluation scores.
    """

    def __init__(
        self,
        base_dir: str | None = None,
        device_batch_size: int = 32,
        max_seq_len: int = 2048,
        total_batch_size: int = 524288,
        eval_tokens: int = 20 * 524288,
        tokenizer_threads: int = 4,
        tokenizer_batch_size: int = 128,
    ):
        super().__init__()
        self._check_batch_knobs(max_seq_len, device_batch_size, total_batch_size)
        if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 1:
            raise NanolitError(f"eval_tokens must be a positive number of tokens, got {eval_tokens!r}")
        self.save_hyperparameters()
        self.base_dir = base_dir
        self.device_batch_size = device_batch_size
        self.max_seq_len = max_seq_len
        self.total_batch_size = total_batch_size
        self.eval_tokens = eval_tokens
        self.tokenizer_threads = tokenizer_threads
        self.tokenizer_batch_size = tokenizer_batch_size
        self.grad_accum_steps: int | None = None
        self._tokenizer: Tokenizer | None = None
        self._train_files = self._val_files = None
        self._consumed: dict | None = None  # this rank's loader state after the last step the model consumed
        self._stream: TrainTokenStream | None = None
        self._val: list | None = None

    # -- setup and properties --------------------------------------------------------------------------------------

    @staticmethod
    def _check_batch_knobs(max_seq_len: int, device_batch_size: int, total_batch_size: int) -> None:
        check_batch_knobs(max_seq_len, device_batch_size, total_batch_size)

    def data_dir(self, base: Path) -> Path:
        """Where the shards are: ``<base_dir>/base_data``."""
        return base / "base_data"

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer, list the shards (once) and work out ``grad_accum_steps`` for this world size."""
        if self._tokenizer is None:
            base = get_base_dir(self.base_dir)
            files = list_parquet_files(self.data_dir(base))
            if not files:
                raise NanolitError(
                    f"no parquet shards in {self.data_dir(base)}; run `nanolit data download -n 2` or "
                    "`nanolit data from-text`, or point --data.base_dir at a nanochat base dir"
                )
            self._train_files, self._val_files = train_val_split(files)
            check_shards_have_text(files)
            self._tokenizer = Tokenizer.from_directory(base / "tokenizer")
        self.grad_accum_steps = self._resolved_grad_accum()

    def _resolved_grad_accum(self) -> int | None:
        """Micro-batches per optimizer step for this world size."""
        _, world_size = self._rank_and_world()
        return grad_accum_steps(self.total_batch_size, self.device_batch_size, self.max_seq_len, world_size)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self.setup()
        return self._tokenizer

    @property
    def token_bytes(self) -> torch.Tensor:
        """int32 [V]: bytes per token id (0 for special tokens), the bpb denominator (nanochat d575940
        nanochat/loss_eval.py)."""
        return self.tokenizer.token_bytes()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    # -- loaders ---------------------------------------------------------------------------------------------------

    def train_dataloader(self) -> _TrainSteps:
        """An endless iterable of ``(tokens [A, B, T+1] int64, loader state)``, one item per optimizer step."""
        return _TrainSteps(self)

    def val_dataloader(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed val batches ``(x [B, T], y [B, T])`` this rank scores at every eval (nanochat d575940
        scripts/base_train.py; built once)."""
        if self._val is None:
            self.setup()
            rank, world_size = self._rank_and_world()
            self._val = val_batches(
                self._val_files, self._tokenizer, self.device_batch_size, self.max_seq_len, self.eval_tokens,
                rank, world_size, self.tokenizer_threads, self.tokenizer_batch_size,
            )
        return self._val

    def _open_stream(self) -> TrainTokenStream:
        if self._stream is not None:
            self._stream.close()
        if self.grad_accum_steps is None:
            self.setup()
        rank, world_size = self._rank_and_world()
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        self._stream = TrainTokenStream(
            self._train_files, self._tokenizer, self.device_batch_size, self.max_seq_len, self.grad_accum_steps,
            rank, world_size, resume_state=self._consumed, tokenizer_threads=self.tokenizer_threads,
            tokenizer_batch_size=self.tokenizer_batch_size, pin_memory=on_cuda,
        )
        return self._stream

    def teardown(self, stage: str | None = None) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    # -- batches and resume state ------------------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Strip the loader state off a training batch and remember it: this is the step being consumed."""
        if self.trainer is not None and self.trainer.training:
            batch, self._consumed = batch
        return batch

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Copies from pinned memory without blocking on CUDA, so the copy overlaps the previous step's kernels."""
        if device.type != "cuda":
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        pinned = apply_to_collection(batch, torch.Tensor, lambda t: t if t.is_pinned() else t.pin_memory())
        return apply_to_collection(pinned, torch.Tensor, lambda t: t.to(device, non_blocking=True))

    def state_dict(self) -> dict:
        """``{"train_loader": [state of rank 0, rank 1, ...]}`` after the last consumed step ({} before any)."""
        if self._consumed is None:
            return {}
        _, world_size = self._rank_and_world()
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            # Lightning writes rank 0's copy of this dict, so every rank's position must be in it (called on all ranks).
            states = [None] * world_size
            dist.all_gather_object(states, self._consumed)
            return {"train_loader": states}
        return {"train_loader": [self._consumed]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the next ``train_dataloader()`` iteration right after the checkpoint's last step."""
        saved = state_dict.get("train_loader")
        if not saved:
            return
        rank, world_size = self._rank_and_world()
        self._consumed, exact = self.resume_rule(saved, rank, world_size)
        if not exact:
            rank_zero_warn(
                f"the checkpoint's data position was saved by {len(saved)} rank(s) (or by nanochat) and this run has "
                f"{world_size}; resuming by nanochat's rule (the next row-group stride), which skips some documents"
            )

    @staticmethod
    def resume_rule(saved: list[dict], rank: int, world_size: int) -> tuple[dict, bool]:
        """``(this rank's start state, exact?)`` from the states the checkpoint holds, one per rank."""
        return resume_state_for_rank(saved, rank, world_size)

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size


class BestFitDataModule(BaseDataModule):
    """nanochat 92d63d4's pretraining data: rows packed BOS-aligned, best-fit from a buffer of documents
    (``nanolit.data.bestfit``), from ``<base_dir>/base_data_climbmix`` or else ``base_data``; val batches the same
    way. ``total_batch_size=-1`` (the 2026 recipe's automatic batch) takes the module's ``tokens_per_step``, which
    the module derives from the depth. Resume is exact, the epoch included; a nanochat state resumes by its rule.
    """

    @staticmethod
    def _check_batch_knobs(max_seq_len: int, device_batch_size: int, total_batch_size: int) -> None:
        check_batch_knobs(max_seq_len, device_batch_size, total_batch_size if total_batch_size != -1 else 1)

    def data_dir(self, base: Path) -> Path:
        return data_dir_2026(base)

    def _resolved_grad_accum(self) -> int | None:
        """With ``total_batch_size=-1`` the module's ``tokens_per_step`` (None until a module with one is attached)."""
        total = self.total_batch_size
        if total == -1:
            module = self.trainer.lightning_module if self.trainer is not None else None
            total = getattr(module, "tokens_per_step", -1) if module is not None else -1
            if total == -1:
                return None
        _, world_size = self._rank_and_world()
        return grad_accum_steps(total, self.device_batch_size, self.max_seq_len, world_size)

    def val_dataloader(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._val is None:
            self.setup()
            rank, world_size = self._rank_and_world()
            self._val = bestfit_val_batches(self._val_files, self._tokenizer, self.device_batch_size,
                                            self.max_seq_len, self.eval_tokens, rank, world_size,
                                            self.tokenizer_threads, self.tokenizer_batch_size)
        return self._val

    def _open_stream(self) -> BestFitTokenStream:
        if self._stream is not None:
            self._stream.close()
        self.setup()
        if self.grad_accum_steps is None:
            raise NanolitError("total_batch_size=-1 picks the batch from the model: use it with the 2026 module "
                               "(nanolit.module2026.GPT2026Module), or give a number of tokens")
        rank, world_size = self._rank_and_world()
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        self._stream = BestFitTokenStream(
            self._train_files, self._tokenizer, self.device_batch_size, self.max_seq_len,
            self.grad_accum_steps, rank, world_size, resume_state=self._consumed,
            tokenizer_threads=self.tokenizer_threads, tokenizer_batch_size=self.tokenizer_batch_size,
            pin_memory=on_cuda)
        return self._stream

    @staticmethod
    def resume_rule(saved: list[dict], rank: int, world_size: int) -> tuple[dict, bool]:
        return bestfit_resume_state(saved, rank, world_size)

"""Toys for the callback tests: a character tokenizer, a bigram LightningModule and a DataModule.

None of this is nanolit's GPT: the callbacks must work with any module that implements their small protocol.
This file holds no tests; the test_cb_*.py files import from it.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"()*+-=/\né"
TEXT = "the cat sat on the mat. the dog ate the hat. a cat is not a dog, and é is two bytes.\n"


class CharTokenizer:
    """Id 0 is ``<|bos|>`` (0 bytes), then one id per character of CHARS, then an unknown-character id."""

    def __init__(self) -> None:
        self.unk = len(CHARS) + 1

    def get_vocab_size(self) -> int:
        return len(CHARS) + 2

    def get_bos_token_id(self) -> int:
        return 0

    def _encode_one(self, text: str, prepend: int | None) -> list[int]:
        ids = [CHARS.index(c) + 1 if c in CHARS else self.unk for c in text]
        return ([prepend] if prepend is not None else []) + ids

    def encode(self, text: str | list[str], prepend: int | None = None) -> list[int] | list[list[int]]:
        if isinstance(text, list):
            return [self._encode_one(t, prepend) for t in text]
        return self._encode_one(text, prepend)

    def decode(self, ids: list[int]) -> str:
        return "".join("<|bos|>" if i == 0 else "?" if i == self.unk else CHARS[i - 1] for i in ids)

    def token_bytes(self) -> torch.Tensor:
        sizes = [0] + [len(c.encode("utf-8")) for c in CHARS] + [1]
        return torch.tensor(sizes, dtype=torch.int32)


class FakeClock:
    """A stand-in for ``time.perf_counter``: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Bigram(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table(idx)


@torch.no_grad()
def greedy_bigram(model: nn.Module, tokens: list[int], max_tokens: int, device) -> list[int]:
    """Greedy continuation by a bigram model: each token from the previous one alone."""
    out, last = [], tokens[-1]
    for _ in range(max_tokens):
        last = int(model(torch.tensor([[last]], device=device))[0, -1].argmax())
        out.append(last)
    return out


class ToyModule(L.LightningModule):
    """A bigram language model implementing the callback protocol (automatic optimization, SGD + momentum)."""

    def __init__(self, vocab_size: int, batch_size: int = 4, seq_len: int = 8, num_iterations: int = 8,
                 lr: float = 0.5, step_seconds: float = 0.0, eval_seconds: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Bigram(vocab_size)
        self.flops_per_token = 6.0 * vocab_size * vocab_size
        self.tokens_per_step = batch_size * seq_len
        self.num_iterations = num_iterations
        self.last_train_loss: torch.Tensor | None = None
        self.clock: FakeClock | None = None  # tests that time steps install one

    @property
    def eval_model(self) -> nn.Module:
        return self.model

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
        self.last_train_loss = loss.detach()
        if self.clock is not None:
            self.clock.advance(self.hparams.step_seconds)
        return {"loss": loss}

    def loss_per_token(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.clock is not None:
            self.clock.advance(self.hparams.eval_seconds)
        logits = self.model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1), ignore_index=-1,
                               reduction="none")

    def generate(self, tokens: list[int], max_tokens: int) -> list[int]:
        return greedy_bigram(self.model, tokens, max_tokens, self.device)

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.parameters(), "name": "bigram"}], lr=self.hparams.lr,
                               momentum=0.9)


def make_batches(tokenizer: CharTokenizer, batch_size: int, seq_len: int, count: int, offset: int = 0,
                 ignore_every: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches ``(x, y)`` from TEXT with ``<|bos|>`` before each copy; every ``ignore_every``-th
    target is set to -1 (ignored)."""
    stream = tokenizer.encode([TEXT] * 50, prepend=tokenizer.get_bos_token_id())
    flat = torch.tensor([i for doc in stream for i in doc])
    needed = batch_size * seq_len + 1
    batches = []
    for b in range(count):
        start = offset + b * needed
        chunk = flat[start:start + needed]
        x, y = chunk[:-1].view(batch_size, seq_len).clone(), chunk[1:].view(batch_size, seq_len).clone()
        if ignore_every:
            y.view(-1)[::ignore_every] = -1
        batches.append((x, y))
    return batches


class ToyData(L.LightningDataModule):
    """The same training batch every step (so a resumed or a DDP run sees the same data), fixed val batches."""

    def __init__(self, batch_size: int = 4, seq_len: int = 8, val_batches: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = CharTokenizer()
        self.token_bytes = self.tokenizer.token_bytes()
        self.train_batch = make_batches(self.tokenizer, batch_size, seq_len, 1)[0]
        self.val_batches = make_batches(self.tokenizer, batch_size, seq_len, val_batches, offset=37,
                                        ignore_every=5)
        self.val_loader_calls = 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.train_batch] * 1000, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the val batches (all of them on one process)."""
        self.val_loader_calls += 1
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader(self.val_batches[rank::world], batch_size=None)


def toy_pair(num_iterations: int = 8, **module_kwargs) -> tuple[ToyModule, ToyData]:
    torch.manual_seed(0)
    data = ToyData()
    return ToyModule(data.tokenizer.get_vocab_size(), num_iterations=num_iterations, **module_kwargs), data


def make_trainer(root: Path, callbacks: list, max_steps: int, **kwargs) -> L.Trainer:
    """A quiet CPU trainer logging to CSV under ``root``; ``max_steps`` optimizer steps."""
    options = dict(default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=1, callbacks=callbacks,
                   logger=CSVLogger(root, name="run", version=0), enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                   limit_val_batches=0, num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(**options)


def reference_bpb(model: nn.Module, batches, token_bytes: torch.Tensor) -> float:
    """Bits per byte computed token by token in float64, straight from the definition (nanochat d575940
    nanochat/loss_eval.py)."""
    nats, total_bytes = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logp = torch.log_softmax(model(x).double(), dim=-1)
            for b in range(y.shape[0]):
                for t in range(y.shape[1]):
                    target = int(y[b, t])
                    if target < 0 or int(token_bytes[target]) == 0:
                        continue
                    nats -= float(logp[b, t, target])
                    total_bytes += int(token_bytes[target])
    return nats / (math.log(2) * total_bytes)

"""What the callbacks need from a LightningModule and a DataModule, as typed protocols checked at ``setup``.

Any project's module works with the callbacks once it has the members a callback lists here; nothing else of
nanolit is needed. Each callback checks its protocols in ``setup`` and names what is missing in one line.

========================  ==============================================================================
callback                  needs
========================  ==============================================================================
``BPBValidation``         module: :class:`LossPerToken`; datamodule: :class:`TokenData`
``COREEvaluation``        module: :class:`HasEvalModel`; datamodule: :class:`HasTokenizer`
``Sampler``               module: :class:`Generates`; datamodule: :class:`HasTokenizer`
``TokenThroughputMonitor`` module: :class:`TokenCounts`
``ValidationLoss``        module: :class:`LossPerToken`; datamodule: :class:`ValBatches`
``ChatEvaluation``        module: :class:`HasEvalModel` whose ``eval_model`` is a :class:`ChatModel`; datamodule:
                          :class:`HasTokenizer` whose ``tokenizer`` is a :class:`ChatTokenizer`
``EMALossLogger``         nothing (optional ``last_train_loss`` on the module, see its docstring)
``ReportWriter``          nothing (optional :class:`TokenCounts` and ``num_iterations`` for the run facts)
``NanoProgressBar``       nothing (optional ``num_iterations``, see :class:`HasHorizon`)
``StepCheckpoint``,
``PreemptionCheckpoint``  nothing
========================  ==============================================================================
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol, runtime_checkable

import torch

from nanolit.common import NanolitError


@runtime_checkable
class LossPerToken(Protocol):
    """``loss_per_token(x[B, T], y[B, T]) -> Tensor[B*T]``: cross-entropy in nats per target, ``reduction='none'``,
    0 where ``y == -1`` (ignored)."""

    def loss_per_token(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class HasEvalModel(Protocol):
    """``eval_model``: an uncompiled ``nn.Module`` with ``model(idx[B, T]) -> logits[B, T, V]`` for prompts of any
    length. A model with a context limit (a learned position table, say) gives it as ``eval_model.max_seq_len``;
    CORE then crops prompts from the left, as nanochat does for such models."""

    eval_model: torch.nn.Module


@runtime_checkable
class Generates(Protocol):
    """``generate(tokens, max_tokens) -> list[int]``: greedy, the tokens after the prompt (it may stop early). Runs on
    rank zero alone, so it must not call collectives (use the unwrapped model, not the DDP wrapper)."""

    def generate(self, tokens: list[int], max_tokens: int) -> list[int]: ...


@runtime_checkable
class TokenCounts(Protocol):
    """``tokens_per_step``: tokens per optimizer step over all ranks; ``flops_per_token``: forward + backward."""

    tokens_per_step: int
    flops_per_token: float


@runtime_checkable
class HasHorizon(Protocol):
    """``num_iterations``: optimizer steps of the run, ``-1`` while unknown (mid-training ends with its epoch)."""

    num_iterations: int


@runtime_checkable
class Tokenizer(Protocol):
    """``encode(text | list[str], prepend=None)``, ``decode(ids)``, ``get_bos_token_id()``."""

    def encode(self, text: Any, prepend: int | None = None) -> Any: ...

    def decode(self, ids: list[int]) -> str: ...

    def get_bos_token_id(self) -> int: ...


@runtime_checkable
class HasTokenizer(Protocol):
    """A DataModule with a ``tokenizer`` (:class:`Tokenizer`)."""

    tokenizer: Tokenizer


@runtime_checkable
class TokenData(Protocol):
    """A DataModule with ``val_dataloader()`` yielding ``(x, y)`` (this rank's share of the same tokens at every
    evaluation) and ``token_bytes``: an int tensor ``[V]`` of UTF-8 bytes per token id (0 for special tokens), or a
    function returning it."""

    token_bytes: Any

    def val_dataloader(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


@runtime_checkable
class ValBatches(Protocol):
    """A DataModule whose ``val_dataloader()`` yields ``(x, y)`` with -1 at ignored targets: this rank's share of the
    same batches at every evaluation."""

    def val_dataloader(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


@runtime_checkable
class ChatTokenizer(Protocol):
    """A :class:`Tokenizer` with chat's special tokens: ``encode_special(name) -> id`` (``<|user_start|>``...)."""

    def encode(self, text: Any, prepend: int | None = None) -> Any: ...

    def decode(self, ids: list[int]) -> str: ...

    def get_bos_token_id(self) -> int: ...

    def encode_special(self, name: str) -> int: ...


@runtime_checkable
class ChatModel(Protocol):
    """What ``nanolit.eval.chat`` runs: ``get_device()``, ``config`` (layers, heads, width: the KV cache's shape) and
    ``forward(idx[B, T], kv_cache=None) -> logits[B, T, V]`` (nanolit's GPT and GPT2026 have all three)."""

    config: Any

    def get_device(self) -> torch.device: ...

    def forward(self, idx: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor: ...


def require(obj: Any, protocol: type, owner: str, what: str) -> None:
    """Raise one line naming what ``obj`` lacks of ``protocol``, for callback ``owner`` (``what``: "module"...)."""
    if isinstance(obj, protocol):
        return
    members = [name for name in protocol.__dict__.get("__annotations__", {})] + \
        [name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")]
    missing = [name for name in members if not hasattr(obj, name)] or members
    name = type(obj).__name__ if obj is not None else f"no {what}"
    raise NanolitError(f"{owner} needs {name} to have {', '.join(missing)} ({protocol.__name__}: "
                       f"{(protocol.__doc__ or '').split(';')[0].strip()}); add it or remove the callback")


__all__ = ["ChatModel", "ChatTokenizer", "Generates", "HasEvalModel", "HasHorizon", "HasTokenizer", "LossPerToken",
           "TokenCounts", "TokenData", "Tokenizer", "ValBatches", "require"]

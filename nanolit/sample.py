"""Completions of plain-text prompts by a (base) model: what base_train and base_loss print (nanochat d575940)."""
from __future__ import annotations

from typing import Iterable, Iterator

from nanolit.engine import Engine

MAX_TOKENS = 16  # base_train and base_loss sample 16 tokens per prompt at temperature 0

# nanochat d575940 scripts/base_train.py's prompts, in order.
NANOCHAT_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def complete(model, tokenizer, prompts: Iterable[str], max_tokens: int = MAX_TOKENS, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 42) -> Iterator[list[int]]:
    """For each prompt: ``<|bos|>`` + its tokens + up to ``max_tokens`` generated ones (a ``<|bos|>`` ends early).

    Generation runs through the KV-cache :class:`~nanolit.engine.Engine`, as base_loss does.
    """
    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=bos)
        rows, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                        top_k=top_k, seed=seed)
        yield rows[0]


def sample_lines(model, tokenizer, prompts: Iterable[str], **kwargs) -> Iterator[str]:
    """The text base_loss prints per prompt: the decoded ``<|bos|>``, prompt and completion."""
    for tokens in complete(model, tokenizer, prompts, **kwargs):
        yield tokenizer.decode(tokens)

"""Inference: KV cache, sampling and the streaming generation engine with the calculator tool (nanochat d575940
nanochat/engine.py)."""
from __future__ import annotations

import ast
import contextlib
import math
import operator
from collections import deque
from typing import Iterator

import torch
import torch.nn.functional as F

from nanolit.common import autocast_context


class KVCache:
    """Keys and values of every layer in one tensor ``[L, 2, B, Hkv, T, D]``, allocated on first insert.

    The tensor takes k's dtype and device (bf16 under autocast) and grows along T in steps of 1024 when a
    prompt outruns it (nanochat d575940 nanochat/engine.py). ``prev_embedding`` ``[B, 1, C]`` is the 2026 GPT's smear
    state: the last cached token's embedding (None until a 2026 model writes it; the d575940 GPT never does).
    """

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int):
        self.kv_shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv_cache: torch.Tensor | None = None
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None

    def reset(self) -> None:
        self.pos = 0
        self.prev_embedding = None

    def get_pos(self) -> int:
        return self.pos

    def prefill(self, other: "KVCache") -> None:
        """Copy a batch-1 cache into this (larger-batch) cache, broadcasting over the batch."""
        assert self.kv_cache is None, "prefill expects an empty cache"
        assert other.kv_cache is not None, "nothing to prefill from"
        for i, (a, b) in enumerate(zip(self.kv_shape, other.kv_shape)):
            if i in (0, 1, 3, 5):
                assert a == b, f"cache shape mismatch at dim {i}: {a} != {b}"
            elif i == 4:
                assert a >= b, f"cache too short: {a} < {b}"
        dtype, device = other.kv_cache.dtype, other.kv_cache.device
        self.kv_cache = torch.empty(self.kv_shape, dtype=dtype, device=device)
        self.kv_cache[:, :, :, :, :other.pos, :] = other.kv_cache[:, :, :, :, :other.pos, :]
        self.pos = other.pos
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.kv_shape[2], -1, -1).clone()

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ``[B, H, T_add, D]`` at the current position; return the cached prefix views."""
        if self.kv_cache is None:
            self.kv_cache = torch.empty(self.kv_shape, dtype=k.dtype, device=k.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.kv_cache.size(4):
            grow_to = math.ceil((t1 + 1024) / 1024) * 1024
            extra = list(self.kv_cache.shape)
            extra[4] = grow_to - self.kv_cache.size(4)
            self.kv_cache = torch.cat([self.kv_cache, self.kv_cache.new_empty(extra)], dim=4)
            self.kv_shape = tuple(self.kv_cache.shape)
        self.kv_cache[layer_idx, 0, :, :, t0:t1] = k
        self.kv_cache[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == self.kv_cache.size(0) - 1:  # advance once the last layer has written
            self.pos = t1
        return self.kv_cache[layer_idx, 0, :, :, :t1], self.kv_cache[layer_idx, 1, :, :, :t1]


@torch.no_grad()
def sample_next_token(logits: torch.Tensor, rng: torch.Generator | None, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """Next token ids ``[B, 1]`` from logits ``[B, V]``: argmax at temperature 0, else (top-k) sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        return idx.gather(1, torch.multinomial(probs, num_samples=1, generator=rng))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


def compute_context(model: torch.nn.Module):
    """The context generation runs the model in: bf16 autocast on CUDA for the d575940 GPT, nothing for a model
    that casts for itself (``uses_autocast = False``, the 2026 GPT)."""
    if getattr(model, "uses_autocast", True):
        return autocast_context(model.get_device())
    return contextlib.nullcontext()


@torch.inference_mode()
def generate_tokens(model: torch.nn.Module, tokens: list[int], max_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, seed: int = 42, use_kv_cache: bool = True) -> Iterator[int]:
    """Yield ``max_tokens`` ids sampled after the prompt ``tokens`` (batch 1), for any nanolit GPT.

    With a KV cache each step feeds one token, O(T) forwards; without, every step re-runs the whole sequence
    (nanochat's ``GPT.generate``). Both give the same tokens (nanochat d575940 nanochat/gpt.py).
    """
    device = model.get_device()
    c = model.config
    rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    cache = KVCache(batch_size=1, num_heads=c.n_kv_head, seq_len=len(tokens) + max_tokens,
                    head_dim=c.n_embd // c.n_head, num_layers=c.n_layer) if use_kv_cache else None
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    seq = ids
    with compute_context(model):
        for _ in range(max_tokens):
            logits = model.forward(ids if use_kv_cache else seq, kv_cache=cache)[:, -1, :]
            ids = sample_next_token(logits, rng, temperature, top_k)
            seq = torch.cat([seq, ids], dim=1)
            yield ids.item()


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_NUMBER = 1e15  # keeps products from growing without bound; the model's arithmetic is small


def _eval_node(node: ast.AST):
    """Evaluate the whitelisted subset: numbers, + - * /, unary +-, and ``'str'.count('str')``."""
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        result = _BINOPS[type(node.op)](left, right)
        if abs(result) > _MAX_NUMBER:
            raise ValueError("result too large")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_node(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.func.value.value.count(node.args[0].value)
    raise ValueError(f"disallowed expression: {type(node).__name__}")


def use_calculator(expr: str):
    """The calculator tool: arithmetic (no ``**``) or ``'word'.count('x')``; None when not allowed.

    nanochat runs ``eval`` with empty builtins under a SIGALRM timeout (main thread only); walking a
    whitelisted AST instead needs no timeout and cannot run arbitrary code.
    """
    expr = expr.replace(",", "")
    if "**" in expr:
        return None
    try:
        return _eval_node(ast.parse(expr.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError, RecursionError):
        return None


class _RowState:
    def __init__(self, tokens: list[int]):
        self.tokens = list(tokens)
        self.forced: deque[int] = deque()
        self.in_python = False
        self.python_tokens: list[int] = []
        self.completed = False


class Engine:
    """Batched streaming generation with a KV cache and the python/calculator tool state machine (nanochat d575940
    nanochat/engine.py)."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42
                 ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield ``(token_column, mask_column)`` per step; mask 0 marks tokens forced by the tool."""
        model, tok = self.model, self.tokenizer
        device, cfg = model.get_device(), model.config
        rng = torch.Generator(device=device).manual_seed(seed)
        special = {name: tok.encode_special(name) for name in (
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>", "<|assistant_end|>")}
        bos = tok.get_bos_token_id()
        head_dim = cfg.n_embd // cfg.n_head
        with compute_context(model):
            # prefill once at batch 1, then copy into the decode cache of num_samples rows
            prefill = KVCache(1, cfg.n_kv_head, len(tokens), head_dim, cfg.n_layer)
            ids = torch.tensor([tokens], dtype=torch.long, device=device)
            logits = model.forward(ids, kv_cache=prefill)[:, -1, :].expand(num_samples, -1)
            decode_len = len(tokens) + max_tokens if max_tokens is not None else cfg.sequence_len
            cache = KVCache(num_samples, cfg.n_kv_head, decode_len, head_dim, cfg.n_layer)
            cache.prefill(prefill)
            rows = [_RowState(tokens) for _ in range(num_samples)]
            generated = 0
            while True:
                if max_tokens is not None and generated >= max_tokens:
                    return
                if all(r.completed for r in rows):
                    return
                # nanolit samples the first token per row (nanochat d575940 broadcast one sample to all rows)
                sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
                column, masks = [], []
                for row, s in zip(rows, sampled):
                    forced = bool(row.forced)
                    token = row.forced.popleft() if forced else s
                    column.append(token)
                    masks.append(0 if forced else 1)
                    row.tokens.append(token)
                    self._advance_tool(row, token, special, bos)
                yield column, masks
                generated += 1
                ids = torch.tensor(column, dtype=torch.long, device=device)[:, None]
                logits = model.forward(ids, kv_cache=cache)[:, -1, :]

    def _advance_tool(self, row: _RowState, token: int, special: dict, bos: int) -> None:
        if token in (special["<|assistant_end|>"], bos):
            row.completed = True
        elif token == special["<|python_start|>"]:
            row.in_python, row.python_tokens = True, []
        elif token == special["<|python_end|>"] and row.in_python:
            row.in_python = False
            result = use_calculator(self.tokenizer.decode(row.python_tokens))
            if result is not None:
                row.forced.extend([special["<|output_start|>"], *self.tokenizer.encode(str(result)),
                                   special["<|output_end|>"]])
        elif row.in_python:
            row.python_tokens.append(token)

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Run :meth:`generate` to completion: token lists (prompt included, terminal tokens excluded) and masks."""
        tok = self.tokenizer
        terminal = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (t, m) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if t in terminal:
                    done[i] = True
                else:
                    results[i].append(t)
                    masks[i].append(m)
            if all(done):
                break
        return results, masks

"""BPE tokenizer: rustbpe trains it, tiktoken runs it; saved in nanochat's on-disk format (nanochat d575940
nanochat/tokenizer.py).

A tokenizer folder holds ``tokenizer.pkl`` (a pickled ``tiktoken.Encoding``, exactly what nanochat writes) and
``token_bytes.pt`` (nanochat d575940 nanochat/loss_eval.py; int32 [V], bytes per token id, 0 for special tokens; the bpb
denominator).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.parquet as pq
import rustbpe
import tiktoken
import torch

from nanolit.common import NanolitError, atomic_torch_save, atomic_write, get_base_dir, load_tensors

# nanochat d575940 nanochat/tokenizer.py: GPT-4's cl100k pattern, except numbers split in runs of 1-2 digits (not 1-3).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# nanochat d575940 nanochat/tokenizer.py: appended after the BPE tokens in this order, so <|bos|> = vocab_size - 9.
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

PICKLE_NAME = "tokenizer.pkl"
TOKEN_BYTES_NAME = "token_bytes.pt"
_ENCODING_STATE_KEYS = {"name", "pat_str", "mergeable_ranks", "special_tokens"}


class Tokenizer:
    """nanochat's tokenizer wrapper around a ``tiktoken.Encoding`` plus its ``token_bytes`` table (nanochat d575940
    scripts/tok_train.py)."""

    def __init__(self, enc: tiktoken.Encoding, token_bytes: torch.Tensor | None = None):
        """Wrap ``enc``; ``token_bytes`` defaults to the true byte length of every token."""
        self.enc = enc
        self._special_ids = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self._token_bytes = compute_token_bytes(enc, "raw") if token_bytes is None else token_bytes
        if self._token_bytes.shape != (enc.n_vocab,):
            raise NanolitError(
                f"token_bytes has shape {tuple(self._token_bytes.shape)} but the vocab has {enc.n_vocab} tokens; "
                "retrain the tokenizer with `nanolit tokenizer train`"
            )

    @classmethod
    def train_from_iterator(cls, text_iter: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train BPE on ``text_iter``: ``vocab_size - 9`` byte-level tokens, then the 9 special tokens (nanochat d575940
        scripts/tok_train.py)."""
        num_bpe = vocab_size - len(SPECIAL_TOKENS)
        if num_bpe < 256:
            raise NanolitError(f"vocab_size {vocab_size} is too small; it must be at least {256 + len(SPECIAL_TOKENS)}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(text_iter), num_bpe, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(piece): rank for piece, rank in trainer.get_mergeable_ranks()}
        # rustbpe stops early when no pair is left to merge; the model's vocab must be exactly vocab_size.
        if len(mergeable_ranks) != num_bpe:
            raise NanolitError(
                f"the training text only supports {len(mergeable_ranks)} BPE tokens, not {num_bpe}; "
                "train on more text or ask for a smaller vocab_size"
            )
        special_tokens = {name: num_bpe + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(
            name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        return cls(enc)

    @classmethod
    def from_directory(cls, path: str | os.PathLike, token_bytes_rule: str = "saved") -> "Tokenizer":
        """Load ``tokenizer.pkl`` through a restricted unpickler, and the ``token_bytes`` table by ``token_bytes_rule``:

        - ``"saved"``: ``token_bytes.pt`` as saved when present (nanochat's counts tokens that are not valid UTF-8 alone
        through a str round trip), so
          bpb stays comparable with the run that wrote it; a folder without one gets the raw byte lengths;
        - ``"raw"``: each token's raw bytes, whatever was saved (nanochat 92d63d4's rule: the 2026 recipe's bpb);
        - ``"str"``: nanochat d575940's rule, through the decoded string (bytes that are not UTF-8 alone count 3).
        """
        if token_bytes_rule not in ("saved", *TOKEN_BYTES_RULES):
            raise NanolitError(f"token_bytes_rule {token_bytes_rule!r} is unknown; use saved, raw or str")
        path = Path(path)
        pkl = path / PICKLE_NAME
        if not pkl.is_file():
            raise NanolitError(
                f"no {PICKLE_NAME} in {path}; run `nanolit tokenizer train` "
                "or point --data.base_dir at a nanochat base dir that has tokenizer/"
            )
        enc = _load_encoding(pkl)
        if token_bytes_rule != "saved":
            return cls(enc, compute_token_bytes(enc, token_bytes_rule))
        token_bytes = None
        if (path / TOKEN_BYTES_NAME).is_file():
            token_bytes = load_tensors(path / TOKEN_BYTES_NAME)
            if not isinstance(token_bytes, torch.Tensor):
                raise NanolitError(f"{path / TOKEN_BYTES_NAME} is not a tensor; delete it to recompute it")
            token_bytes = token_bytes.to(torch.int32)
        return cls(enc, token_bytes)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.pkl`` and ``token_bytes.pt`` into ``path`` (each file atomically)."""
        path = Path(path)
        with atomic_write(path / PICKLE_NAME) as tmp, open(tmp, "wb") as f:
            pickle.dump(self.enc, f)
        atomic_torch_save(self._token_bytes, path / TOKEN_BYTES_NAME)

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Token ids of ``text`` (or of each string in a list), with optional ids around each sequence.

        Special-token strings inside the text are encoded as plain text (nanochat d575940 scripts/tok_train.py;
        ``encode_ordinary``).
        """
        prepend_id = self._as_id(prepend)
        append_id = self._as_id(append)
        if isinstance(text, str):
            rows = [self.enc.encode_ordinary(text)]
        elif isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        else:
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        for ids in rows:
            if prepend_id is not None:
                ids.insert(0, prepend_id)
            if append_id is not None:
                ids.append(append_id)
        return rows[0] if isinstance(text, str) else rows

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD, as in tiktoken)."""
        return self.enc.decode(ids)

    def encode_special(self, name: str) -> int:
        """The id of special token ``name`` (looked up once at construction)."""
        if name not in self._special_ids:
            raise NanolitError(f"unknown special token {name!r}; known: {', '.join(self.get_special_tokens())}")
        return self._special_ids[name]

    def get_bos_token_id(self) -> int:
        """Id of ``<|bos|>``, prepended to every document (nanochat d575940 nanochat/dataloader.py)."""
        return self.encode_special("<|bos|>")

    def get_vocab_size(self) -> int:
        """Number of token ids, specials included (nanochat d575940 scripts/tok_train.py; ``enc.n_vocab``)."""
        return self.enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        """Special-token strings in id order."""
        return sorted(self._special_ids, key=self._special_ids.get)

    def id_to_token(self, id: int) -> str:
        """The text of a single token id."""
        return self.enc.decode([id])

    def token_bytes(self) -> torch.Tensor:
        """int32 [V]: UTF-8 bytes per token id, 0 for special tokens (nanochat d575940 nanochat/loss_eval.py; the bpb
        denominator)."""
        return self._token_bytes

    def _as_id(self, token: int | str | None) -> int | None:
        return self.encode_special(token) if isinstance(token, str) else token


TOKEN_BYTES_RULES = ("raw", "str")


def compute_token_bytes(enc: tiktoken.Encoding, rule: str = "raw") -> torch.Tensor:
    """int32 [V]: the bytes each token id stands for, 0 for special tokens (the bpb denominator).

    ``"raw"``: the token's raw bytes (nanochat 92d63d4 scripts/tok_train.py, and what nanolit always computed).
    ``"str"``: the UTF-8 length of the token decoded alone (nanochat d575940): a token that is not valid UTF-8 by
    itself (a lone byte >= 0x80, part of a multi-byte character) decodes to U+FFFD and counts 3 bytes per
    replacement, so such tokens are over-counted (nanochat d575940 scripts/tok_train.py).
    """
    if rule not in TOKEN_BYTES_RULES:
        raise NanolitError(f"token_bytes rule {rule!r} is unknown; use one of {', '.join(TOKEN_BYTES_RULES)}")
    special_ids = {enc.encode_single_token(name) for name in enc.special_tokens_set}

    def length(i: int) -> int:
        if rule == "raw":
            return len(enc.decode_single_token_bytes(i))
        return len(enc.decode([i]).encode("utf-8"))

    return torch.tensor([0 if i in special_ids else length(i) for i in range(enc.n_vocab)], dtype=torch.int32)


class _EncodingState:
    """Stands in for ``tiktoken.core.Encoding`` while unpickling: it keeps the pickled state and runs nothing."""

    def __setstate__(self, state) -> None:
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the one global a pickled Encoding names (``tiktoken.core.Encoding``).

    ``pickletools.dis`` on nanochat's tokenizer.pkl shows a single STACK_GLOBAL, then NEWOBJ with no arguments
    and BUILD with a dict of plain str/bytes/int values; anything else (os.system, builtins.eval, ...) is refused.
    """

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise NanolitError(
            f"{self.path} refers to {module}.{name}, which a tokenizer pickle never needs; "
            "refusing to load it (retrain with `nanolit tokenizer train`)"
        )


def _load_encoding(path: Path) -> tiktoken.Encoding:
    """Unpickle ``path`` safely, check the state's types and id range, then build the ``tiktoken.Encoding``."""
    try:
        with open(path, "rb") as f:
            obj = _EncodingUnpickler(f, path).load()
    except NanolitError:
        raise
    except Exception as e:  # untrusted bytes: any unpickling failure means "not a tokenizer pickle"
        raise NanolitError(f"{path} is not a readable tokenizer pickle ({e}); retrain with `nanolit tokenizer train`")
    state = obj.state if isinstance(obj, _EncodingState) else None
    # A bare name would make tiktoken fetch a registered encoding (network); nanochat never pickles one.
    if not isinstance(state, dict) or set(state) != _ENCODING_STATE_KEYS or not _valid_state(state):
        raise NanolitError(f"{path} does not hold a trained tiktoken Encoding; retrain with `nanolit tokenizer train`")
    return tiktoken.Encoding(**state)


def _valid_state(state: dict) -> bool:
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not (isinstance(state["name"], str) and isinstance(state["pat_str"], str)):
        return False
    if not (isinstance(ranks, dict) and isinstance(specials, dict)):
        return False
    if not all(type(k) is bytes and type(v) is int for k, v in ranks.items()):
        return False
    if not all(type(k) is str and type(v) is int for k, v in specials.items()):
        return False
    # Ids must be exactly 0..V-1 so token_bytes and the model's embedding rows line up.
    ids = sorted([*ranks.values(), *specials.values()])
    return ids == list(range(len(ids)))


def get_tokenizer(base_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer in ``<base_dir>/tokenizer`` (base dir resolved by :func:`nanolit.common.get_base_dir`)."""
    return Tokenizer.from_directory(get_base_dir(base_dir) / "tokenizer")


def _iter_training_text(data_dir: Path, max_chars: int, doc_cap: int) -> Iterator[str]:
    """Docs of the train shards (nanochat d575940 nanochat/dataset.py; every parquet but the last), each cropped to
    ``doc_cap`` characters; stops after the doc that takes the running total past ``max_chars`` (nanochat d575940
    scripts/tok_train.py; tok_train's order)."""
    files = sorted(data_dir.glob("*.parquet")) if data_dir.is_dir() else []
    if len(files) < 2:
        raise NanolitError(
            f"{data_dir} has {len(files)} parquet shard(s); tokenizer training needs at least 2 "
            "(the last one is the val shard): download shards or point --data.base_dir at a nanochat base dir"
        )
    nchars = 0
    for path in files[:-1]:
        shard = pq.ParquetFile(path)
        for rg in range(shard.num_row_groups):
            for doc in shard.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                doc = doc[:doc_cap]
                nchars += len(doc)
                yield doc
                if nchars > max_chars:
                    return


def train_tokenizer(
    base_dir: str | os.PathLike | None = None,
    vocab_size: int = 65536,
    max_chars: int = 10_000_000_000,
    doc_cap: int = 10_000,
) -> Tokenizer:
    """tok_train: train on ``<base>/base_data`` train shards, save to ``<base>/tokenizer/`` and return it.

    Defaults are tok_train's (nanochat d575940 scripts/tok_train.py); the speedrun passes ``max_chars=2_000_000_000``.
    """
    base = get_base_dir(base_dir)
    tokenizer = Tokenizer.train_from_iterator(_iter_training_text(base / "base_data", max_chars, doc_cap), vocab_size)
    tokenizer.save(base / "tokenizer")
    return tokenizer


def evaluate_compression(tokenizer: Tokenizer, texts: Iterable[str]) -> dict:
    """tok_eval's compression figure over ``texts``: total UTF-8 bytes, total tokens and bytes per token."""
    texts = list(texts)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    num_tokens = sum(len(ids) for ids in tokenizer.encode(texts))
    if num_tokens == 0:
        raise NanolitError("no text to measure compression on; pass at least one non-empty text")
    return {"bytes": num_bytes, "tokens": num_tokens, "ratio": num_bytes / num_tokens}

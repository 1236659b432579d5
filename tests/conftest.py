"""Shared test fixtures: paths to ../shared (real nanochat outputs) and small helpers."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NANOLIT_SHARED", ROOT.parent / "shared"))
FIXTURE_D2 = SHARED / "fixtures" / "nanochat_d2"
FIXTURE_2026 = SHARED / "fixtures" / "nanochat_2026_d2"
EVAL_BUNDLE = SHARED / "data" / "eval_bundle"

torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = "the a of river stone light quick brown fox jumps over lazy dog seven blue tables 42 ! , .".split()


@pytest.fixture(autouse=True)
def isolated_base_dir(tmp_path_factory, monkeypatch) -> Path:
    """Every test's default base dir is its own temp folder: nothing lands in the user's ~/.cache/nanolit."""
    path = tmp_path_factory.mktemp("base_dir")
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    monkeypatch.setenv("NANOLIT_BASE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def nanochat_d2() -> Path:
    """The real nanochat d2 checkpoint folder (model_000050.pt, meta, tokenizer/, base_data/, expected.json)."""
    if not (FIXTURE_D2 / "expected.json").exists():
        pytest.skip(f"nanochat fixture not found at {FIXTURE_D2} (set NANOLIT_SHARED)")
    return FIXTURE_D2


@pytest.fixture(scope="session")
def expected_d2(nanochat_d2) -> dict:
    return json.loads((nanochat_d2 / "expected.json").read_text())


@pytest.fixture(scope="session")
def nanochat_2026() -> Path:
    """nanochat 92d63d4's d2 run (model/meta/optim at step 50, tokenizer/, all five base_data shards, expected.json)."""
    if not (FIXTURE_2026 / "expected.json").exists():
        pytest.skip(f"nanochat 2026 fixture not found at {FIXTURE_2026} (set NANOLIT_SHARED)")
    return FIXTURE_2026


@pytest.fixture(scope="session")
def expected_2026(nanochat_2026) -> dict:
    return json.loads((nanochat_2026 / "expected.json").read_text())


@pytest.fixture(scope="session")
def eval_bundle() -> Path:
    """The real CORE eval bundle (18 of 22 tasks)."""
    if not (EVAL_BUNDLE / "core.yaml").exists():
        pytest.skip(f"CORE eval bundle not found at {EVAL_BUNDLE} (set NANOLIT_SHARED)")
    return EVAL_BUNDLE


def make_base_dir(root: Path, tokenizer_dir: Path, num_docs: int = 400, chars_per_shard: int = 20_000) -> Path:
    """A nanochat-layout base dir: a copy of ``tokenizer_dir`` and shards of real text from the fixture's val shard."""
    import shutil

    import pyarrow.parquet as pq

    from nanolit.data.shards import write_shards_from_text

    base = root / "base"
    shutil.copytree(tokenizer_dir, base / "tokenizer")
    texts = pq.read_table(FIXTURE_D2 / "base_data" / "shard_00004.parquet").column("text").to_pylist()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in (texts * 4)[:num_docs]))
    write_shards_from_text([corpus], base / "base_data", chars_per_shard=chars_per_shard, row_group_size=64,
                           val_fraction=0.1)
    return base


def same_state(a: dict, b: dict) -> bool:
    """Two optimizer ``state`` dicts hold the same keys, equal tensors and equal other values."""
    if a.keys() != b.keys() or any(a[i].keys() != b[i].keys() for i in a):
        return False
    return all(torch.equal(v, a[i][k]) if torch.is_tensor(v) else v == a[i][k] for i in b for k, v in b[i].items())


def write_word_shards(root: Path, num_docs: int, max_words: int, chars_per_shard: int, seed: int) -> list[Path]:
    """Shards under ``root/base_data`` of ``num_docs`` random documents of 2..``max_words`` WORDS (seeded), 4 documents
    per row group and 10% val: many small row groups, so that resume and rank striding have something to skip."""
    from nanolit.data.shards import write_shards_from_text

    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, max_words))) for _ in range(num_docs)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return write_shards_from_text([root / "docs.jsonl"], root / "base_data", chars_per_shard=chars_per_shard,
                                  row_group_size=4, val_fraction=0.1)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, nanochat_d2) -> Path:
    """Shards + the fixture's 4096-token tokenizer, shared (read-only) by the end-to-end tests."""
    return make_base_dir(tmp_path_factory.mktemp("tiny"), nanochat_d2 / "tokenizer")


@pytest.fixture(scope="session")
def byte_tokenizer():
    """Byte-level tokenizer (ids 0-255 are bytes) with nanochat's 9 specials: fast and exact to reason about."""
    import tiktoken

    from nanolit.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

    enc = tiktoken.Encoding(
        name="bytes",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)},
    )
    return Tokenizer(enc)

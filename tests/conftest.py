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


def checkpoint_names(folder: Path) -> list[str]:
    """The checkpoint files in ``folder``, sorted, asserting no temporary file was left behind (a run's lock file,
    ``.lock``, stays: the OS lock on it is what goes with the run)."""
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    return [n for n in names if not n.startswith(".")]


def save_tiny_ckpt(path: Path, tokenizer, phase_record: dict, depth: int = 1, max_seq_len: int = 64,
                   seed: int = 0) -> Path:
    """A nanolit Lightning-style .ckpt of a random depth-``depth`` GPT for ``tokenizer``, saved beside a base dir
    holding the tokenizer. Its lm_head is random too (nanochat's init zeroes it, which makes every logit 0), so
    greedy decoding wanders over the whole vocab, special tokens included. ``phase_record`` joins the
    hyperparameters (e.g. ``{"init_from": ...}`` for a chat phase)."""
    from nanolit.model import GPTConfig, build_gpt

    base = path.parent / f"{path.stem}_base"
    tokenizer.save(base / "tokenizer")
    model = build_gpt(GPTConfig.from_depth(depth, tokenizer.get_vocab_size(), max_seq_len), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    torch.save({"state_dict": {f"gpt.{k}": v for k, v in model.state_dict().items()}, "global_step": 7,
                "hyper_parameters": {"depth": depth, "max_seq_len": max_seq_len, **phase_record},
                "datamodule_hyper_parameters": {"base_dir": str(base)}}, path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_ckpt(tmp_path_factory, byte_tokenizer) -> Path:
    """A tiny random chat-phase (mid) .ckpt over the byte-level tokenizer."""
    return save_tiny_ckpt(tmp_path_factory.mktemp("tiny_chat") / "mid.ckpt", byte_tokenizer,
                          {"init_from": "base.ckpt", "target_param_data_ratio": 20})


@pytest.fixture(scope="session")
def mid_d2(tmp_path_factory, nanochat_d2) -> Path:
    """The d2 fixture's weights and tokenizer laid out as a nanochat mid checkpoint: ``<base>/mid_checkpoints/d2``
    (links to the fixture's files), so chat tools take it for a chat model."""
    base = tmp_path_factory.mktemp("mid_d2")
    folder = base / "mid_checkpoints" / "d2"
    folder.mkdir(parents=True)
    for name in ("model_000050.pt", "meta_000050.json"):
        (folder / name).symlink_to(nanochat_d2 / name)
    (base / "tokenizer").symlink_to(nanochat_d2 / "tokenizer")
    return folder


def _jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_task_data(base: Path) -> Path:
    """Small files in the real schemas of every chat dataset, laid out under ``base`` as nanolit.data.tasks reads
    them (ARC, MMLU, GSM8K, HumanEval, SmolTalk, identity conversations, a word list). Returns ``base``."""
    from nanolit.data.tasks import IDENTITY_FILE, WORDS_FILE, task_folder

    def arc(i, labels, answer):
        return {"id": f"q{i}", "question": f"Question {i}: which one?", "answerKey": answer,
                "choices": {"text": [f"choice {c}" for c in labels], "label": labels}}

    easy = [arc(0, ["A", "B", "C", "D"], "A"), arc(1, ["A", "B", "C", "D"], "B"), arc(2, ["A", "B", "C"], "A"),
            arc(3, ["A", "B", "C", "D"], "C"), arc(4, ["1", "2", "3", "4"], "1")]
    _jsonl(task_folder(base, "ARC-Easy") / "test.jsonl", easy)
    _jsonl(task_folder(base, "ARC-Easy") / "train.jsonl", easy[:3])
    _jsonl(task_folder(base, "ARC-Challenge") / "test.jsonl", easy[1:4])
    _jsonl(task_folder(base, "ARC-Challenge") / "train.jsonl", easy[3:])
    mmlu = [{"question": f"MMLU {i}?", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i in range(6)]
    _jsonl(task_folder(base, "mmlu-all") / "test.jsonl", mmlu)
    gsm = [{"question": f"Tom has {n} apples and buys {n} more. How many?",
            "answer": f"He has {n}+{n} = <<{n}+{n}={2 * n}>>{2 * n} apples.\n#### {2 * n:,}"} for n in (21, 600, 5)]
    _jsonl(task_folder(base, "gsm8k-main") / "test.jsonl", gsm)
    _jsonl(task_folder(base, "gsm8k-main") / "train.jsonl", gsm[::-1])
    humaneval = [
        {"task_id": "HumanEval/0", "entry_point": "add",
         "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n",
         "canonical_solution": "    return a + b\n",
         "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
        {"task_id": "HumanEval/1", "entry_point": "double",
         "prompt": "def double(xs: list) -> list:\n    \"\"\"Double every item.\"\"\"\n",
         "canonical_solution": "    return [2 * x for x in xs]\n",
         "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n"},
        {"task_id": "HumanEval/2", "entry_point": "add",
         "prompt": "def add(a, b):\n    \"\"\"Add, the other way round.\"\"\"\n",
         "canonical_solution": "    return b + a\n",
         "test": "def check(candidate):\n    assert candidate(1, 1) == 2\n"},
    ]
    _jsonl(task_folder(base, "humaneval") / "test.jsonl", humaneval)
    smol = [{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Hi {i}"},
                          {"role": "assistant", "content": f"Hello {i}! " * (i + 1)}]} for i in range(6)]
    _jsonl(task_folder(base, "smoltalk") / "train.jsonl", smol)
    _jsonl(task_folder(base, "smoltalk") / "test.jsonl", smol[:4])
    _jsonl(base / IDENTITY_FILE, [[{"role": "user", "content": "Who are you?"},
                                   {"role": "assistant", "content": "I am nanolit."}]] * 2)
    (base / WORDS_FILE).write_text("strawberry\r\nbanana\r\napple\r\nkiwi\r\n")
    return base


def leave_process_group() -> None:
    """Barrier, then destroy the gloo group: a rank that tears down while its peer is still using the group (or its
    file store) makes that peer abort (SIGABRT), now and then, on a loaded machine."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()

"""The pretraining token streams (nanochat d575940 nanochat/dataloader.py): nanochat's layout, exact resume, rank
striding, background tokenization."""
from __future__ import annotations

import gc
import json
import threading
import time

import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_word_shards

from nanolit.common import NanolitError
from nanolit.data.loader import (
    TrainTokenStream,
    grad_accum_steps,
    resume_state_for_rank,
    val_batches,
)
from nanolit.data.shards import train_val_split, write_shards_from_text
from nanolit.tokenizer import Tokenizer

B, T, A = 2, 16, 2


@pytest.fixture(scope="module")
def tokenizer(nanochat_d2) -> Tokenizer:
    return Tokenizer.from_directory(nanochat_d2 / "tokenizer")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[list, list]:
    """(train files, [val file]): 60 random docs, 4 docs per row group, several shards with several row groups."""
    paths = write_word_shards(tmp_path_factory.mktemp("shards"), num_docs=60, max_words=25, chars_per_shard=600,
                              seed=0)
    train, val = train_val_split(paths)
    assert len(train) >= 2 and pq.ParquetFile(train[0]).num_row_groups >= 3
    return train, val


def _reference_ids(files, tokenizer, rank=0, world_size=1, epochs=1) -> list[int]:
    """The rank's token stream written out plainly: row groups rank::W of each file, <|bos|> + doc, repeated."""
    ids = []
    for _ in range(epochs):
        for f in files:
            shard = pq.ParquetFile(f)
            for rg in range(rank, shard.num_row_groups, world_size):
                for doc in shard.read_row_group(rg).column("text").to_pylist():
                    ids += tokenizer.encode(doc, prepend=tokenizer.get_bos_token_id())
    return ids


def _expected_step(ids: list[int], step: int) -> torch.Tensor:
    """Step ``step`` as [A, B, T+1]: micro-batch a pops B*T+1 tokens; row b is stream[b*T : b*T+T+1] of them."""
    need = B * T + 1
    rows = []
    for a in range(A):
        flat = ids[(step * A + a) * need : (step * A + a + 1) * need]
        rows.append([flat[b * T : b * T + T + 1] for b in range(B)])
    return torch.tensor(rows)


def _take(stream, n) -> tuple[list[torch.Tensor], list[dict]]:
    items = [next(stream) for _ in range(n)]
    stream.close()
    return [t for t, _ in items], [s for _, s in items]


# ------------------------------------------------------------------------------------------------------------------
# Layout


def test_val_stream_is_nanochats(nanochat_d2, expected_d2, tokenizer):
    """expected.json's batch_ids are the first 514 tokens of the val stream, and its val_bpb batches (32 of B=4,
    T=256) are consecutive B*T+1 pops of the bos-prepended, concatenated documents of shard_00004."""
    val = [nanochat_d2 / "base_data" / "shard_00004.parquet"]
    (x, y), = val_batches(val, tokenizer, 2, 257, eval_tokens=514)
    assert x.flatten().tolist() == expected_d2["batch_ids"]
    assert y.flatten().tolist()[:-1] == expected_d2["batch_ids"][1:]
    batches = val_batches(val, tokenizer, 4, 256, eval_tokens=32768)
    assert len(batches) == 32
    ids = _reference_ids(val, tokenizer)
    for k, (x, y) in enumerate(batches):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 256)
        assert x.flatten().tolist() == ids[k * 1025 : k * 1025 + 1024]
        assert y.flatten().tolist() == ids[k * 1025 + 1 : k * 1025 + 1025]
    again = val_batches(val, tokenizer, 4, 256, eval_tokens=32768 + 1000)
    assert len(again) == 32 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_train_stream_layout_and_epochs(shards, tokenizer):
    train, _ = shards
    ids = _reference_ids(train, tokenizer, epochs=3)
    steps = len(ids) // (A * (B * T + 1)) - 1  # well into the third epoch
    tokens, states = _take(TrainTokenStream(train, tokenizer, B, T, A, tokenizer_batch_size=3), steps)
    for step, got in enumerate(tokens):
        assert got.dtype == torch.int64 and got.is_contiguous()
        assert torch.equal(got, _expected_step(ids, step)), step
    x, y = tokens[0][0, :, :-1], tokens[0][0, :, 1:]
    assert x.flatten().tolist() == ids[: B * T] and y.flatten().tolist() == ids[1 : B * T + 1]
    assert [s["epoch"] for s in states][0] == 1 and states[-1]["epoch"] == 3


# ------------------------------------------------------------------------------------------------------------------
# Exact resume


def test_resume_from_every_step_is_exact(shards, tokenizer):
    train, _ = shards
    tokens, states = _take(TrainTokenStream(train, tokenizer, B, T, A), 40)
    boundaries = {"epoch": False, "row_group": False, "file": False}
    for k in range(len(states) - 2):
        # A different tokenizer_batch_size changes how documents are chunked, never the stream.
        resumed, resumed_states = _take(
            TrainTokenStream(train, tokenizer, B, T, A, resume_state=states[k], tokenizer_batch_size=5), 2
        )
        assert all(torch.equal(a, b) for a, b in zip(resumed, tokens[k + 1 : k + 3])), k
        assert resumed_states == states[k + 1 : k + 3]
        before, after = states[k], states[k + 1]
        boundaries["epoch"] |= after["epoch"] > before["epoch"]
        boundaries["file"] |= after["pq_idx"] != before["pq_idx"]
        boundaries["row_group"] |= after["rg_idx"] != before["rg_idx"]
    assert all(boundaries.values()), boundaries  # the resume points cross every kind of boundary


def test_state_is_plain_and_checkpoint_safe(shards, tokenizer, tmp_path):
    train, _ = shards
    _, states = _take(TrainTokenStream(train, tokenizer, B, T, A), 3)
    state = states[-1]
    assert set(state) == {"epoch", "pq_idx", "rg_idx", "doc_idx", "token_idx"}
    assert all(type(v) is int for v in state.values())
    torch.save({"train_loader": [state]}, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == {"train_loader": [state]}
    assert json.loads(json.dumps(state)) == state


def test_bad_resume_states(shards, tokenizer):
    train, _ = shards
    with pytest.raises(NanolitError, match="lacks"):
        next(TrainTokenStream(train, tokenizer, B, T, A, resume_state={"pq_idx": 0, "rg_idx": 0}))
    past_end = {"epoch": 1, "pq_idx": 0, "rg_idx": 0, "doc_idx": 0, "token_idx": 10_000}
    with pytest.raises(NanolitError, match="shards or tokenizer changed"):
        next(TrainTokenStream(train, tokenizer, B, T, A, resume_state=past_end))


def test_resume_state_for_rank():
    s0 = {"epoch": 2, "pq_idx": 3, "rg_idx": 4, "doc_idx": 5, "token_idx": 6}
    s1 = dict(s0, rg_idx=5)
    assert resume_state_for_rank([s0, s1], 1, 2) == (s1, True)
    # Another world size: nanochat's rule, the stride after rank 0's row group: (4 // 3 + 1) * 3 + 2 = 8.
    assert resume_state_for_rank([s0, s1], 2, 3) == (
        {"epoch": 2, "pq_idx": 3, "rg_idx": 8, "doc_idx": 0, "token_idx": 0}, False)
    assert resume_state_for_rank([{"pq_idx": 1, "rg_idx": 0}], 0, 1) == (
        {"epoch": 1, "pq_idx": 1, "rg_idx": 1, "doc_idx": 0, "token_idx": 0}, False)


# ------------------------------------------------------------------------------------------------------------------
# Ranks


def test_ranks_read_disjoint_row_groups(shards, tokenizer):
    train, _ = shards
    for rank in (0, 1):
        ids = _reference_ids(train, tokenizer, rank, world_size=2, epochs=4)
        tokens, states = _take(TrainTokenStream(train, tokenizer, B, T, A, rank=rank, world_size=2), 20)
        assert all(torch.equal(t, _expected_step(ids, k)) for k, t in enumerate(tokens))
        assert all(s["rg_idx"] % 2 == rank for s in states)
        resumed, _ = _take(TrainTokenStream(train, tokenizer, B, T, A, rank=rank, world_size=2,
                                            resume_state=states[7]), 3)
        assert all(torch.equal(a, b) for a, b in zip(resumed, tokens[8:11]))
    with pytest.raises(NanolitError, match="rank 99 of 100 gets no documents"):
        next(TrainTokenStream(train, tokenizer, B, T, A, rank=99, world_size=100))


def test_val_batches_per_rank(shards, tokenizer):
    _, val = shards
    for rank in (0, 1):
        batches = val_batches(val, tokenizer, 1, 8, eval_tokens=40, rank=rank, world_size=2)
        assert len(batches) == 40 // (1 * 8 * 2)
        ids = _reference_ids(val, tokenizer, rank, world_size=2, epochs=3)
        assert [x.flatten().tolist() for x, _ in batches] == [ids[k * 9 : k * 9 + 8] for k in range(len(batches))]
    with pytest.raises(NanolitError, match=r"eval_tokens=100 is less than one batch.*at least 128"):
        val_batches(val, tokenizer, 4, 16, eval_tokens=100, world_size=2)


def test_grad_accum_steps():
    assert grad_accum_steps(524288, 32, 2048, 8) == 1  # d20 on 8 GPUs (nanochat d575940 scripts/base_train.py)
    assert grad_accum_steps(524288, 32, 2048, 1) == 8
    message = r"total_batch_size=500000 .* 32\*2048\*1 = 65536; use total_batch_size=524288"
    with pytest.raises(NanolitError, match=message):
        grad_accum_steps(500000, 32, 2048, 1)
    with pytest.raises(NanolitError, match="use total_batch_size=131072"):
        grad_accum_steps(1000, 32, 2048, 2)


# ------------------------------------------------------------------------------------------------------------------
# The background thread


class _WordTokenizer:
    """Stand-in tokenizer: one id per word, so token counts are known; counts documents and can fail on demand."""

    def __init__(self, fail_after: int | None = None):
        self.docs = 0
        self.fail_after = fail_after

    def get_bos_token_id(self) -> int:
        return 0

    def encode(self, texts, prepend=None, num_threads=1):
        if self.fail_after is not None and self.docs >= self.fail_after:
            raise RuntimeError("tokenizer exploded")
        self.docs += len(texts)
        return [[prepend] + [len(w) for w in t.split()] for t in texts]


@pytest.fixture(scope="module")
def ten_token_docs(tmp_path_factory):
    """Train files whose documents are all 10 tokens long (with <|bos|>) for _WordTokenizer."""
    root = tmp_path_factory.mktemp("ten")
    (root / "d.jsonl").write_text("".join(json.dumps({"text": "w " * 8 + str(i)}) + "\n" for i in range(200)))
    paths = write_shards_from_text([root / "d.jsonl"], root / "out", row_group_size=8, val_fraction=0.0)
    return paths[:-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pin_memory_stream(ten_token_docs):
    tokens, _ = _take(TrainTokenStream(ten_token_docs, _WordTokenizer(), B, T, 1, pin_memory=True), 2)
    assert all(t.is_pinned() for t in tokens)


def _tokenizer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "nanolit-tokenizer"}


def test_thread_tokenizes_ahead_boundedly(ten_token_docs):
    tok = _WordTokenizer()
    stream = TrainTokenStream(ten_token_docs, tok, B, T, 1, tokenizer_batch_size=1, prefetch_steps=2)
    assert tok.docs == 0  # nothing happens before the first next()
    next(stream)
    # Steps 2 and 3 queued plus step 4 waiting to be queued: ceil(4 * 33 / 10) = 14 documents, no more.
    deadline = time.monotonic() + 10
    while tok.docs < 14 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert tok.docs == 14
    stream.close()


def test_thread_stops_on_close_and_on_garbage_collection(ten_token_docs):
    before = _tokenizer_threads()
    stream = TrainTokenStream(ten_token_docs, _WordTokenizer(), B, T, 1)
    next(stream)
    (thread,) = _tokenizer_threads() - before
    stream.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    with pytest.raises(StopIteration):
        next(stream)

    stream = TrainTokenStream(ten_token_docs, _WordTokenizer(), B, T, 1)
    next(stream)
    (thread,) = _tokenizer_threads() - before
    del stream
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_thread_errors_reraise_in_consumer(ten_token_docs):
    stream = TrainTokenStream(ten_token_docs, _WordTokenizer(fail_after=4), B, T, 1, tokenizer_batch_size=1)
    next(stream)  # 33 tokens: 4 documents
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        for _ in range(3):
            next(stream)
    with pytest.raises(StopIteration):
        next(stream)

"""The 2026 recipe's BOS-aligned best-fit loader: nanochat's packing, its state, exact resume, val batches."""
from __future__ import annotations

import itertools

import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_word_shards

from nanolit.common import NanolitError
from nanolit.data.bestfit import BestFitTokenStream, bestfit_val_batches, resume_state_for_rank
from nanolit.data.shards import data_dir_2026, train_val_split
from nanolit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(nanochat_2026) -> Tokenizer:
    return Tokenizer.from_directory(nanochat_2026 / "tokenizer")


@pytest.fixture(scope="module")
def fixture_files(nanochat_2026) -> tuple[list, list]:
    return train_val_split(sorted((nanochat_2026 / "base_data").glob("*.parquet")))


@pytest.fixture(scope="module")
def word_files(tmp_path_factory) -> tuple[list, list]:
    """Small random-word shards: 4 documents per row group, several files, so epochs wrap after a few steps."""
    return train_val_split(write_word_shards(tmp_path_factory.mktemp("words"), num_docs=80, max_words=40,
                                             chars_per_shard=800, seed=1))


def take(stream, n: int) -> tuple[list[torch.Tensor], list[dict]]:
    items = [next(stream) for _ in range(n)]
    stream.close()
    return [t for t, _ in items], [s for _, s in items]


def reference_batches(files, tokenizer, B: int, T: int, buffer_size: int, rank: int = 0, world: int = 1,
                      chunk: int = 128):
    """nanochat 92d63d4's loader transcribed literally: Python lists and loops, no state."""
    def doc_batches():
        for _ in itertools.count():
            for f in files:
                shard = pq.ParquetFile(f)
                for rg in range(rank, shard.num_row_groups, world):
                    texts = shard.read_row_group(rg).column("text").to_pylist()
                    for i in range(0, len(texts), chunk):
                        yield tokenizer.encode(texts[i:i + chunk], prepend=tokenizer.get_bos_token_id())

    batches, buffer = doc_batches(), []
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    buffer.extend(next(batches))
                remaining = T + 1 - len(row)
                best, best_len = -1, 0
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= remaining:
                        best, best_len = i, len(doc)
                if best >= 0:
                    row += buffer.pop(best)
                else:
                    shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row += buffer.pop(shortest)[:remaining]
            rows.append(row)
        yield torch.tensor(rows)


# ------------------------------------------------------------------------------------------------------------------
# nanochat's packing


@pytest.mark.parametrize("B,T,buffer_size,chunk,world", [(2, 16, 10, 3, 1), (3, 40, 25, 128, 1), (2, 24, 7, 2, 2)])
def test_packing_is_nanochats(word_files, tokenizer, B, T, buffer_size, chunk, world):
    train, _ = word_files
    for rank in range(world):
        ref = reference_batches(train, tokenizer, B, T, buffer_size, rank, world, chunk)
        stream = BestFitTokenStream(train, tokenizer, B, T, 2, rank=rank, world_size=world, buffer_size=buffer_size,
                                    tokenizer_batch_size=chunk)
        tokens, _ = take(stream, 12)
        for step, t in enumerate(tokens):
            assert torch.equal(t[0], next(ref)) and torch.equal(t[1], next(ref)), (rank, step)
        assert (t[:, :, 0] == tokenizer.get_bos_token_id()).all()  # every row starts a document


def test_fixture_train_stream_is_nanochats(fixture_files, tokenizer):
    train, _ = fixture_files
    ref = reference_batches(train, tokenizer, 4, 256, 1000)
    tokens, _ = take(BestFitTokenStream(train, tokenizer, 4, 256, 2), 3)
    assert all(torch.equal(t[a], next(ref)) for t in tokens for a in range(2))


def test_fixture_loader_state_after_50_steps_is_nanochats(fixture_files, tokenizer, expected_2026):
    """The fixture's run (B=4, T=256, 4 micro-batches a step) saved ``{pq_idx 2, rg_idx 1, epoch 6}`` at step 50:
    where its loader had read after the first micro-batch of the step after the last."""
    train, _ = fixture_files
    _, states = take(BestFitTokenStream(train, tokenizer, 4, 256, 4), 50)
    saved = expected_2026["meta"]["dataloader_state_dict"]
    assert {k: states[-1][k] for k in saved} == saved


def test_fixture_val_batches(nanochat_2026, fixture_files, tokenizer, expected_2026):
    _, val = fixture_files
    batches = bestfit_val_batches(val, tokenizer, 4, 256, 32768)
    assert len(batches) == 32 and batches[0][0].shape == (4, 256)
    ref = reference_batches(val, tokenizer, 4, 256, 1000)
    for x, y in batches[:4]:
        rows = next(ref)
        assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])
    # expected.json's batch_ids are the first 2 x 257 tokens of the val documents, <|bos|> + text each, in order;
    # the best-fit loader takes that first document whole (248 tokens) as the start of its first row
    texts = pq.read_table(val[0]).column("text").to_pylist()[:2]
    stream = [t for doc in tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id()) for t in doc]
    assert stream[:514] == expected_2026["batch_ids"]
    assert batches[0][0][0, :248].tolist() == stream[:248]


# ------------------------------------------------------------------------------------------------------------------
# Exact resume


def resumed_equal(files, tokenizer, B, T, A, states, tokens, k: int, n: int, **kw) -> bool:
    again, _ = take(BestFitTokenStream(files, tokenizer, B, T, A, resume_state=states[k], **kw), n)
    return all(torch.equal(a, b) for a, b in zip(again, tokens[k + 1:k + 1 + n]))


def test_resume_is_exact_mid_epoch_and_across_epochs(word_files, tokenizer):
    train, _ = word_files
    B, T, A = 2, 24, 2
    tokens, states = take(BestFitTokenStream(train, tokenizer, B, T, A, buffer_size=12, tokenizer_batch_size=3), 30)
    epochs = [s["next"][0] for s in states]
    crossing = [k for k in range(len(states) - 1) if epochs[k + 1] > epochs[k]]
    assert len(crossing) >= 2  # the stream wraps, so resumes land on both sides of an epoch boundary
    for k in sorted({0, 3, 7, *crossing, *(c - 1 for c in crossing)}):
        assert resumed_equal(train, tokenizer, B, T, A, states, tokens, k, 3, buffer_size=12,
                             tokenizer_batch_size=3), k


def test_fixture_resume_with_a_multi_epoch_buffer(fixture_files, tokenizer):
    """A 1000-document buffer holds three epochs of the fixture's 341 training documents."""
    train, _ = fixture_files
    tokens, states = take(BestFitTokenStream(train, tokenizer, 4, 256, 2), 12)
    assert len({run[0] for run in states[10]["buffer"]}) >= 3
    assert resumed_equal(train, tokenizer, 4, 256, 2, states, tokens, 10, 1)


def test_rank_striding_and_resume_under_two_ranks(word_files, tokenizer):
    train, _ = word_files
    for rank in range(2):
        tokens, states = take(BestFitTokenStream(train, tokenizer, 2, 16, 1, rank=rank, world_size=2,
                                                 buffer_size=9), 10)
        assert all(run[2] % 2 == rank for s in states for run in s["buffer"])
        assert resumed_equal(train, tokenizer, 2, 16, 1, states, tokens, 5, 3, rank=rank, world_size=2,
                             buffer_size=9)


def test_state_is_plain_data_and_resume_rules(word_files, tokenizer, tmp_path):
    train, _ = word_files
    _, states = take(BestFitTokenStream(train, tokenizer, 2, 16, 1, buffer_size=9), 2)
    torch.save(states, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == states
    assert resume_state_for_rank(states[:1], 0, 1) == (states[0], True)
    # nanochat's own state: an empty buffer from the next full stride of row groups after rank 0's
    assert resume_state_for_rank([{"pq_idx": 2, "rg_idx": 1, "epoch": 6}], 0, 1) == (
        {"pq_idx": 2, "rg_idx": 1, "epoch": 6, "next": [6, 2, 2, 0], "buffer": []}, False)
    state, exact = resume_state_for_rank([{"pq_idx": 1, "rg_idx": 5}], 1, 2)
    assert state["next"] == [1, 1, 7, 0] and not exact
    next(BestFitTokenStream(train, tokenizer, 2, 16, 1, resume_state=state, rank=1, world_size=2, buffer_size=9))


def test_bad_states_and_sizes_are_refused(word_files, tokenizer):
    train, val = word_files
    with pytest.raises(NanolitError, match="lacks"):
        next(BestFitTokenStream(train, tokenizer, 2, 16, resume_state={"pq_idx": 0, "rg_idx": 0}))
    changed = {"pq_idx": 0, "rg_idx": 0, "epoch": 1, "next": [1, 0, 1, 0], "buffer": [[1, 0, 0, 0, 99]]}
    with pytest.raises(NanolitError, match="shards changed"):
        next(BestFitTokenStream(train, tokenizer, 2, 16, resume_state=changed))
    with pytest.raises(NanolitError, match="eval_tokens"):
        bestfit_val_batches(val, tokenizer, 2, 16, eval_tokens=31)


def test_climbmix_folder_first(tmp_path):
    (tmp_path / "base_data").mkdir()
    assert data_dir_2026(tmp_path) == tmp_path / "base_data"
    (tmp_path / "base_data_climbmix").mkdir()
    assert data_dir_2026(tmp_path) == tmp_path / "base_data_climbmix"

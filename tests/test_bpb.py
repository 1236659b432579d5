"""Bits per byte (nanochat d575940 nanochat/loss_eval.py): hand-computed sums, and nanochat's own val bpb on the d2
fixture."""
from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch

from conftest import leave_process_group
from nanolit.common import NanolitError
from nanolit.eval.bpb import bits_per_byte, bpb_sums, evaluate_bpb

# Token ids 0..3; id 2 is a special token (0 bytes). The last id has 5 bytes, so an ignore_index target (-1)
# that wrongly wrapped around to the last entry would add 5 bytes.
TOKEN_BYTES = torch.tensor([1, 2, 0, 5], dtype=torch.int32)


def test_bpb_sums_drops_special_and_ignored_targets():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = torch.tensor([0, -1, 2, 3])
    nats, num_bytes = bpb_sums(loss, y, TOKEN_BYTES)
    # Counted: target 0 (1 nat, 1 byte) and target 3 (4 nats, 5 bytes); -1 and the special id 2 drop out.
    assert nats.dtype == torch.float32 and nats.dim() == 0 and nats.item() == 5.0
    assert num_bytes.dtype == torch.int64 and num_bytes.dim() == 0 and num_bytes.item() == 6


def test_bpb_sums_without_ignored_targets_and_2d_input():
    loss = torch.tensor([[0.5, 1.5], [2.5, 3.5]])
    y = torch.tensor([[1, 1], [2, 0]])
    nats, num_bytes = bpb_sums(loss, y, TOKEN_BYTES)
    assert nats.item() == 0.5 + 1.5 + 3.5
    assert num_bytes.item() == 2 + 2 + 1


def test_bits_per_byte():
    assert bits_per_byte(torch.tensor(5.0), torch.tensor(6)) == pytest.approx(5.0 / (math.log(2) * 6), rel=1e-12)
    assert bits_per_byte(3.0, 0) == float("inf")


class FixedLossModel:
    """A stand-in model whose per-token loss is the target id plus 0.5, in nats."""

    def __call__(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return (y.clamp(min=0).float() + 0.5).reshape(-1)


def test_evaluate_bpb_sums_over_batches():
    batches = [
        (torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 3, -1]])),
        (torch.zeros(1, 3, dtype=torch.long), torch.tensor([[2, 1, 3]])),
        (torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 1, 1]])),  # beyond steps: not read
    ]
    # Counted targets: 0 (0.5 nats, 1 byte), 3 (3.5, 5), 1 (1.5, 2), 3 (3.5, 5).
    expected = (0.5 + 3.5 + 1.5 + 3.5) / (math.log(2) * (1 + 5 + 2 + 5))
    assert evaluate_bpb(FixedLossModel(), iter(batches), 2, TOKEN_BYTES) == pytest.approx(expected, rel=1e-6)


def test_evaluate_bpb_without_bytes_is_inf_and_short_data_raises():
    only_specials = [(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[2, -1]]))]
    assert evaluate_bpb(FixedLossModel(), only_specials, 1, TOKEN_BYTES) == float("inf")
    with pytest.raises(NanolitError, match="ran out after 1 of 3"):
        evaluate_bpb(FixedLossModel(), only_specials, 3, TOKEN_BYTES)


def fixture_val_batches(fixture_dir, tokenizer, B: int, T: int, steps: int):
    """The val stream as nanochat builds it (nanochat d575940 nanochat/dataloader.py): every document with <|bos|>
    prepended, concatenated,
    B*T+1 tokens popped per batch."""
    needed = steps * (B * T + 1)
    stream: list[int] = []
    parquet = pq.ParquetFile(fixture_dir / "base_data" / "shard_00004.parquet")
    for rg in range(parquet.num_row_groups):
        docs = parquet.read_row_group(rg, columns=["text"]).column("text").to_pylist()
        for ids in tokenizer.encode(docs, prepend=tokenizer.get_bos_token_id()):
            stream.extend(ids)
        if len(stream) >= needed:
            break
    assert len(stream) >= needed, "fixture val shard is shorter than the batches nanochat evaluated"
    rows = torch.tensor(stream[:needed]).view(steps, B * T + 1)
    return [(row[:-1].view(B, T), row[1:].view(B, T)) for row in rows]


def test_fixture_val_bpb_matches_nanochat(nanochat_d2, expected_d2):
    from nanolit.checkpoint import build_model
    from nanolit.data.loader import val_batches
    from nanolit.tokenizer import Tokenizer

    model, _ = build_model(nanochat_d2, 50, "cpu")
    tokenizer = Tokenizer.from_directory(nanochat_d2 / "tokenizer")
    # expected.json val_bpb_note: 32 batches of B=4, T=256 of the validation shard.
    batches = val_batches([nanochat_d2 / "base_data" / "shard_00004.parquet"], tokenizer, B=4, T=256,
                          eval_tokens=32 * 4 * 256)
    reference = fixture_val_batches(nanochat_d2, tokenizer, B=4, T=256, steps=32)
    assert len(batches) == 32
    assert all(torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(batches, reference))
    bpb = evaluate_bpb(model, batches, 32, tokenizer.token_bytes())
    # within 1e-6: the fixture's figure, to the precision it was printed
    assert bpb == pytest.approx(expected_d2["val_bpb"], abs=1e-6)


# Two gloo ranks, each with its own batches: the sums are all-reduced before the division (nanochat d575940
# nanochat/loss_eval.py).
RANK_BATCHES = [
    [(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 3, -1]]))],
    [(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[2, 1, 1]]))],
]


def _distributed_worker(rank: int, world: int, store: str, out_path: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    bpb = evaluate_bpb(FixedLossModel(), RANK_BATCHES[rank], 1, TOKEN_BYTES)
    torch.save({"bpb": bpb}, f"{out_path}.{rank}")
    leave_process_group()


@pytest.mark.slow
def test_evaluate_bpb_across_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "bpb"
    store = str(tmp_path / "store")  # a file store: a free port found and closed first could be taken before the ranks bind it
    mp.spawn(_distributed_worker, args=(2, store, str(out)), nprocs=2)
    # Counted targets over both ranks: 0 (0.5 nats, 1 byte), 3 (3.5, 5), 1 (1.5, 2), 1 (1.5, 2).
    expected = (0.5 + 3.5 + 1.5 + 1.5) / (math.log(2) * (1 + 5 + 2 + 2))
    for rank in range(2):
        assert torch.load(f"{out}.{rank}")["bpb"] == pytest.approx(expected, rel=1e-6)

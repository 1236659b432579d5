"""The 2026 optimizer sharded over 2 gloo processes equals one process given the rank-mean gradient; its per-rank
state is nanochat's per-rank file; its checkpoints consolidate to, and load from, the single-process layout."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanolit.common import NanolitError
from nanolit.model2026 import GPTConfig2026, build_gpt2026
from nanolit.optim2026 import MuonAdamW, build_muon_adamw, rank_state_dict
from nanolit.sharded2026 import DistMuonAdamW, build_sharded_muon_adamw

W = 2
STEPS = 3
LRS = dict(unembedding_lr=0.01, embedding_lr=0.3, matrix_lr=0.03, weight_decay=0.2, scalar_lr=0.5)
# 3 layers: square (64,64) group of 8 matrices -> 4 per rank; (2,12) ve_gate group of 2 -> 1 each; tall/wide groups of 3
# -> 2 + 1 (rank 1's chunk padded). wte/lm_head/value embeddings (128 x 64) split by rows; lambdas all-reduced.
CONFIG = GPTConfig2026(sequence_len=32, vocab_size=100, n_layer=3, n_head=2, n_kv_head=2, n_embd=64,
                       window_pattern="SL")


def make_model():
    model = build_gpt2026(CONFIG, "cpu", seed=0)
    with torch.no_grad():  # the init zeroes the projections and the smear lambda: give every parameter a gradient
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.ndim == 2 and p.abs().max() == 0:
                p.normal_(0, 0.05, generator=gen)
        model.smear_lambda.fill_(0.5)
    return model


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (2, 33), generator=torch.Generator().manual_seed(100 * step + rank))
    return ids[:, :-1], ids[:, 1:]


def schedule(optimizer, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * (1.0, 0.5, 0.25, 0.1)[step]
        if group["kind"] == "muon":
            group["momentum"], group["weight_decay"] = (0.85, 0.9, 0.95, 0.97)[step], 0.2 / (step + 1)


def rank_step(model, optimizer, step: int, rank: int) -> None:
    model(*batch(step, rank)).backward()
    schedule(optimizer, step)
    optimizer.step()
    model.zero_grad(set_to_none=True)


def worker(rank: int, tmp: Path) -> None:
    torch.set_num_threads(1)  # bitwise-reproducible gradients, the same as the reference process's
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=W)
    model = make_model()
    optimizer = build_sharded_muon_adamw(model, **LRS)
    for step in range(STEPS):
        rank_step(model, optimizer, step, rank)
    torch.save(torch.optim.Optimizer.state_dict(optimizer), tmp / f"local{rank}.pt")  # this rank's own state
    optimizer.consolidate_state_dict()
    if rank == 0:
        torch.save({"params": [p.detach().clone() for p in model.parameters()], "full": optimizer.state_dict()},
                   tmp / "after.pt")
    dist.barrier()
    # resume: a fresh sharded optimizer loads the consolidated state and takes the next step like the original
    full = torch.load(tmp / "after.pt", weights_only=True)["full"]
    twin = copy.deepcopy(model)
    twin_opt = build_sharded_muon_adamw(twin, **LRS)
    twin_opt.load_state_dict(full)
    rank_step(model, optimizer, STEPS, rank)
    rank_step(twin, twin_opt, STEPS, rank)
    if rank == 0:
        torch.save({"params": [p.detach().clone() for p in model.parameters()],
                    "twin": [p.detach().clone() for p in twin.parameters()]}, tmp / "resumed.pt")
    dist.destroy_process_group()
    # torch 2.13's gloo now and then aborts in the interpreter's exit handlers ("terminate called without an active
    # exception"), with nanolit.sharded's DistAdamW alone too; the results are on disk, so skip those handlers
    os._exit(0)


def reference_step(model, optimizer, step: int) -> None:
    """One process: each rank's gradient computed alone, then averaged like the collectives (sum, then halve)."""
    grads = []
    for rank in range(W):
        model(*batch(step, rank)).backward()
        grads.append([p.grad for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    for p, g0, g1 in zip(model.parameters(), *grads):
        p.grad = (g0 + g1) / W
    schedule(optimizer, step)
    optimizer.step()
    model.zero_grad(set_to_none=True)


def assert_close_tensors(a, b) -> None:
    # the same fp32 operations on the same averaged gradients; a batched matmul over a stack of C instead of K
    # matrices may block its sums differently: a few ulp
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def assert_close_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        assert_close_tensors([a[i][k] for k in a[i] if torch.is_tensor(a[i][k])],
                             [b[i][k] for k in a[i] if torch.is_tensor(a[i][k])])
        assert [a[i][k] for k in a[i] if not torch.is_tensor(a[i][k])] == [
            b[i][k] for k in a[i] if not torch.is_tensor(a[i][k])]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(worker, args=(tmp_path,), nprocs=W, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        optimizer = build_muon_adamw(model, **LRS)
        for step in range(STEPS):
            reference_step(model, optimizer, step)
        full = optimizer.state_dict()
        after = torch.load(tmp_path / "after.pt", weights_only=True)
        assert_close_tensors(after["params"], [p.detach() for p in model.parameters()])
        assert_close_states(after["full"]["state"], full["state"])
        assert after["full"]["param_groups"] == full["param_groups"]
        numels = [p.numel() for g in optimizer.param_groups for p in g["params"]]
        for rank in range(W):  # each rank holds exactly its part of nanochat's per-rank file
            local = torch.load(tmp_path / f"local{rank}.pt", weights_only=True)
            assert_close_states(local["state"], rank_state_dict(full, numels, rank, W)["state"])
        reference_step(model, optimizer, STEPS)
    finally:
        torch.set_num_threads(threads)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(resumed["params"], resumed["twin"]))
    assert_close_tensors(resumed["params"], [p.detach() for p in model.parameters()])


def test_one_rank_is_the_single_process_optimizer():
    model, twin = make_model(), make_model()
    sharded, single = build_sharded_muon_adamw(model, **LRS), build_muon_adamw(twin, **LRS)
    assert type(sharded) is DistMuonAdamW and type(single) is MuonAdamW
    for step in range(2):
        rank_step(model, sharded, step, 0)
        rank_step(twin, single, step, 0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    state = sharded.state_dict()
    assert_close_states(state["state"], single.state_dict()["state"])
    fresh = build_sharded_muon_adamw(make_model(), **LRS)
    fresh.load_state_dict(single.state_dict())
    assert [g["name"] for g in fresh.param_groups] == [g["name"] for g in single.param_groups]


def test_rows_must_divide_by_the_world_size(monkeypatch):
    monkeypatch.setattr("nanolit.sharded2026._world", lambda: (3, 0))
    with pytest.raises(NanolitError, match="rows do not divide"):
        build_sharded_muon_adamw(make_model(), **LRS)

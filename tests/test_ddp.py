"""DDP through Lightning on CPU/gloo: 2 processes equal 1 with the same total batch, gradients sync only
on the last micro-step, rank zero alone prints and saves, and a 2-node torchrun run trains and checkpoints."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_script import TESTS_DIR, callback, write_config
from conftest import checkpoint_names, write_word_shards


def run_equivalence(out_dir: Path, devices: int, loss_chunk_size: int = 0, ns_fp32: bool = False) -> dict:
    out_dir.mkdir()
    proc = subprocess.run([sys.executable, str(TESTS_DIR / "_ddp_script.py"), str(out_dir), str(devices),
                           str(loss_chunk_size), str(int(ns_fp32))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out_dir / "result.pt", weights_only=True)
    result["output"] = proc.stdout + proc.stderr
    return result


def one_process_gradient(weights: dict[str, torch.Tensor], step: int, loss_chunk_size: int) -> torch.Tensor:
    """The gradient one process takes at ``weights`` for step ``step``'s 4 micro-batches, clipped like the module.

    One thread, like the runs (a different thread count may split a matmul's sums differently).
    """
    from _ddp_script import GLOBAL_MICRO_BATCHES, T, VOCAB, global_batch
    from nanolit.model import GPTConfig, build_gpt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gpt = build_gpt(GPTConfig.from_depth(1, vocab_size=VOCAB, sequence_len=T), "cpu")
        gpt.load_state_dict(weights)
        batch = global_batch(step)
        for micro in batch:
            loss = gpt(micro[:, :-1], micro[:, 1:], loss_chunk_size=loss_chunk_size)
            (loss / GLOBAL_MICRO_BATCHES).backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
    finally:
        torch.set_num_threads(threads)
    return torch.cat([p.grad.flatten() for p in gpt.parameters()])


def assert_ddp_gradients_are_one_process_gradients(two: dict, loss_chunk_size: int) -> None:
    """At every step, the 2-rank averaged gradient is the 1-process gradient at the same weights.

    Both sum the same four micro-batch gradients, 1 process as ((a+b)+c)+d and 2 ranks as (a+b)+(c+d): three fp32
    additions in another order, a few units of 2^-24 of the summands (4e-8 measured), whatever the CPU. 1e-6 leaves
    a 4x-larger-than-the-sum cancellation margin; a lost, doubled or unaveraged micro-batch is off by 10% or more.
    """
    for step, (weights, grad) in enumerate(zip(two["weights_before"], two["grads"], strict=True)):
        expected = one_process_gradient(weights, step, loss_chunk_size)
        assert (grad - expected).norm() <= 1e-6 * expected.norm(), f"step {step}"


def assert_synced_once_per_step(two: dict) -> None:
    """Gradients were all-reduced once per optimizer step, after its last micro-step's backward (backward 2, 4, 6):
    block_backward_sync skipped the others."""
    assert two["synced_after"] and all(n % two["grad_accum_steps"] == 0 for n in two["synced_after"])
    assert sorted(set(two["synced_after"])) == [2, 4, 6]


@pytest.mark.slow  # four 1- and 2-process runs (~20 s)
def test_two_processes_match_one_with_the_same_total_batch(tmp_path):
    two = run_equivalence(tmp_path / "two", 2)
    assert (two["world_size"], two["grad_accum_steps"]) == (2, 2)
    assert_ddp_gradients_are_one_process_gradients(two, loss_chunk_size=0)
    assert_synced_once_per_step(two)
    # Rank zero alone prints the plan and writes checkpoints (every 2 steps and the last).
    assert two["output"].count("nanolit training plan") == 1
    names = checkpoint_names(tmp_path / "two" / "checkpoints")
    assert names == ["last.ckpt", "step=000002.ckpt", "step=000003.ckpt"]

    # Whole runs, 1 process against 2, with Newton-Schulz in fp32: the gradients start 4e-8 apart (summation
    # order, above) and nothing rounds them to bf16, so the runs stay together (2e-7 on the gradients, 2.5e-6 of the
    # distance the weights moved, measured). Muon's quintic gains at most 3.4445 per iteration on small singular
    # directions, so 5 iterations and 3 steps can grow 4e-8 to ~1e-4 at worst: that is the bound.
    one_fp32, two_fp32 = run_equivalence(tmp_path / "one_fp32", 1, ns_fp32=True), \
        run_equivalence(tmp_path / "two_fp32", 2, ns_fp32=True)
    assert (one_fp32["world_size"], one_fp32["grad_accum_steps"]) == (1, 4)
    assert two_fp32["losses"] == pytest.approx(one_fp32["losses"], rel=1e-4)
    assert two_fp32["grad_norms"] == pytest.approx(one_fp32["grad_norms"], rel=1e-4)
    for g1, g2 in zip(one_fp32["grads"], two_fp32["grads"], strict=True):
        assert (g1 - g2).norm() <= 1e-4 * g1.norm()
    moved = {name: (w - one_fp32["weights_before"][0][name]).norm() for name, w in one_fp32["weights"].items()}
    for name, weight in one_fp32["weights"].items():
        assert (weight - two_fp32["weights"][name]).norm() <= 1e-4 * moved[name], name

    # With nanochat's bf16 Newton-Schulz the same 4e-8 can move an element across a bf16 rounding boundary (one ulp
    # is 2^-8 of it); the flipped element changes that step's update, and the next gradients inherit it (1.9e-4 on
    # the step-3 gradient, and 1.7% of the distance moved in the final weights, measured on AMD EPYC; CPUs whose
    # matmul kernels round elsewhere flip other elements). Each weight matrix must still end within 10% of the
    # distance training moved it: feeding one rank other tokens puts the runs 100% of that distance apart.
    one = run_equivalence(tmp_path / "one", 1)
    for name, weight in one["weights"].items():
        moved = (weight - one["weights_before"][0][name]).norm()
        assert (weight - two["weights"][name]).norm() <= 0.1 * moved, name
    assert two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-6)  # step 0: same weights, bf16 not yet in


@pytest.mark.slow  # one 2-process run (~6 s)
def test_chunked_loss_head_syncs_like_autograd_under_ddp(tmp_path):
    """The chunked loss head computes its gradients inside the forward; under DDP they are all-reduced once per
    step like autograd's own, and each step's averaged gradient is the one-process chunked gradient at the same
    weights."""
    two = run_equivalence(tmp_path / "two_chunked", 2, loss_chunk_size=5)
    assert_ddp_gradients_are_one_process_gradients(two, loss_chunk_size=5)
    assert_synced_once_per_step(two)


@pytest.fixture
def strided_base_dir(tmp_path, nanochat_d2) -> Path:
    """A base dir whose shards have several row groups, so that 2 ranks both get documents (a rank takes every W-th row group)."""
    base = tmp_path / "base"
    shutil.copytree(nanochat_d2 / "tokenizer", base / "tokenizer")
    write_word_shards(base, num_docs=200, max_words=40, chars_per_shard=2000, seed=1)
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun agents, each with one worker (~30 s)
def test_two_node_torchrun_trains_checkpoints_and_stops_together(strided_base_dir, tmp_path):
    """``torchrun --nnodes=2`` on 127.0.0.1, one process per node, running ``python -m nanolit fit``: both ranks
    train, rank zero writes the checkpoints, and SIGUSR1 on rank 1 alone stops both ranks at the same step.

    The ranks agree on the signal without waiting on a collective: with ``check_every=1`` each step starts a vote
    that the next step reads, so a signal during step 4 is voted at its end and read at the end of step 5."""
    config = write_config(tmp_path / "config.json", strided_base_dir, tmp_path / "run", num_iterations=8,
                          save_every=2, callbacks=[callback("SignalAt", step=4, signal="SIGUSR1", rank=1)])
    endpoint = f"127.0.0.1:{free_port()}"
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--max_restarts=0",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=nanolit-test", "-m", "nanolit", "fit",
            "-c", str(config), "--trainer.devices=1", "--trainer.num_nodes=2", "--preemption.check_every=1"]
    # the workers import the test callbacks from tests/; one thread each, as two processes share the cores
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *sys.path]), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    try:
        outputs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    output = "".join(outputs)

    assert output.count("nanolit training plan") == 1 and "world size" in output
    ckpt = tmp_path / "run" / "checkpoints"
    assert checkpoint_names(ckpt) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt", "step=000006.ckpt"]
    last = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # steps 4 and 5 finished, step 6 was saved, and both ranks stopped
    assert [s["rg_idx"] % 2 for s in last["BaseDataModule"]["train_loader"]] == [0, 1]  # both ranks' positions
    assert "received a signal on another rank" in output  # rank zero stopped because rank 1 was signalled

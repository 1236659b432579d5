"""DDP through Lightning on CPU/gloo (issue 6): 2 processes equal 1 with the same total batch, gradients sync only
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
from conftest import write_word_shards


def run_equivalence(out_dir: Path, devices: int, loss_chunk_size: int = 0) -> dict:
    out_dir.mkdir()
    proc = subprocess.run([sys.executable, str(TESTS_DIR / "_ddp_script.py"), str(out_dir), str(devices),
                           str(loss_chunk_size)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out_dir / "result.pt", weights_only=True)
    result["output"] = proc.stdout + proc.stderr
    return result


@pytest.mark.slow  # 1- and 2-process runs, with and without the chunked loss head (~35 s)
def test_two_processes_match_one_with_the_same_total_batch(tmp_path):
    one, two = run_equivalence(tmp_path / "one", 1), run_equivalence(tmp_path / "two", 2)
    assert (one["world_size"], one["grad_accum_steps"]) == (1, 4)
    assert (two["world_size"], two["grad_accum_steps"]) == (2, 2)

    # The averaged gradient of 2 ranks x 2 micro-steps is the 1-process gradient of 4 micro-steps: only float
    # summation order differs. So do the losses and the pre-clip norms at every step.
    for g1, g2 in zip(one["grads"], two["grads"], strict=True):
        assert (g1 - g2).norm() <= 1e-6 * g1.norm()
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    # Muon orthogonalises in bf16 (spec §2.1), where a last-bit difference in a gradient can round one element
    # differently: weights agree to far below the size of one step's update (lr 0.02).
    for name, weight in one["weights"].items():
        assert torch.allclose(weight, two["weights"][name], rtol=0, atol=2e-3), name

    # Gradients were all-reduced once per optimizer step, after its last micro-step's backward (backward 2, 4, 6):
    # block_backward_sync skipped the others (lightning-notes §1).
    assert two["synced_after"] and all(n % two["grad_accum_steps"] == 0 for n in two["synced_after"])
    assert sorted(set(two["synced_after"])) == [2, 4, 6]
    # Rank zero alone prints the plan and writes checkpoints (every 2 steps and the last).
    assert two["output"].count("nanolit training plan") == 1
    names = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=000002.ckpt", "step=000003.ckpt"]

    # The chunked loss head (gradients computed inside its forward) syncs under DDP like autograd's own. Compared
    # with a chunked single process: against the one-shot head, Muon's bf16 turns the heads' last-bit differences
    # into ~1e-4 gradient differences by step 3 (tests/test_loss.py), which would hide what DDP does.
    one_chunked = run_equivalence(tmp_path / "one_chunked", 1, loss_chunk_size=5)
    two_chunked = run_equivalence(tmp_path / "two_chunked", 2, loss_chunk_size=5)
    for g1, g2 in zip(one_chunked["grads"], two_chunked["grads"], strict=True):
        assert (g1 - g2).norm() <= 1e-6 * g1.norm()
    assert (one_chunked["grads"][0] - one["grads"][0]).norm() <= 1e-6 * one["grads"][0].norm()  # same first step
    assert two_chunked["losses"] == pytest.approx(one_chunked["losses"], rel=1e-6)
    assert sorted(set(two_chunked["synced_after"])) == [2, 4, 6]


@pytest.fixture
def strided_base_dir(tmp_path, nanochat_d2) -> Path:
    """A base dir whose shards have several row groups, so that 2 ranks both get documents (spec §10.2)."""
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
    train, rank zero writes the checkpoints, and SIGUSR1 on rank 1 alone stops both ranks at the same step."""
    config = write_config(tmp_path / "config.json", strided_base_dir, tmp_path / "run", num_iterations=8,
                          save_every=2, callbacks=[callback("SignalAt", step=4, signal="SIGUSR1", rank=1)])
    endpoint = f"127.0.0.1:{free_port()}"
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--max_restarts=0",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=nanolit-test", "-m", "nanolit", "fit",
            "-c", str(config), "--trainer.devices=1", "--trainer.num_nodes=2"]
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
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt",
                                                      "step=000005.ckpt"]
    last = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5  # signalled during step 4: it finished, was saved, and both ranks stopped
    assert [s["rg_idx"] % 2 for s in last["BaseDataModule"]["train_loader"]] == [0, 1]  # both ranks' positions
    assert "received a signal on another rank" in output  # rank zero stopped because rank 1 was signalled

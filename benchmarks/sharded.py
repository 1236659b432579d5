"""Optimizer-state sharding: memory per rank and step time, with and without it.

W processes (gloo on CPU) hold the same GPT and each its own random gradients, then time the optimizer half of a
training step in two modes:

(a) replicated: every gradient all-reduced to the rank mean (DDP's job during backward), then
    ``torch.optim.AdamW`` + ``nanolit.optim.Muon`` on every rank (``build_optimizers``);
(b) sharded: ``DistAdamW`` + ``DistMuon`` (``build_sharded_optimizers``): reduce-scatter, update this rank's
    share, all-gather.

Forward and backward are left out: they are the same in both modes. A step is timed from a barrier to a barrier,
so it lasts until the slowest rank is done; the median over ``--steps`` steps is reported, after ``--warmup``.
Memory is the bytes of optimizer state each rank holds after the steps (every state tensor counted).

A two-rank GPU measurement needs two GPUs. For the GPU setting, the script also prints the state bytes per rank
of nanochat's d20 and d32 on 8 GPUs (vocab 65536, bf16 wte as on CUDA), computed from the shapes with the same
ownership rule; the same computation is checked against the CPU measurement first.

    python benchmarks/sharded.py                     # d4, vocab 8192, 2 ranks, 10 timed steps
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanolit.model import GPT, GPTConfig, build_gpt
from nanolit.optim import build_optimizers
from nanolit.sharded import DistMuon, build_sharded_optimizers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192, help="must divide by the world size (AdamW rows)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    return p.parse_args(argv)


def state_bytes(optimizers) -> int:
    return sum(t.numel() * t.element_size() for opt in optimizers for state in opt.state.values()
               for t in state.values() if torch.is_tensor(t))


def projected_state_bytes(model: GPT, world: int, wte_element_size: int) -> tuple[int, int]:
    """(replicated, largest sharded) optimizer-state bytes per rank, from shapes alone.

    AdamW: exp_avg and exp_avg_sq in the param's dtype plus a 4-byte step, rows split evenly. Muon: one fp32
    buffer per matrix, on the rank ``DistMuon.owners`` gives it.
    """
    def adamw(p, rows_share):
        size = wte_element_size if p is model.transformer.wte.weight else 4
        return 2 * rows_share * p[0].numel() * size + 4

    embeddings = [model.lm_head.weight, model.transformer.wte.weight]
    matrices = list(model.transformer.h.parameters())
    replicated = sum(adamw(p, p.size(0)) for p in embeddings) + sum(4 * p.numel() for p in matrices)
    per_rank = [sum(adamw(p, p.size(0) // world) for p in embeddings) for _ in range(world)]
    for p, rank in DistMuon(matrices).owners(world).items():
        per_rank[rank] += 4 * p.numel()
    return replicated, max(per_rank)


def sync_gradients(params, world: int) -> None:
    works = [dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True) for p in params]
    for work, p in zip(works, params):
        work.wait()
        p.grad.div_(world)


def time_mode(optimizers, params, grads, world: int, sync: bool, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()  # the optimizers overwrite gradients (Muon's Nesterov is in place)
        dist.barrier()
        start = time.perf_counter()
        if sync:
            sync_gradients(params, world)
        for opt in optimizers:
            opt.step()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def worker(rank: int, args: argparse.Namespace, store: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.world_size)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=64)
    results = {}
    for mode, build, sync in (("replicated", build_optimizers, True), ("sharded", build_sharded_optimizers, False)):
        model = build_gpt(config, "cpu")
        params = list(model.parameters())
        g = torch.Generator().manual_seed(rank)
        grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
        optimizers = build(model)
        times = time_mode(optimizers, params, grads, args.world_size, sync, args.steps, args.warmup)
        results[mode] = (statistics.median(times), state_bytes(optimizers))
    gathered = [None] * args.world_size
    dist.all_gather_object(gathered, results)
    if rank == 0:
        report(args, config, gathered)
    dist.destroy_process_group()


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def report(args: argparse.Namespace, config: GPTConfig, ranks: list[dict]) -> None:
    W = args.world_size
    with torch.device("meta"):
        model = GPT(config)
    print(f"d{args.depth} GPT, vocab {args.vocab_size}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{W} gloo ranks on CPU, {args.threads} thread(s) each, median of {args.steps} steps\n")
    print("| mode | optimizer state per rank | optimizer step (incl. gradient sync) |")
    print("|---|---|---|")
    for mode in ("replicated", "sharded"):
        states = " / ".join(mib(r[mode][1]) for r in ranks)
        print(f"| {mode} | {states} | {1000 * ranks[0][mode][0]:.1f} ms |")
    rep_time, rep_state = ranks[0]["replicated"]
    shard_time = ranks[0]["sharded"][0]
    shard_state = max(r["sharded"][1] for r in ranks)
    print(f"\nsharded / replicated: state {shard_state / rep_state:.3f} (largest rank), "
          f"step time {shard_time / rep_time:.2f}")
    projected = projected_state_bytes(model, W, wte_element_size=4)  # CPU: wte stays fp32
    if projected != (rep_state, shard_state):
        raise RuntimeError(f"shape-based count {projected} disagrees with the measurement {(rep_state, shard_state)}")
    print("shape-based count matches the measurement\n")
    print("GPU setting, from shapes (vocab 65536, bf16 wte, 8 ranks):\n")
    print("| model | replicated | sharded (largest rank) | ratio |")
    print("|---|---|---|---|")
    for depth in (20, 32):
        with torch.device("meta"):
            big = GPT(GPTConfig.from_depth(depth, vocab_size=65536, sequence_len=2048))
        rep, shard = projected_state_bytes(big, 8, wte_element_size=2)
        print(f"| d{depth} | {mib(rep)} | {mib(shard)} | {shard / rep:.3f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        mp.spawn(worker, args=(args, store), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()

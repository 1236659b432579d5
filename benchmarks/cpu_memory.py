"""Page faults and step time of CPU training with and without ``nanolit.cpu.keep_freed_memory`` (glibc keeping
freed blocks of up to 32 MiB for the next step instead of returning them to the OS).

Each variant (kept or returned, eager or compiled) runs in its own fresh process, because the setting is process
-wide and cannot be undone; variants alternate over ``--rounds``. A step is what training does on CPU: the GPT's
forward and backward over ``--accum`` micro-batches, then AdamW and Muon (``build_optimizers``). Per variant:
minor page faults per step (``ru_minflt``) and the median step time, each the median over its rounds.

    python benchmarks/cpu_memory.py                     # d2, vocab 4096, 4 x 256 tokens, 4 micro-batches
    python benchmarks/cpu_memory.py --depth 4 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanolit.cpu import keep_freed_memory
from nanolit.model import GPTConfig, build_gpt
from nanolit.optim import build_optimizers

VARIANTS = [("returned", False), ("kept", False), ("returned", True), ("kept", True)]  # (memory, compiled)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096, help="nanochat's CPU smoke-test vocab")
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step (4,096 tokens at the defaults)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring (compilation, first allocations)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one variant, in a child
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> dict:
    memory, compiled = VARIANTS[args.worker]
    took = keep_freed_memory() if memory == "kept" else False
    torch.manual_seed(0)
    gpt = build_gpt(GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len))
    optimizers = build_optimizers(gpt, compile_ns=compiled)
    model = torch.compile(gpt, dynamic=False) if compiled else gpt
    tokens = torch.randint(0, args.vocab_size, (args.accum, args.device_batch_size, args.seq_len + 1))

    def step() -> None:
        for i in range(args.accum):
            (model(tokens[i, :, :-1], tokens[i, :, 1:]) / args.accum).backward()
        for opt in optimizers:
            opt.step()
        gpt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"memory": memory, "compiled": compiled, "took": took, "faults_per_step": faults / args.steps,
            "step_ms": 1000 * statistics.median(times)}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return []
    passthrough = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                   if name not in ("worker", "json", "modes")]
    chosen = [i for i, (_, compiled) in enumerate(VARIANTS) if ("compiled" if compiled else "eager") in args.modes]
    runs: dict[int, list[dict]] = {i: [] for i in chosen}
    for r in range(args.rounds):
        for i in chosen if r % 2 == 0 else reversed(chosen):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--worker", str(i)], check=True,
                                 capture_output=True, text=True).stdout
            runs[i].append(json.loads(out.strip().splitlines()[-1]))
    print(f"d{args.depth}, vocab {args.vocab_size}, {args.accum} x {args.device_batch_size} x {args.seq_len} tokens "
          f"a step, {args.steps} steps after {args.warmup}, {args.rounds} rounds, {torch.get_num_threads()} threads")
    print("| mode | freed memory | page faults / step | step ms | time ratio |")
    print("|---|---|---|---|---|")
    results = []
    for i in chosen:
        memory, compiled = VARIANTS[i]
        faults = statistics.median(run["faults_per_step"] for run in runs[i])
        step_ms = statistics.median(run["step_ms"] for run in runs[i])
        results.append({"memory": memory, "compiled": compiled, "faults_per_step": faults, "step_ms": step_ms,
                        "took": all(run["took"] for run in runs[i]) if memory == "kept" else None})
    for result in results:
        base = next(r for r in results if r["compiled"] == result["compiled"] and r["memory"] == "returned")
        ratio = result["step_ms"] / base["step_ms"]
        print(f"| {'compiled' if result['compiled'] else 'eager'} | {result['memory']} | "
              f"{result['faults_per_step']:,.0f} | {result['step_ms']:.1f} | {ratio:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

"""Peak memory and step time of the chunked loss head (``--model.loss_chunk_size``) against nanochat's one-shot head.

Each variant (``--chunks``; 0 is the one-shot head, the baseline) runs in its own fresh process, so its peak
memory is its own: on CUDA ``max_memory_allocated``, on CPU the growth of the process's peak RSS
(``ru_maxrss``) over what it held before the first step. A step is the whole GPT forward and backward on the
same random tokens (the optimizers are the same for every variant and left out). Variants alternate over
``--rounds`` (0, c1, c2, ..., then reversed, ...); each variant's step time is the median of its rounds'
medians. The loss of every variant is printed next to the baseline's: they must agree.

    python benchmarks/loss_head.py                                    # CPU: d4, vocab 65536, 4 x 512 tokens
    python benchmarks/loss_head.py --device cuda --depth 20 --device-batch-size 32 --seq-len 2048 --compile \\
        --chunks 0 8192 16384
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

from nanolit.common import autocast_context, synchronize
from nanolit.model import GPTConfig, build_gpt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=65536,
                   help="nanochat's vocab (nanochat d575940 nanochat/tokenizer.py)")
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256],
                   help="loss_chunk_size values; 0 (the one-shot head) is the baseline and is added if missing")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU; 0 keeps torch's default")
    p.add_argument("--compile", action="store_true", help="torch.compile the GPT (as training does on CUDA)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one variant, in a child
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def worker(args: argparse.Namespace) -> dict:
    """Time ``args.steps`` forward+backward steps of one variant in this process; report its memory growth."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.seq_len)
    gpt = build_gpt(config, device=device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    model = torch.compile(gpt, dynamic=False) if args.compile else gpt
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.device_batch_size, args.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    with torch.no_grad():  # a trained-looking head: the zero init would make every chunk's softmax uniform
        gpt.lm_head.weight.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(1))
    synchronize(device.type)
    base = peak_bytes(device)
    times, loss = [], None
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with autocast_context(device.type):
            loss = model(x, y, loss_chunk_size=args.worker)
        loss.backward()
        gpt.zero_grad(set_to_none=True)
        synchronize(device.type)
        if step >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return {"chunk": args.worker, "median_ms": statistics.median(times),
            "peak_growth_mib": (peak_bytes(device) - base) / 2**20, "loss": loss.item()}


def run_variant(chunk: int, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--worker", str(chunk)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"loss_chunk_size={chunk} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return {}
    chunks = [0] + [c for c in dict.fromkeys(args.chunks) if c != 0]
    runs: dict[int, list[dict]] = {c: [] for c in chunks}
    for r in range(args.rounds):
        for chunk in chunks if r % 2 == 0 else chunks[::-1]:
            runs[chunk].append(run_variant(chunk, argv))
    base = runs[0]
    base_ms = statistics.median(run["median_ms"] for run in base)
    base_mib = statistics.median(run["peak_growth_mib"] for run in base)
    rows = []
    print(f"d{args.depth}, vocab {args.vocab_size}, {args.device_batch_size} x {args.seq_len} tokens, "
          f"{args.device}{', compiled' if args.compile else ''}, {args.rounds} rounds x {args.steps} steps")
    print(f"{'loss_chunk_size':>15} {'step ms':>9} {'ratio':>6} {'peak growth MiB':>16} {'ratio':>6} {'loss':>10}")
    for chunk in chunks:
        ms = statistics.median(run["median_ms"] for run in runs[chunk])
        mib = statistics.median(run["peak_growth_mib"] for run in runs[chunk])
        row = {"chunk": chunk, "median_ms": ms, "time_ratio": ms / base_ms, "peak_growth_mib": mib,
               "memory_ratio": mib / base_mib, "loss": runs[chunk][0]["loss"], "runs": runs[chunk]}
        rows.append(row)
        print(f"{chunk:>15} {ms:>9.1f} {row['time_ratio']:>6.3f} {mib:>16.1f} {row['memory_ratio']:>6.3f} "
              f"{row['loss']:>10.6f}")
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "json")}, "variants": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

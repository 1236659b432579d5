"""GPU throughput of nanolit's training step: MFU, tok/s, peak memory and Muon's share of the step.

One optimizer step is exactly what ``GPTModule.training_step`` runs on one GPU (nanochat d575940 scripts/base_train.py):
the GPT compiled as ``configure_model`` compiles it, bf16 autocast, forward + backward of every micro-batch, one global
grad-norm clip, the LR multiplier and Muon momentum, fused AdamW then Muon, ``zero_grad``. The Lightning loop
around it adds ~2 ms of host work per step, hidden behind GPU-bound steps (``benchmarks/step_overhead.py``
measures it), so this plain loop gives nanolit's numbers without the Trainer's start-up.

Timing: ``--warmup`` steps first (compilation happens there), then ``--steps`` steps between two
``cuda.synchronize`` calls, with no host sync in between. Muon and AdamW are bracketed by CUDA events, which time
the GPU work without stopping the host. MFU is nanochat's: ``flops_per_token * tokens / dt / peak`` with the
dense bf16 peak (nanochat d575940 scripts/base_train.py; 989e12 on an H100 SXM). Tokens are random ids: the data path is
the loader's job, benchmarked by ``benchmarks/dataloader.py``.

    python benchmarks/gpu.py --depths 12 20                      # d12 and d20, B=32, T=2048
    python benchmarks/gpu.py --depths 4 8 16 26 --budget 300     # scaling points, until 300 s are spent
    python benchmarks/gpu.py --depths 20 --loss-chunk-size 8192  # the chunked loss head (nanolit/loss.py)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nanolit.callbacks.throughput import peak_bf16_flops
from nanolit.common import autocast_context, synchronize
from nanolit.model import GPTConfig, build_gpt
from nanolit.optim import build_optimizers
from nanolit.schedules import lr_multiplier, muon_momentum

# nanochat's promised_flops_per_sec_h100 (nanochat d575940 scripts/base_train.py), for GPUs not in the table
H100_PEAK = 989e12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[12, 20])
    p.add_argument("--device-batch-size", type=int, default=32, help="B per micro-batch (nanochat: 32)")
    p.add_argument("--total-batch-size", type=int, default=0,
                   help="tokens per optimizer step; 0 means one micro-batch (grad accumulation 1)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per depth")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--no-compile", action="store_true", help="eager model (Newton-Schulz stays compiled on CUDA)")
    p.add_argument("--loss-chunk-size", type=int, default=0,
                   help="GPTModule's loss_chunk_size (nanolit/loss.py); 0: nanochat's one-shot head")
    p.add_argument("--budget", type=float, default=0.0, help="skip the remaining depths after this many seconds")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the script (fp32, no MFU)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def _mark(device: torch.device):
    """A point in the device's timeline: a recorded CUDA event (no host sync), or the host clock elsewhere."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _ms(start, end) -> float:
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else (end - start) * 1000


def bench_depth(depth: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Train ``args.warmup + args.steps`` steps of a fresh d``depth`` model and measure the timed ones."""
    B, T = args.device_batch_size, args.seq_len
    total = args.total_batch_size or B * T
    if total % (B * T):
        raise SystemExit(f"--total-batch-size {total} is not a multiple of B*T = {B * T}")
    accum = total // (B * T)
    config = GPTConfig.from_depth(depth, vocab_size=args.vocab_size, sequence_len=T)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_gpt(config, device)
    train_model = model if args.no_compile else torch.compile(model, dynamic=False)  # as GPTModule.configure_model
    adamw, muon = build_optimizers(model)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (accum, B, T + 1), device=device, generator=gen) for _ in range(2)]
    num_steps = args.warmup + args.steps
    marks: list[list] = []  # per timed step: before AdamW, between AdamW and Muon, after Muon

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        for a in range(accum):
            with autocast_context(device):
                loss = train_model(batch[a, :, :-1], batch[a, :, 1:], loss_chunk_size=args.loss_chunk_size)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lrm = lr_multiplier(i, num_steps)
        for opt in (adamw, muon):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(i)
        timed = i >= args.warmup
        before = _mark(device) if timed else None
        adamw.step()
        between = _mark(device) if timed else None
        muon.step()
        if timed:
            marks.append([before, between, _mark(device)])
        model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.warmup, num_steps):
        step(i)
    synchronize(device)
    dt = (time.perf_counter() - t0) / args.steps
    adamw_ms = sum(_ms(m[0], m[1]) for m in marks) / args.steps
    muon_ms = sum(_ms(m[1], m[2]) for m in marks) / args.steps
    flops_per_token = model.estimate_flops()
    peak = (peak_bf16_flops(torch.cuda.get_device_name(device)) or H100_PEAK) if device.type == "cuda" else None
    return {
        "depth": depth, "params": model.num_params(), "flops_per_token": flops_per_token,
        "device_batch_size": B, "seq_len": T, "grad_accum": accum, "tokens_per_step": total,
        "compiled": not args.no_compile, "loss_chunk_size": args.loss_chunk_size, "warmup_s": round(warmup_s, 1), "step_ms": round(dt * 1000, 2),
        "tok_per_sec": round(total / dt, 1),
        "mfu_pct": round(100 * flops_per_token * total / dt / peak, 2) if peak else None,
        "peak_mem_mib": round(torch.cuda.max_memory_allocated(device) / 2 ** 20) if device.type == "cuda" else None,
        "muon_ms": round(muon_ms, 2), "muon_share_pct": round(100 * muon_ms / (dt * 1000), 2),
        "adamw_ms": round(adamw_ms, 2),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as nanochat (nanochat d575940 nanochat/gpt.py)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (fp32, no MFU: smoke runs only)"
    print(f"# {name}, torch {torch.__version__}")
    start, results = time.perf_counter(), []
    for depth in args.depths:
        if args.budget and time.perf_counter() - start > args.budget:
            print(json.dumps({"depth": depth, "skipped": f"--budget {args.budget:g}s spent"}))
            continue
        B = args.device_batch_size
        while B >= 1:
            # nanochat's remedy for a model that does not fit: halve device_batch_size, keep the tokens per step
            try:
                result = bench_depth(depth, argparse.Namespace(**{**vars(args), "device_batch_size": B,
                                                                  "total_batch_size": args.total_batch_size
                                                                  or args.device_batch_size * args.seq_len}),
                                     device)
            except torch.OutOfMemoryError:
                result = {"depth": depth, "device_batch_size": B, "oom": True}
            torch._dynamo.reset()  # each depth compiles its own graphs; drop the last one's
            results.append(result)
            print(json.dumps(result), flush=True)
            if not result.get("oom"):
                break
            B //= 2
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

"""Sliding-window attention on CPU: FlexAttention (block mask, compiled) against the SDPA path with an explicit mask.

Side by side in one process, on the same tensors: each case alternates sdpa, flex, flex, sdpa, ... over ``--rounds``
rounds of ``--steps`` calls; a side's time is the median of its rounds' medians, ratio = flex / sdpa. FlexAttention's
compile time (its first call per shape) is reported apart. Cases:

- ``op``: the attention op alone, without gradients, at the fixture's shape (B 4, 1 head, T 256, D 128, window 128)
  and at a d20 S layer's length (B 1, 4 heads, T 2048, D 128, window 512);
- ``model``: the 2026 GPT's forward without gradients (what evaluation runs), at ``--depth``;
- ``train``: forward + backward of the op: torch 2.13 has no FlexAttention backward on CPU, so only SDPA is timed.

    .venv/bin/python benchmarks/attention.py --threads 2 --json attention.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nanolit.attention import flex_attention, sdpa_attention
from nanolit.model2026 import GPTConfig2026, build_gpt2026

OP_SHAPES = [(4, 1, 256, 128, 128), (1, 4, 2048, 128, 512)]  # B, H, T, D, window


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--depth", type=int, default=4, help="GPT depth of the model case (width 64*depth)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length of the model case")
    p.add_argument("--batch", type=int, default=2, help="batch size of the model case")
    p.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in OP_SHAPES],
                   help="op cases as B,H,T,D,window")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def timed(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def side_by_side(sides: dict, steps: int, rounds: int) -> dict:
    """Compile/warm each side once (timed), then alternate them; medians of the round medians, in ms."""
    first = {}
    for name, fn in sides.items():
        t0 = time.perf_counter()
        fn()
        first[name] = (time.perf_counter() - t0) * 1e3
    runs = {name: [] for name in sides}
    order = list(sides)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            runs[name].append(timed(sides[name], steps))
    out = {f"{name}_ms": statistics.median(ms) for name, ms in runs.items()}
    out.update({f"{name}_first_call_ms": ms for name, ms in first.items()})
    if "flex_ms" in out:
        out["ratio"] = out["flex_ms"] / out["sdpa_ms"]
    return out


def op_case(B: int, H: int, T: int, D: int, window: int, args) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    with torch.no_grad():
        result = side_by_side({"sdpa": lambda: sdpa_attention(q, k, v, window),
                               "flex": lambda: flex_attention(q, k, v, window)}, args.steps, args.rounds)
        result["max_abs_diff"] = (sdpa_attention(q, k, v, window) - flex_attention(q, k, v, window)).abs().max().item()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    train = side_by_side({"sdpa": lambda: sdpa_attention(q, k, v, window).sum().backward()}, args.steps, args.rounds)
    result["train_sdpa_ms"] = train["sdpa_ms"]
    return {"case": f"op B{B} H{H} T{T} D{D} window {window}", **result}


def model_case(args) -> dict:
    config = GPTConfig2026.from_knobs(args.depth, vocab_size=4096, max_seq_len=args.seq_len, aspect_ratio=64,
                                      head_dim=128)
    sdpa_model = build_gpt2026(config, "cpu", attn_impl="sdpa").eval()
    with torch.no_grad():  # the init zeroes the output projections, which would hide attention from the logits
        for block in sdpa_model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    flex_model = build_gpt2026(config, "cpu", attn_impl="flex").eval()
    flex_model.load_state_dict(sdpa_model.state_dict())
    ids = torch.randint(0, 4096, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        result = side_by_side({"sdpa": lambda: sdpa_model(ids), "flex": lambda: flex_model(ids)}, args.steps,
                              args.rounds)
        result["max_abs_diff"] = (sdpa_model(ids) - flex_model(ids)).abs().max().item()
    return {"case": f"model d{args.depth} (windows {sdpa_model.window_sizes}) B{args.batch} T{args.seq_len}",
            **result}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in shape.split(",")) for shape in args.shapes]
    results = [op_case(*shape, args) for shape in shapes] + [model_case(args)]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds x {args.steps} calls")
    print(f"{'case':58s} {'sdpa ms':>9s} {'flex ms':>9s} {'flex/sdpa':>9s} {'flex 1st':>9s} {'max diff':>9s} "
          f"{'train sdpa':>10s}")
    for r in results:
        train = f"{r['train_sdpa_ms']:10.2f}" if "train_sdpa_ms" in r else f"{'-':>10s}"
        print(f"{r['case']:58s} {r['sdpa_ms']:9.2f} {r['flex_ms']:9.2f} {r['ratio']:9.3f} "
              f"{r['flex_first_call_ms']:9.0f} {r['max_abs_diff']:9.1e} {train}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

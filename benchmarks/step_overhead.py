"""The Lightning tax: nanolit's training loop vs a plain PyTorch loop doing the same math.

Both train the same GPT on the same tokens with the same config:

(a) ``GPTModule`` + ``BaseDataModule`` under a ``Trainer`` configured as ``nanolit fit`` configures it
    (``NanoCLI``): its trainer defaults, a CSV logger, and every default callback it installs (the evaluation
    groups ``ema``/``bpb``/``core``/``sample``/``checkpoint`` plus throughput, LR monitor, report, preemption
    checkpoint and the progress bar; ``tests/test_benchmarks_smoke.py`` checks the list against the CLI's).
    The evaluations are set to never fire (``-1``): their work is nanochat's too, not a tax.
(b) a hand-written loop: ``TrainTokenStream`` -> forward/backward per micro-batch -> clip -> LR and momentum ->
    AdamW, Muon -> ``zero_grad``; no logging and no host syncs at all, so it is the cheapest way to do the math.

Runs alternate a, b, b, a, ... for ``--rounds`` rounds. Each run takes ``--warmup`` untimed steps, then times
``--steps`` steps from the start of one step to the start of the step after the last (so the callbacks' and
loggers' per-step work, the progress bar and the next batch's fetch all count), with a device sync only at the
two ends. Each side's step time is the median over its runs, in wall seconds and in the process's CPU seconds
(steadier on a shared machine); the ratios are (a)/(b).

    python benchmarks/step_overhead.py --depth 2 --threads 1 --steps 20 --rounds 9    # CPU: B=4, T=256, vocab 4096
    python benchmarks/step_overhead.py --device cuda --device-batch-size 16 --seq-len 1024 --steps 30 --warmup 5
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from nanolit.callbacks import (BPBValidation, ChatEvaluation, COREEvaluation, EMALossLogger, PreemptionCheckpoint,
                               ReportWriter, RunState, Sampler, StepCheckpoint, StepLine, TokenThroughputMonitor,
                               ValidationLoss)
from nanolit.common import autocast_context, synchronize
from nanolit.data.corpus import write_default_corpus
from nanolit.data.datamodule import BaseDataModule
from nanolit.data.loader import TrainTokenStream, grad_accum_steps
from nanolit.data.shards import iter_row_groups, list_parquet_files, train_val_split, write_shards_from_text
from nanolit.model import GPTConfig, build_gpt
from nanolit.module import GPTModule
from nanolit.optim import build_optimizers
from nanolit.schedules import lr_multiplier, muon_momentum
from nanolit.tokenizer import Tokenizer


def default_base_dir(vocab_size: int) -> Path:
    """Where the benchmarks keep the embedded corpus's shards and a tokenizer of ``vocab_size`` between runs."""
    return Path(tempfile.gettempdir()) / "nanolit-bench" / f"vocab{vocab_size}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer trained on the embedded corpus")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run (compilation, caches)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each side, interleaved")
    p.add_argument("--log-every", type=int, default=1,
                   help="trainer.log_every_n_steps; NanoCLI's default is 1 (nanochat logs every step)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both sides; 0 = torch's default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the GPT in both loops; auto = on CUDA only (GPTModule's default)")
    p.add_argument("--base-dir", type=Path, default=None,
                   help="nanochat-layout dir with base_data/ and tokenizer/; built from the embedded corpus if empty")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def prepare_base_dir(base: Path, vocab_size: int) -> Path:
    """Shards of the embedded corpus and a BPE tokenizer trained on them, unless ``base`` already has both."""
    if list_parquet_files(base / "base_data") and (base / "tokenizer" / "tokenizer.pkl").is_file():
        return base
    corpus = write_default_corpus(base / "corpus.jsonl")
    # small shards and row groups: the ~2 MB corpus still gives several train shards and a val shard
    write_shards_from_text([corpus], base / "base_data", chars_per_shard=500_000, row_group_size=64)
    train_files, _ = train_val_split(list_parquet_files(base / "base_data"))
    texts = (text for _, _, docs in iter_row_groups(train_files, (0, 0), 0, 1) for text in docs)
    Tokenizer.train_from_iterator(texts, vocab_size).save(base / "tokenizer")
    return base


class Stopwatch:
    """Per-step wall and CPU seconds between the starts of steps ``first`` and ``first + count``.

    The device is synchronised at those two points only. CPU time is the whole process's (every thread, the
    tokenizer's included): on a shared machine it moves less with other people's load than wall time does.
    """

    def __init__(self, first: int, count: int):
        self.first, self.count = first, count
        self.start: tuple[float, float] | None = None
        self.per_step: tuple[float, float] | None = None  # (wall, cpu) seconds per step

    def at_step_start(self, step: int, device: torch.device) -> None:
        if step not in (self.first, self.first + self.count):
            return
        synchronize(device)
        now = (time.perf_counter(), time.process_time())
        if step == self.first:
            self.start = now
        else:
            self.per_step = ((now[0] - self.start[0]) / self.count, (now[1] - self.start[1]) / self.count)


class StepClock(L.Callback):
    """A :class:`Stopwatch` at ``on_train_batch_start``. Installed first, so its hook runs before every other
    callback's: the window holds whole steps, every callback, logger and progress-bar update included."""

    def __init__(self, first: int, count: int):
        self.watch = Stopwatch(first, count)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.watch.at_step_start(batch_idx, pl_module.device)


def cli_callbacks(ckpt_dir: Path) -> list[L.Callback]:
    """What ``NanoCLI`` installs: its callback groups (evaluations disabled) and ``instantiate_trainer``'s list."""
    defaults = [RunState(), StepLine(), TokenThroughputMonitor(), LearningRateMonitor(logging_interval="step"),
                ReportWriter()]
    groups = [EMALossLogger(), BPBValidation(eval_every=-1), COREEvaluation(core_metric_every=-1),
              Sampler(sample_every=-1), ValidationLoss(eval_every=-1), ChatEvaluation(eval_metrics_every=-1),
              StepCheckpoint(dirpath=str(ckpt_dir)), PreemptionCheckpoint()]
    return defaults + groups  # no progress bar: the CLI shows one only on a terminal


def run_lightning(args: argparse.Namespace, base: Path, work: Path) -> tuple[float, float]:
    """(wall, CPU) seconds per step of (a): GPTModule under a Trainer set up like ``nanolit fit``."""
    B, T, total = args.device_batch_size, args.seq_len, args.device_batch_size * args.seq_len * args.grad_accum
    clock = StepClock(args.warmup, args.steps)
    module = GPTModule(depth=args.depth, max_seq_len=T, device_batch_size=B, total_batch_size=total,
                       num_iterations=args.warmup + args.steps + 1, compile=_compile_flag(args),
                       export=False)  # vocab_size comes from the data module, as NanoCLI links it
    data = BaseDataModule(base_dir=str(base), device_batch_size=B, max_seq_len=T, total_batch_size=total,
                          eval_tokens=B * T)
    L.seed_everything(42, verbose=False)  # NanoCLI's seed_everything_default
    trainer = L.Trainer(
        accelerator=args.device, devices=1, default_root_dir=str(work),
        precision="bf16-mixed" if args.device == "cuda" else "32-true",  # NanoCLI's defaults from here on
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=args.log_every, max_epochs=-1,
        enable_progress_bar=False, enable_model_summary=False,
        logger=CSVLogger(save_dir=str(work), name="logs"), callbacks=[clock] + cli_callbacks(work / "checkpoints"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Lightning's "few batches" hints: noise in a benchmark's output
        trainer.fit(module, datamodule=data)
    return clock.watch.per_step


def run_plain(args: argparse.Namespace, base: Path) -> tuple[float, float]:
    """(wall, CPU) seconds per step of (b): the same math in a bare loop."""
    device = torch.device(args.device)
    B, T, accum = args.device_batch_size, args.seq_len, args.grad_accum
    tokenizer = Tokenizer.from_directory(base / "tokenizer")
    train_files, _ = train_val_split(list_parquet_files(base / "base_data"))
    config = GPTConfig.from_depth(args.depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=T)
    torch.manual_seed(42)  # the Trainer's seed_everything; the weights come from init_weights(seed=42) either way
    model = build_gpt(config, device)
    train_model = torch.compile(model, dynamic=False) if _compile_flag(args) else model
    adamw, muon = build_optimizers(model)
    num_steps = args.warmup + args.steps + 1
    stream = TrainTokenStream(train_files, tokenizer, B, T, grad_accum_steps(B * T * accum, B, T),
                              pin_memory=device.type == "cuda")
    watch = Stopwatch(args.warmup, args.steps)
    for step in range(num_steps):
        watch.at_step_start(step, device)
        tokens, _ = next(stream)
        tokens = tokens.to(device, non_blocking=True)
        for a in range(accum):
            with autocast_context(device):
                loss = train_model(tokens[a, :, :-1], tokens[a, :, 1:])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lrm = lr_multiplier(step, num_steps, 0.0, 0.2, 0.0)  # GPTModule's defaults
        for opt in (adamw, muon):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    stream.close()
    return watch.per_step


def _compile_flag(args: argparse.Namespace) -> bool:
    return args.compile == "on" or (args.compile == "auto" and args.device == "cuda")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = prepare_base_dir(args.base_dir or default_base_dir(args.vocab_size), args.vocab_size)
    times: dict[str, list[tuple[float, float]]] = {"lightning": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="nanolit-overhead-") as tmp:
        for r in range(args.rounds):
            order = ["lightning", "plain"] if r % 2 == 0 else ["plain", "lightning"]
            for side in order:
                work = Path(tmp) / f"{side}{r}"
                wall, cpu = run_lightning(args, base, work) if side == "lightning" else run_plain(args, base)
                times[side].append((wall, cpu))
                shutil.rmtree(work, ignore_errors=True)
                print(f"round {r} {side:9s} {wall * 1000:9.2f} ms/step wall {cpu * 1000:9.2f} ms/step cpu", flush=True)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
    }
    for i, clock in enumerate(("wall", "cpu")):
        a = statistics.median(t[i] for t in times["lightning"])
        b = statistics.median(t[i] for t in times["plain"])
        result[clock] = {"lightning_ms": [round(t[i] * 1000, 3) for t in times["lightning"]],
                         "plain_ms": [round(t[i] * 1000, 3) for t in times["plain"]],
                         "median_lightning_ms": round(a * 1000, 3), "median_plain_ms": round(b * 1000, 3),
                         "ratio": round(a / b, 4)}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

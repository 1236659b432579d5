"""The Lightning tax: nanolit's training loop vs a plain PyTorch loop doing the same math (issue 7).

Both train the same GPT on the same tokens with the same config:

(a) ``GPTModule`` + ``BaseDataModule`` under a ``Trainer`` configured as ``nanolit fit`` configures it
    (``NanoCLI``): its trainer defaults, a CSV logger, and every default callback it installs (the evaluation
    groups ``bpb``/``core``/``sample``/``checkpoint`` plus EMA loss, throughput, LR monitor, report and the
    progress bar). The evaluations are set to never fire (``-1``): their work is nanochat's too, not a tax.
(b) a hand-written loop: ``TrainTokenStream`` -> forward/backward per micro-batch -> clip -> LR and momentum ->
    AdamW, Muon -> ``zero_grad``; no logging and no host syncs at all, so it is the cheapest way to do the math.

Runs alternate a, b, b, a, ... for ``--rounds`` rounds. Each run takes ``--warmup`` untimed steps, then times
``--steps`` steps from the start of one step to the start of the step after the last (so the callbacks' and
loggers' per-step work, the progress bar and the next batch's fetch all count), with a device sync only at the
two ends. The reported step time of each side is the median over its runs; the ratio is (a)/(b).

    python benchmarks/step_overhead.py                         # CPU: d4, B=4, T=256, vocab 4096
    python benchmarks/step_overhead.py --device cuda --device-batch-size 16 --seq-len 1024
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

from nanolit.callbacks import (BPBValidation, COREEvaluation, EMALossLogger, ReportWriter, Sampler, StepCheckpoint,
                               TokenThroughputMonitor)
from nanolit.callbacks.progress import NanoProgressBar
from nanolit.common import autocast_context, synchronize
from nanolit.data.corpus import write_default_corpus
from nanolit.data.datamodule import BaseDataModule
from nanolit.data.loader import TrainTokenStream, grad_accum_steps
from nanolit.data.shards import list_parquet_files, read_texts, train_val_split, write_shards_from_text
from nanolit.model import GPTConfig, build_gpt
from nanolit.module import GPTModule
from nanolit.optim import build_optimizers
from nanolit.schedules import lr_multiplier, muon_momentum
from nanolit.tokenizer import Tokenizer

DEFAULT_BASE = Path(tempfile.gettempdir()) / "nanolit-bench-base"


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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the GPT in both loops; auto = on CUDA only (GPTModule's default)")
    p.add_argument("--base-dir", type=Path, default=DEFAULT_BASE,
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
    texts = (text for path in train_files for rg in range(_row_groups(path)) for text in read_texts(path, rg))
    Tokenizer.train_from_iterator(texts, vocab_size).save(base / "tokenizer")
    return base


def _row_groups(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).num_row_groups


class StepClock(L.Callback):
    """Wall time from the start of step ``first`` to the start of step ``first + count`` (device-synced there only).

    Installed first, so its ``on_train_batch_start`` runs before every other callback's: the window holds whole
    steps, every callback, logger and progress-bar update included.
    """

    def __init__(self, first: int, count: int):
        self.first, self.count = first, count
        self.t0 = self.seconds = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx in (self.first, self.first + self.count):
            synchronize(pl_module.device)
            now = time.perf_counter()
            if batch_idx == self.first:
                self.t0 = now
            else:
                self.seconds = now - self.t0


def cli_callbacks(ckpt_dir: Path) -> list[L.Callback]:
    """What ``NanoCLI`` installs: its four callback groups (evaluations disabled) and ``instantiate_trainer``'s list."""
    groups = [BPBValidation(eval_every=-1), COREEvaluation(core_metric_every=-1), Sampler(sample_every=-1),
              StepCheckpoint(dirpath=str(ckpt_dir))]
    defaults = [EMALossLogger(), TokenThroughputMonitor(), LearningRateMonitor(logging_interval="step"),
                ReportWriter(), NanoProgressBar()]
    return groups + defaults


def run_lightning(args: argparse.Namespace, base: Path, work: Path) -> float:
    """Seconds per step of (a): GPTModule under a Trainer set up like ``nanolit fit``."""
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
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1, max_epochs=-1,
        logger=CSVLogger(save_dir=str(work), name="logs"), callbacks=[clock] + cli_callbacks(work / "checkpoints"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Lightning's "few batches" hints: noise in a benchmark's output
        trainer.fit(module, datamodule=data)
    return clock.seconds / args.steps


def run_plain(args: argparse.Namespace, base: Path) -> float:
    """Seconds per step of (b): the same math in a bare loop."""
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
    t0 = seconds = None
    for step in range(num_steps):
        if step in (args.warmup, args.warmup + args.steps):
            synchronize(device)
            now = time.perf_counter()
            if step == args.warmup:
                t0 = now
            else:
                seconds = now - t0
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
    return seconds / args.steps


def _compile_flag(args: argparse.Namespace) -> bool:
    return args.compile == "on" or (args.compile == "auto" and args.device == "cuda")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    base = prepare_base_dir(args.base_dir, args.vocab_size)
    times: dict[str, list[float]] = {"lightning": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="nanolit-overhead-") as tmp:
        for r in range(args.rounds):
            order = ["lightning", "plain"] if r % 2 == 0 else ["plain", "lightning"]
            for side in order:
                work = Path(tmp) / f"{side}{r}"
                seconds = run_lightning(args, base, work) if side == "lightning" else run_plain(args, base)
                times[side].append(seconds)
                shutil.rmtree(work, ignore_errors=True)
                print(f"round {r} {side:9s} {seconds * 1000:9.2f} ms/step", flush=True)
    a, b = statistics.median(times["lightning"]), statistics.median(times["plain"])
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
        "lightning_ms": [round(t * 1000, 3) for t in times["lightning"]],
        "plain_ms": [round(t * 1000, 3) for t in times["plain"]],
        "median_lightning_ms": round(a * 1000, 3), "median_plain_ms": round(b * 1000, 3), "ratio": round(a / b, 4),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

"""The callback matrix run for tests/test_cb_matrix.py: every nanolit callback on a toy module that is not nanolit's
GPT, for {manual, automatic optimization} x {accumulate 1, 4}, each fresh and resumed, in one process or in each of
two torchrun processes (gloo).

    python tests/_cb_matrix_script.py OUT_DIR                      # one process
    python -m torch.distributed.run --nproc_per_node=2 tests/_cb_matrix_script.py OUT_DIR

Time is a fake clock that moves only inside the module: ``MICRO_SECONDS`` per micro-batch of training and
``EVAL_SECONDS`` per validation batch, so every timing figure is exact. Rank zero writes one JSON file per cell.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cb_core import make_bundle  # noqa: E402
from test_cb_toys import Bigram, CharTokenizer, greedy_bigram, make_batches  # noqa: E402

from nanolit.callbacks import (BPBValidation, COREEvaluation, EMALossLogger, PreemptionCheckpoint,  # noqa: E402
                               ReportWriter, RunState, Sampler, StepCheckpoint, StepLine, TokenThroughputMonitor)

B, T, STEPS, MICRO_SECONDS, EVAL_SECONDS = 2, 8, 4, 0.25, 1.0


class Clock:
    """``time.perf_counter`` for the whole run: it moves only when the module says so."""

    now = 100.0

    def __call__(self) -> float:
        return self.now


CLOCK = Clock()
time.perf_counter = CLOCK


class Toy(L.LightningModule):
    """A bigram LM with the callback protocols; ``manual`` accumulates ``accum`` micro-batches inside one
    training_step (as nanolit's modules do), automatic optimization relies on ``accumulate_grad_batches``."""

    def __init__(self, vocab_size: int, accum: int, manual: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Bigram(vocab_size)
        self.accum, self.automatic_optimization = accum, not manual
        self.flops_per_token = 6.0 * vocab_size * vocab_size
        self.num_iterations = STEPS
        self.step_losses: dict[int, float] = {}  # optimizer step -> its mean micro-batch loss
        self._micro: list[float] = []

    @property
    def tokens_per_step(self) -> int:
        return B * T * self.accum * self.trainer.world_size

    @property
    def eval_model(self):
        return self.model

    def _loss(self, x, y):
        logits = self.model(x)
        CLOCK.now += MICRO_SECONDS
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            loss = self._loss(*batch)
            self._micro.append(loss.item())
            if len(self._micro) == self.accum:
                self.step_losses[self.global_step] = sum(self._micro) / self.accum
                self._micro = []
            return loss
        opt = self.optimizers()
        total = 0.0
        for x, y in zip(*batch):
            loss = self._loss(x, y)
            self.manual_backward(loss / self.accum)
            total += loss.detach()
        opt.step()
        opt.zero_grad()
        self.step_losses[self.global_step - 1] = float(total) / self.accum
        return {"loss": total / self.accum}

    def loss_per_token(self, x, y):
        CLOCK.now += EVAL_SECONDS
        logits = self.model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="none")

    def generate(self, tokens, max_tokens):
        return greedy_bigram(self.model, tokens, max_tokens, self.device)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class Data(L.LightningDataModule):
    """The same micro-batch every time (so ranks and resumed runs see the same data); fixed val batches."""

    def __init__(self, accum: int, manual: bool) -> None:
        super().__init__()
        self.accum, self.manual = accum, manual
        self.tokenizer = CharTokenizer()
        self.token_bytes = self.tokenizer.token_bytes()
        self.micro = make_batches(self.tokenizer, B, T, 1)[0]
        self.val = make_batches(self.tokenizer, B, T, 2, offset=37)

    def train_dataloader(self):
        if self.manual:  # one item holds a whole step: [accum, B, T] inputs and targets
            step = tuple(torch.stack([t] * self.accum) for t in self.micro)
            return DataLoader([step] * 1000, batch_size=None)
        return DataLoader([self.micro] * 1000, batch_size=None)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=None)


class Recorder(Logger):
    """Every ``log_metrics`` call: ``(step, name)`` pairs, to count what was logged at which step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        return

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))


class SaveCounter(L.Callback):
    def __init__(self) -> None:
        self.saved_at: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved_at.append(checkpoint["global_step"])


def run(out: Path, bundle: Path, manual: bool, accum: int, resume_from: Path | None = None) -> dict:
    data = Data(accum, manual)
    module = Toy(data.tokenizer.get_vocab_size(), accum, manual)
    state, recorder, saves = RunState(), Recorder(), SaveCounter()
    ckpt_dir = out / "checkpoints"
    callbacks = [state, StepLine(), TokenThroughputMonitor(peak_flops=1e9, warmup_steps=0), EMALossLogger(),
                 BPBValidation(eval_every=2), COREEvaluation(bundle_dir=str(bundle), core_metric_every=2),
                 Sampler(sample_every=2, prompts=["the cat"], max_tokens=3), ReportWriter(), saves,
                 StepCheckpoint(dirpath=str(ckpt_dir), save_every=2), PreemptionCheckpoint(check_every=1)]
    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), max_steps=STEPS, max_epochs=-1, logger=recorder,
                        callbacks=callbacks, accumulate_grad_batches=1 if manual else accum,
                        default_root_dir=out, log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        strategy="ddp" if torch.distributed.is_torchelastic_launched() else "auto",
                        num_nodes=1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    files = sorted(p.name for p in ckpt_dir.glob("step=*.ckpt")) if trainer.is_global_zero else []
    held = {name: _held(ckpt_dir / name) for name in files}
    state.flush()
    return {
        "world_size": trainer.world_size, "global_step": trainer.global_step,
        "step_losses": {str(k): v for k, v in module.step_losses.items()},
        "logged": recorder.rows, "saved_at": saves.saved_at, "checkpoints": held,
        "state": {k: v for k, v in state.state_dict().items()},
        "report": callbacks[7].report_path.exists() if trainer.is_global_zero else None,
        "series": callbacks[7].series.get("train/loss_raw"),
        "lines": [line for line in printed.getvalue().splitlines() if line.startswith("step ")],
        "weights": {k: v.tolist() for k, v in module.model.state_dict().items()},
    }


def _held(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    return {"global_step": ckpt["global_step"], "batches_processed": progress["processed"]}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    bundle = out_dir / "bundle"
    rank = int(os.environ.get("RANK", 0))
    if rank == 0 and not bundle.exists():
        make_bundle(bundle)
    while not (bundle / "eval_data" / "toy" / "lm.jsonl").exists():  # the other rank waits for rank zero's bundle
        time.sleep(0.05)
    for manual in (True, False):
        for accum in (1, 4):
            cell = f"{'manual' if manual else 'automatic'}-{accum}"
            fresh = run(out_dir / cell / "fresh", bundle, manual, accum)
            resumed = run(out_dir / cell / "resumed", bundle, manual, accum,
                          resume_from=out_dir / cell / "fresh" / "checkpoints" / "step=000002.ckpt")
            if rank == 0:
                (out_dir / f"{cell}.json").write_text(json.dumps({"fresh": fresh, "resumed": resumed}))
    if torch.distributed.is_initialized():  # leave together (a rank exiting early can abort its gloo peer)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

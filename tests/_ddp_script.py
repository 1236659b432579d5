"""The DDP-equivalence run for tests/test_ddp.py: ``GPTModule`` on synthetic token batches, on 1 or 2 CPU processes.

    python tests/_ddp_script.py OUT_DIR DEVICES [LOSS_CHUNK_SIZE] [NS_FP32]

With 2 devices Lightning's own launcher starts the second process (DDP over gloo). Each optimizer step has one
global batch of ``world_size * A`` micro-batches, and rank r takes micro-batches ``r*A .. r*A + A - 1``. So one
process with A = 4 and two processes with A = 2 see the same tokens at every step. Rank zero writes
``OUT_DIR/result.pt``: per step the weights before it, the loss (averaged over ranks), gradient norm and the
averaged, clipped gradient; the final GPT weights; and, for each gradient all-reduce, how many backward passes the
rank had run by then.

The weights nanochat initialises to zero (every ``c_proj`` and ``lm_head``) start from small random values here, so
every parameter has a gradient from the first step and a relative comparison of any of them means something.
``NS_FP32=1`` runs Muon's Newton-Schulz in fp32 instead of bf16 (``nanolit.optim.NS_DTYPE``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import nanolit.optim
from nanolit.callbacks import StepCheckpoint
from nanolit.module import GPTModule

VOCAB, B, T, STEPS = 256, 2, 16, 3
GLOBAL_MICRO_BATCHES = 4  # total_batch_size = 4 * B * T tokens per step, whatever the world size


def global_batch(step: int) -> torch.Tensor:
    """Step ``step``'s ``[4, B, T+1]`` tokens: arithmetic sequences mod VOCAB, so there is something to learn."""
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(VOCAB, (GLOBAL_MICRO_BATCHES, B, 1), generator=gen)
    stride = torch.randint(1, 8, (GLOBAL_MICRO_BATCHES, B, 1), generator=gen)
    return (start + stride * torch.arange(T + 1)) % VOCAB


class RankSlices(L.LightningDataModule):
    """This rank's share of every global batch."""

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        per_rank = GLOBAL_MICRO_BATCHES // world
        # a generator: Lightning would read a list as several dataloaders
        return (global_batch(s)[rank * per_rank:(rank + 1) * per_rank] for s in range(STEPS))


class CountingGPTModule(GPTModule):
    """``GPTModule`` that counts its backward passes, so the all-reduce hook can say after which one it ran, and
    starts from weights with no all-zero matrix."""

    backward_calls = 0

    def configure_model(self) -> None:
        super().configure_model()
        gen = torch.Generator().manual_seed(7)  # the same draws on every rank
        with torch.no_grad():
            for p in self.gpt.parameters():
                if not p.any():
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        self.backward_calls += 1
        super().manual_backward(loss, *args, **kwargs)


class Record(L.Callback):
    """Per step: weights before it, mean loss over ranks, gradient norm, gradient; and the backward count at each
    all-reduce."""

    def __init__(self) -> None:
        self.weights_before: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.grads: list[torch.Tensor] = []
        self.synced_after: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registers comm hooks on CUDA only; on CPU the DDP wrapper takes one directly.
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model.register_comm_hook(pl_module, self._hook)

    def _hook(self, module: CountingGPTModule, bucket):
        self.synced_after.append(module.backward_calls)
        return allreduce_hook(None, bucket)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights_before.append({k: v.detach().clone() for k, v in pl_module.gpt.state_dict().items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # the averaged, clipped gradient the optimizers are about to apply
        self.grads.append(torch.cat([p.grad.flatten() for p in pl_module.gpt.parameters()]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")))
        self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))  # before clipping


def make_module(loss_chunk_size: int = 0) -> CountingGPTModule:
    return CountingGPTModule(depth=1, max_seq_len=T, device_batch_size=B, total_batch_size=GLOBAL_MICRO_BATCHES * B * T,
                             num_iterations=STEPS, vocab_size=VOCAB, compile=False, export=False,
                             loss_chunk_size=loss_chunk_size)


def main(out_dir: Path, devices: int, loss_chunk_size: int = 0, ns_fp32: int = 0) -> None:
    torch.set_num_threads(1)  # two processes share the machine's cores; the test's reference uses 1 thread too
    if ns_fp32:
        nanolit.optim.NS_DTYPE = torch.float32
    module = make_module(loss_chunk_size)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=out_dir, log_every_n_steps=1,  # grad norm each step
                        callbacks=[record, StepCheckpoint(dirpath=str(out_dir / "checkpoints"), save_every=2)])
    trainer.fit(module, datamodule=RankSlices())
    if trainer.is_global_zero:
        torch.save({"world_size": trainer.world_size, "grad_accum_steps": module.grad_accum_steps,
                    "weights_before": record.weights_before, "losses": record.losses, "grads": record.grads,
                    "grad_norms": record.grad_norms, "synced_after": record.synced_after,
                    "weights": module.gpt.state_dict()}, out_dir / "result.pt")
    if torch.distributed.is_initialized():  # leave together (a rank exiting early can abort its gloo peer)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), *map(int, sys.argv[3:]))

"""``NoWrapDDPStrategy``: Lightning's DDP without the ``DistributedDataParallel`` wrapper.

nanochat has no DDP wrapper: its optimizers average the gradients themselves (reduce-scatter) and shard their
state (``nanolit.sharded``). Under Lightning's stock DDP every gradient would be all-reduced once more by the
wrapper, doubling the traffic for nothing. This strategy keeps everything else DDP gives (launchers: popen,
torchrun, SLURM; the process group; samplers; rank-zero logging and checkpointing) and leaves the LightningModule
unwrapped, so gradients stay local until the optimizers reduce them; ``block_backward_sync`` becomes a no-op.
DDP's own options (``find_unused_parameters``, comm hooks, ...) do not apply.

Use it with sharded optimizers: ``--trainer.strategy.class_path=nanolit.strategies.NoWrapDDPStrategy`` (YAML:
``strategy: {class_path: nanolit.strategies.NoWrapDDPStrategy}``), or ``--trainer.strategy=ddp_nowrap`` once this
module is imported. A bare ``--trainer.strategy=nanolit.strategies.NoWrapDDPStrategy`` does not work: jsonargparse
passes it on as a strategy name, which Lightning does not know.
"""
from __future__ import annotations

import lightning.pytorch as L
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from nanolit.common import NanolitError


def broadcast_module_states(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank, in place: what DDP's constructor guarantees.

    nanolit seeds its init identically on every rank, as nanochat does, so this is a safety net against a rank
    that started from different weights, which nothing would ever pull back into line afterwards.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        dist.broadcast(tensor.detach(), src=src)


class NoWrapDDPStrategy(DDPStrategy):
    """DDP launch and process group with the LightningModule left unwrapped, for self-averaging optimizers.

    Refuses to fit with an optimizer that does not average gradients itself (no ``averages_gradients = True``
    attribute, as ``nanolit.sharded``'s optimizers have): the ranks would silently train apart.
    """

    strategy_name = "ddp_nowrap"

    def configure_ddp(self) -> None:
        if not isinstance(self.model, L.LightningModule):
            raise TypeError(f"NoWrapDDPStrategy expects the LightningModule, got {type(self.model).__name__}")
        broadcast_module_states(self.model)

    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        for optimizer in self.optimizers:
            if not getattr(optimizer, "averages_gradients", False):
                raise NanolitError(
                    f"NoWrapDDPStrategy leaves gradients unsynchronised, but {type(optimizer).__name__} does not "
                    f"average them itself; set --model.shard_optimizer=true or use --trainer.strategy=ddp")


if NoWrapDDPStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(NoWrapDDPStrategy.strategy_name, NoWrapDDPStrategy,
                              description="DDP without the module wrapper, for nanolit's sharded optimizers")

__all__ = ["NoWrapDDPStrategy", "broadcast_module_states"]

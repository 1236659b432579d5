"""The 2026 optimizer sharded across ranks: nanochat 92d63d4's ``MuonAdamW`` as it runs under DDP (ZeRO-2 style).

Each ``step()`` averages the gradients over ranks itself (train under ``nanolit.strategies.NoWrapDDPStrategy``, no DDP
wrapper), updates this rank's share with the single-process math of ``nanolit.optim2026``, and gathers the result:

- an AdamW parameter of >= 1024 elements: reduce-scatter by rows, update rank r's rows ``[r*R, (r+1)*R)``
  (R = rows/W, so its first dim must divide by W), all-gather; a smaller one: all-reduce, every rank updates all of
  it (its state is replicated);
- a Muon group of K same-shape matrices: stacked and zero-padded to ``C*W`` (C = ceil(K/W)), reduce-scattered so
  rank r receives matrices ``[r*C, (r+1)*C)``, updated there (momentum buffers of C matrices per rank), all-gathered.

This rank's state is exactly its part of nanochat's per-rank optimizer file (``nanolit.optim2026.share_state``).
Checkpoints follow ``nanolit.sharded``'s protocol (what Lightning's strategies call): ``consolidate_state_dict()`` on
every rank, then ``state_dict()`` on rank 0 gives the single-process ``MuonAdamW`` layout; ``load_state_dict(full)``
keeps this rank's share, so a run resumes on any world size, sharded or not. Plain torch: no Lightning here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nanolit.common import NanolitError
from nanolit.optim2026 import (MuonAdamW, _adamw_sharded, _grad, build_muon_adamw, merge_states, muon_chunk,
                               share_state)
from nanolit.sharded import (_all_gather_tensor, _gather_to, _mean_op, _reduce_scatter_tensor, _run_closure,
                             _ShardedState, _world)


class DistMuonAdamW(_ShardedState, MuonAdamW):
    """``MuonAdamW`` with its gradient averaging, state and work sharded over the ranks (see the module docstring).

    Construct after the process group is up: the AdamW rows are checked against the world size here.
    """

    averages_gradients = True  # the protocol NoWrapDDPStrategy checks: no DDP wrapper needed

    def __init__(self, param_groups: list[dict], compute_dtype: torch.dtype = torch.float32):
        super().__init__(param_groups, compute_dtype=compute_dtype)
        world, _ = _world()
        for p, group in self._indexed():
            if group["kind"] == "adamw" and _adamw_sharded(p.numel(), world) and p.size(0) % world:
                raise NanolitError(f"sharded AdamW splits '{group.get('name', 'param')}' {tuple(p.shape)} by rows "
                                   f"over {world} ranks, but {p.size(0)} rows do not divide evenly; use a world size "
                                   f"that divides it or turn optimizer sharding off")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Reduce every gradient, update this rank's share, gather the parameters (three phases, so that the
        communication of later groups overlaps the updates of earlier ones)."""
        loss = _run_closure(closure)
        world, rank = _world()
        if world == 1:
            super().step()
            return loss
        op, divide = _mean_op()
        pending = [self._launch_reduce(group, p, world, op) for group in self.param_groups
                   for p in (group["params"] if group["kind"] == "adamw" else group["params"][:1])]
        gathers = []
        for group, p, received, stacked, work in pending:
            work.wait()
            if divide:
                received.div_(world)
            gathers.append(self._update_share(group, p, received, stacked, world, rank))
        for work, copy_back in filter(None, gathers):
            work.wait()
            if copy_back is not None:
                params, stacked = copy_back
                torch._foreach_copy_(params, list(stacked[:len(params)].unbind(0)))
        return loss

    def _launch_reduce(self, group: dict, p: Tensor, world: int, op) -> tuple:
        """Start averaging one AdamW parameter's gradient, or a Muon group's (``p`` its first parameter):
        ``(group, p, this rank's received gradient, the Muon gradient stack or None, work)``."""
        if group["kind"] == "adamw":
            grad = _grad(p)
            if not _adamw_sharded(p.numel(), world):
                return group, p, grad, None, dist.all_reduce(grad, op=op, async_op=True)
            received = torch.empty_like(grad[:p.size(0) // world])
            return group, p, received, None, _reduce_scatter_tensor(received, grad, op)
        params = group["params"]
        chunk = muon_chunk(len(params), world)
        stacked = p.new_zeros(chunk * world, *p.shape)
        stacked[:len(params)] = torch.stack([_grad(q) for q in params])
        received = p.new_empty(chunk, *p.shape)
        return group, p, received, stacked, _reduce_scatter_tensor(received, stacked, op)

    def _update_share(self, group: dict, p: Tensor, received: Tensor, stacked: Tensor | None, world: int, rank: int):
        """Update this rank's share with the averaged gradient; returns ``(gather work, copy-back)`` or None."""
        if group["kind"] == "adamw":
            if not _adamw_sharded(p.numel(), world):
                self._adamw_update(p, received, self.state[p], group)
                return None
            rows = p.size(0) // world
            mine = p[rank * rows:(rank + 1) * rows]  # a view: the update lands in p, the gather fills the rest
            self._adamw_update(mine, received, self.state[p], group)
            return _all_gather_tensor(p, mine), None
        params = group["params"]
        chunk = received.size(0)
        first = rank * chunk
        owned = min(chunk, max(0, len(params) - first))
        mine = p.new_zeros(chunk, *p.shape)
        if owned:
            mine[:owned] = torch.stack(params[first:first + owned])
        self._muon_update(received, mine, self._muon_state(group, chunk), group, owned)
        return _all_gather_tensor(stacked, mine), (params, stacked)  # the gradient stack is free again: reuse it

    def _indexed_states(self):
        """``(index, parameter, group)`` of every parameter that carries state (a Muon group's first one)."""
        i = 0
        for group in self.param_groups:
            for j, p in enumerate(group["params"]):
                if group["kind"] == "adamw" or j == 0:
                    yield i, p, group
                i += 1

    def _gather_state(self, to: int, world: int, rank: int) -> dict:
        full = {}
        for i, p, group in self._indexed_states():
            state = self.state.get(p)
            if not state:  # the same on every rank: all ranks step every group
                continue
            tensors = {k: _gather_to(v, to, world, rank) for k, v in state.items() if torch.is_tensor(v)}
            if rank == to:
                parts = [{**state, **{k: v[r] for k, v in tensors.items()}} for r in range(world)]
                full[i] = merge_states(group, parts, p.numel())
        return full

    def _share(self, p: Tensor, group: dict, state: dict) -> dict:
        world, rank = _world()
        return share_state(group, state, p.numel(), rank, world)


def build_sharded_muon_adamw(model: nn.Module, **lrs: float) -> DistMuonAdamW:
    """``nanolit.optim2026.build_muon_adamw`` as a :class:`DistMuonAdamW`: the same groups, names and LRs, so
    checkpoints move between the two. Construct after the process group is up."""
    return build_muon_adamw(model, optimizer_cls=DistMuonAdamW, **lrs)


__all__ = ["DistMuonAdamW", "build_sharded_muon_adamw"]

"""Sharded optimizers: nanochat's DistAdamW and DistMuon, which split the optimizer state and its work across ranks.

ZeRO-2 style (nanochat d575940 nanochat/muon.py, nanochat/adamw.py). Each ``step()`` reduce-scatters the gradients (mean
over ranks), applies the single-process math to this rank's share of the parameters only, and all-gathers the updated
parameters:

- ``DistAdamW`` shards every parameter by rows (dim 0): each rank keeps 1/W of ``exp_avg`` and ``exp_avg_sq``;
- ``DistMuon`` hands whole matrices to ranks block-cyclically inside each shape group: each rank keeps ~1/W of the
  momentum buffers and runs ~1/W of the Newton-Schulz work.

They average the gradients themselves, so the model must not also be DDP-wrapped (that would all-reduce every
gradient a second time): train under ``nanolit.strategies.NoWrapDDPStrategy``. Whatever runs between backward and
``step()`` (gradient clipping, grad-norm logging) therefore sees each rank's local, unsynchronised gradient, which
is what nanochat does (its base_train clips before DistAdamW/DistMuon average): the clip is per rank, and only one
process is identical to unsharded training.

Checkpoints use torch's ``ZeroRedundancyOptimizer`` protocol, which Lightning's ``Strategy.optimizer_state``
calls: ``consolidate_state_dict()`` on every rank, then ``state_dict()`` on rank 0 returns the
state in the single-process layout (``torch.optim.AdamW`` / ``nanolit.optim.Muon``), on CPU, weights_only-safe.
``load_state_dict(full)`` keeps this rank's share. A run can thus resume on another world size, or switch between
sharded and unsharded optimizers. Plain torch: no Lightning here.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nanolit.common import NanolitError
from nanolit.optim import Muon, keep_group_keys, build_optimizers, muon_update


def _world() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) when none is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _mean_op() -> tuple[dist.ReduceOp, bool]:
    """The reduction that averages gradients over ranks, and whether its result still needs dividing by W.

    nanochat reduces with AVG (NCCL). Gloo rejects AVG before torch 2.13, so elsewhere we sum, then divide.
    """
    if dist.get_backend() == "nccl":
        return dist.ReduceOp.AVG, False
    return dist.ReduceOp.SUM, True


def _reduce_scatter_tensor(out: Tensor, inp: Tensor, op: dist.ReduceOp) -> dist.Work:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13
    return fn(out, inp, op=op, async_op=True)


def _all_gather_tensor(out: Tensor, inp: Tensor) -> dist.Work:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    return fn(out, inp, async_op=True)


def _gather_to(t: Tensor, to: int, world: int, rank: int) -> list[Tensor] | None:
    """Every rank's ``t`` (one shape on all ranks) as CPU copies on rank ``to``; None on the other ranks.

    A collective: every rank calls it. One tensor at a time, so rank ``to`` never holds more than W of them on the
    accelerator, and the consolidated state lands on CPU, where sharding never meant to keep it.
    """
    if world == 1:
        return [t.to("cpu", copy=True)]
    parts = [torch.empty_like(t) for _ in range(world)] if rank == to else None
    dist.gather(t.contiguous(), parts, dst=to)
    return [part.cpu() for part in parts] if rank == to else None


def _run_closure(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """Run Lightning's closure (it fires the before-step hooks) with grad enabled, like torch's optimizers."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _ShardedState:
    """The checkpoint half shared by both optimizers: consolidate, state_dict and load_state_dict.

    Subclasses provide ``_gather_state(to, world, rank) -> {index: state}`` (a collective; full tensors on rank
    ``to``) and ``_share(p, group, state) -> state | None`` (this rank's part of one parameter's full state).
    Indices are torch's: a parameter's position in the flat list of ``param_groups``.
    """

    _consolidated: dict | None = None
    param_groups: list[dict]

    def _indexed(self) -> list[tuple[Tensor, dict]]:
        return [(p, group) for group in self.param_groups for p in group["params"]]

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the full state to rank ``to`` for its next ``state_dict()``. Every rank must call it."""
        world, rank = _world()
        full = self._gather_state(to, world, rank)
        self._consolidated = full if rank == to else None

    def state_dict(self) -> dict:
        """The single-process layout, after ``consolidate_state_dict()`` on this rank (or at world size 1).

        The consolidated state is handed out once, so a stale copy can never be saved by mistake.
        """
        if self._consolidated is None:
            if _world()[0] > 1:
                raise RuntimeError(f"{type(self).__name__}.state_dict() needs consolidate_state_dict() on every rank "
                                   f"first (Lightning's checkpointing calls it)")
            self.consolidate_state_dict()
        full, self._consolidated = self._consolidated, None
        packed = super().state_dict()  # torch's param_groups (indices, hyperparameters); its state is our shard
        packed["state"] = full
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a single-process-layout state (consolidated, or saved by the unsharded optimizer), keeping only
        this rank's share. Every rank loads the same full state; none needs to talk to the others."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        shares = {}
        for i, (p, group) in zip(saved_ids, self._indexed()):
            if i in state_dict["state"]:
                share = self._share(p, group, state_dict["state"][i])
                if share is not None:
                    shares[i] = share
        super().load_state_dict({**state_dict, "state": shares})  # checks the group layout, casts to p's device
        self._consolidated = None


def _rows_per_rank(p: Tensor, world: int, group: dict) -> int:
    if p.size(0) % world:
        raise NanolitError(
            f"sharded AdamW splits '{group.get('name', 'param')}' {tuple(p.shape)} by rows over {world} ranks, but "
            f"{p.size(0)} rows do not divide evenly; use a vocab_size divisible by {world} (nanochat pads it to a "
            f"multiple of 64) or turn optimizer sharding off")
    return p.size(0) // world


class DistAdamW(_ShardedState, torch.optim.AdamW):
    """AdamW with its state sharded by rows across ranks (nanochat d575940 nanochat/adamw.py; nanochat's ``DistAdamW``).

    A ``torch.optim.AdamW`` in constructor, defaults and ``param_groups``, so a consolidated ``state_dict()`` is a
    ``torch.optim.AdamW`` one (``step`` a float32 CPU scalar as torch keeps it; nanochat keeps an int64). Honours
    ``lr``, ``betas``, ``eps`` and ``weight_decay``; torch's implementation switches (``foreach``, ``fused``, ...)
    do not apply and are only carried along; ``amsgrad`` and ``maximize`` are refused.

    Per parameter, rank r owns rows ``[r*R, (r+1)*R)`` with ``R = rows/W``; every parameter's dim 0 must divide by
    W (the vocab, for nanochat's embedding and unembedding). With ``g`` the rank-mean gradient of those rows::

        p *= 1 - lr*wd;  m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²
        p -= lr * sqrt(1-β2^t) / (1-β1^t) * m / (sqrt(v) + eps)

    eps placement is nanochat's: eps is added to sqrt(v) before the bias correction, whereas torch computes
    ``sqrt(v)/sqrt(1-β2^t) + eps``. nanochat's update is torch's with eps replaced by ``eps/sqrt(1-β2^t)``
    (4.5x larger at t=1 with β2=0.95). At eps=1e-10 this is negligible, except for gradient
    entries within a few orders of magnitude of eps, whose Adam-normalised steps then differ by a large factor:
    a d2 GPT with vocab 64 (wte lr 0.49) drifts ~1e-2 from an unsharded run in 4 steps. Same for nanochat.
    """

    averages_gradients = True  # the protocol NoWrapDDPStrategy checks: no DDP wrapper needed

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._check_groups()

    def _check_groups(self) -> None:
        world, _ = _world()
        for p, group in self._indexed():
            if group.get("amsgrad") or group.get("maximize"):
                raise NanolitError(f"DistAdamW implements plain AdamW; group '{group.get('name', '?')}' asks for "
                                   f"amsgrad or maximize: drop them or use torch.optim.AdamW unsharded")
            _rows_per_rank(p, world, group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Reduce-scatter every gradient, update this rank's rows, all-gather the parameters (nanochat d575940
        nanochat/adamw.py)."""
        loss = _run_closure(closure)
        world, rank = _world()
        op, divide = _mean_op() if world > 1 else (None, False)
        pending = []
        for p, group in self._indexed():  # launch every reduce-scatter first, so they overlap the updates
            if p.grad is None:
                raise RuntimeError(f"DistAdamW: parameter '{group.get('name', '?')}' has no gradient")
            rows = _rows_per_rank(p, world, group)
            if world == 1:
                pending.append((p, group, p.grad, None, rows))
                continue
            g = torch.empty_like(p.grad[:rows])
            pending.append((p, group, g, _reduce_scatter_tensor(g, p.grad, op), rows))
        gathers = []
        for p, group, g, work, rows in pending:
            if work is not None:
                work.wait()
                if divide:
                    g.div_(world)
            p_rows = p[rank * rows:(rank + 1) * rows]
            self._update(p_rows, g, self.state[p], group)
            if world > 1:
                gathers.append(_all_gather_tensor(p, p_rows))  # in place: p_rows is this rank's block of p
        for work in gathers:
            work.wait()
        return loss

    @staticmethod
    def _update(p: Tensor, g: Tensor, state: dict, group: dict) -> None:
        """nanochat's AdamW update of ``p`` (this rank's rows) with the rank-mean gradient ``g`` (nanochat d575940
        nanochat/adamw.py)."""
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            # the param's dtype: bf16 for nanochat's CUDA wte (nanochat d575940 nanochat/adamw.py)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"].item()
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        if wd != 0:
            p.mul_(1 - lr * wd)  # decoupled, before the update
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)
        p.sub_(exp_avg.div(exp_avg_sq.sqrt().add_(group["eps"])).mul_(step_size))

    def _gather_state(self, to: int, world: int, rank: int) -> dict:
        full = {}
        for i, (p, _) in enumerate(self._indexed()):
            state = self.state.get(p)
            if not state:  # the same on every rank: each rank owns rows of every parameter
                continue
            parts = {key: _gather_to(state[key], to, world, rank) for key in ("exp_avg", "exp_avg_sq")}
            if rank == to:
                full[i] = {"step": state["step"].to("cpu", copy=True), **{k: torch.cat(v) for k, v in parts.items()}}
        return full

    def _share(self, p: Tensor, group: dict, state: dict) -> dict:
        world, rank = _world()
        rows = _rows_per_rank(p, world, group)
        # clone: a view would keep the whole loaded tensor alive
        return {k: v[rank * rows:(rank + 1) * rows].clone() if torch.is_tensor(v) and v.shape == p.shape else v
                for k, v in state.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            # torch moves `step` to the device for a fused optimizer's state; ours stays a CPU scalar
            state["step"] = state["step"].to("cpu", torch.float32)
        self._check_groups()


class DistMuon(_ShardedState, Muon):
    """Muon with the matrices' work and momentum sharded across ranks (nanochat d575940 nanochat/muon.py; nanochat's
    ``DistMuon``).

    A ``nanolit.optim.Muon`` in constructor and ``param_groups`` (one per numel), so a consolidated
    ``state_dict()`` is a ``Muon`` one. For the communication, parameters are grouped by shape (shapes sorted,
    model order inside); within a shape group, matrix i belongs to rank ``i % W``. Walking each shape group in
    chunks of W matrices (the last chunk padded with a zero matrix): reduce-scatter the chunk's gradients so each
    rank receives the rank-mean gradient of the matrix it owns, apply exactly ``Muon``'s update to it (momentum
    only on the owner), then all-gather the chunk's updated matrices into every rank's parameters.
    """

    averages_gradients = True  # the protocol NoWrapDDPStrategy checks: no DDP wrapper needed

    def _shape_groups(self) -> list[list[tuple[Tensor, dict]]]:
        by_shape: dict[tuple[int, ...], list[tuple[Tensor, dict]]] = {}
        for p, group in self._indexed():  # a shape lives in one numel group, where model order is kept
            by_shape.setdefault(tuple(p.shape), []).append((p, group))
        return [by_shape[shape] for shape in sorted(by_shape)]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Reduce-scatter, update the owned matrices, all-gather, chunk by chunk (nanochat d575940 nanochat/muon.py)."""
        loss = _run_closure(closure)
        world, rank = _world()
        shape_groups = self._shape_groups()
        for p, _ in (member for members in shape_groups for member in members):
            if p.grad is None:
                raise RuntimeError(f"DistMuon: a parameter of shape {tuple(p.shape)} has no gradient")
        if world == 1:  # exactly Muon's step: the same batches of one shape, the same function
            for members in shape_groups:
                params = [p for p, _ in members]
                muon_update(params, [p.grad for p in params], [self.state[p] for p in params], members[0][1],
                            compiled=self.compile_ns)
            return loss

        op, divide = _mean_op()
        pending = []  # launch every reduce-scatter first, so later chunks travel while earlier ones are updated
        for members in shape_groups:
            zero = torch.zeros_like(members[0][0])
            for base in range(0, len(members), world):
                chunk = members[base:base + world]
                inputs = [p.grad for p, _ in chunk] + [zero] * (world - len(chunk))
                out = chunk[rank][0].grad if rank < len(chunk) else torch.empty_like(zero)
                pending.append((chunk, zero, out, dist.reduce_scatter(out, inputs, op=op, async_op=True)))
        gathers = []
        for chunk, zero, out, work in pending:
            work.wait()
            mine = rank < len(chunk)
            if mine:
                if divide:
                    out.div_(world)
                p, group = chunk[rank]
                muon_update([p], [out], [self.state[p]], group, compiled=self.compile_ns)
            outputs = [p for p, _ in chunk] + [torch.empty_like(zero) for _ in range(world - len(chunk))]
            gathers.append(dist.all_gather(outputs, chunk[rank][0] if mine else zero, async_op=True))
        for work in gathers:
            work.wait()
        return loss

    def _gather_state(self, to: int, world: int, rank: int) -> dict:
        index = {p: i for i, (p, _) in enumerate(self._indexed())}
        stepped = torch.tensor(float(any(self.state.get(p) for p in index)), device=next(iter(index)).device)
        if world > 1:
            dist.all_reduce(stepped, op=dist.ReduceOp.MAX)  # a rank may own no matrix at all
        full = {}
        if not stepped.item():
            return full
        for members in self._shape_groups():
            zero = torch.zeros_like(members[0][0])
            for base in range(0, len(members), world):
                chunk = members[base:base + world]
                # a missing buffer is a zero one: Muon starts every buffer at zero (nanochat d575940 nanochat/muon.py)
                mine = self.state.get(chunk[rank][0], {}).get("momentum_buffer", zero) if rank < len(chunk) else zero
                parts = _gather_to(mine, to, world, rank)
                if parts is not None:
                    full.update({index[p]: {"momentum_buffer": part} for (p, _), part in zip(chunk, parts)})
        return full

    def owners(self, world: int) -> dict[Tensor, int]:
        """The rank that owns each matrix at world size ``world``: the i-th of its shape group goes to ``i % world``."""
        return {p: i % world for members in self._shape_groups() for i, (p, _) in enumerate(members)}

    def _share(self, p: Tensor, group: dict, state: dict) -> dict | None:
        world, rank = _world()
        return state if self.owners(world)[p] == rank else None


def build_sharded_optimizers(
    model: nn.Module,
    *,
    unembedding_lr: float = 0.004,
    embedding_lr: float = 0.2,
    matrix_lr: float = 0.02,
    weight_decay: float = 0.0,
    compile_ns: bool | None = None,
) -> list[torch.optim.Optimizer]:
    """``build_optimizers`` with ``[DistAdamW, DistMuon]`` in place of ``[AdamW, Muon]`` (nanochat d575940
    nanochat/gpt.py; nanochat under DDP).

    The same parameters, group order, LRs, ``initial_lr`` and ``name`` as ``nanolit.optim.build_optimizers``
    (which does the split, the LR scaling and the coverage check), so checkpoints move between the two.
    Construct after the process group is up (Lightning's ``configure_optimizers`` is): the AdamW rows are checked
    against the world size here.
    """
    adamw, muon = build_optimizers(model, unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                   matrix_lr=matrix_lr, weight_decay=weight_decay, compile_ns=compile_ns)
    # every group key carried over, torch's switches included (fused): an unsharded resume keeps them
    dist_adamw = DistAdamW([{**group} for group in adamw.param_groups])
    # Muon groups by numel in set order, which depends on insertion order: feed DistMuon the same sequence
    # (model order), then check the layouts agree, since state_dict indices depend on them.
    order = {id(p): i for i, p in enumerate(model.parameters())}
    matrices = sorted((p for group in muon.param_groups for p in group["params"]), key=lambda p: order[id(p)])
    dist_muon = DistMuon(matrices, compile_ns=muon.compile_ns)
    for ours, theirs in zip(dist_muon.param_groups, muon.param_groups, strict=True):
        if [id(p) for p in ours["params"]] != [id(p) for p in theirs["params"]]:
            raise RuntimeError("DistMuon's parameter groups differ from Muon's; checkpoints would not transfer")
        ours.update({k: v for k, v in theirs.items() if k != "params"})
    for opt in (dist_adamw, dist_muon):
        keep_group_keys(opt, ("name", "initial_lr"))
    return [dist_adamw, dist_muon]


__all__ = ["DistAdamW", "DistMuon", "build_sharded_optimizers"]

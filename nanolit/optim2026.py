"""nanochat 92d63d4's single optimizer: Muon for the transformer's matrices, AdamW for everything else.

One ``MuonAdamW`` holds both kinds of parameter group (``kind`` "adamw" or "muon"), with nanochat's group
layout and state layout, so its ``state_dict`` loads nanochat's ``optim_*_rank0.pt`` and nanochat loads ours.

- AdamW: decoupled weight decay, then the moments, bias corrections and update, all in fp32 whatever the parameter's
  dtype (bf16 embeddings on GPU), eps added to sqrt(v / (1 - beta2^t)).
- Muon, per group of same-shape matrices stacked into one tensor: Nesterov momentum; MuonEq row equilibration;
  Polar Express orthogonalisation (bf16 only when the compute dtype is bf16); Muon+ renormalisation of the
  Frobenius norm to sqrt(min(rows, cols)); NorMuon's factored second moment; cautious weight decay; the LR times
  sqrt(max(1, rows/cols)).
- No gradient clipping in this recipe.

The step functions are compiled on CUDA (as nanochat compiles them) and eager elsewhere; hyperparameters reach them
as 0-D fp32 CPU tensors, so their arithmetic is fp32 like nanochat's and new values never recompile.
The sharded form under DDP is ``nanolit/sharded2026.py``; :func:`rank_state_dict` and :func:`merge_rank_state_dicts`
convert between this single-process layout and nanochat's per-rank files.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor, nn

from nanolit.common import NanolitError
from nanolit.optim import check_coverage, keep_group_keys

# nanochat 92d63d4 nanochat/optim.py: Polar Express (arXiv 2505.16932) for 5 iterations, safety factor 2e-2,
# cushion 2. Each iteration maps a singular value x to a x + b x^3 + c x^5 with its own (a, b, c), a minimax
# schedule that brings every singular value above ~1e-3 of the largest close to 1 in five steps.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
MUON_KEYS = ("lr", "momentum", "ns_steps", "beta2", "weight_decay")
ADAMW_EPS = 1e-10


def adamw_step(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
               beta1: Tensor, beta2: Tensor, eps: Tensor, wd: Tensor) -> None:
    """One AdamW update of ``p`` in place; the hyperparameters are 0-D fp32 tensors (nanochat's adamw_step_fused)."""
    # fp32 math for bf16 parameters too: 1 - beta2 and the moments lose too much in bf16
    p32, m, v, g = p.float(), exp_avg.float(), exp_avg_sq.float(), grad.float()
    p32.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.lerp_(g.square(), 1 - beta2)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = (v / bias2).sqrt() + eps
    p32.add_(m / denom, alpha=-(lr / bias1))
    p.copy_(p32)  # no-ops when everything is already fp32
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def polar_express(X: Tensor, ns_steps: int) -> Tensor:
    """Approximately orthogonalise every matrix of the stack ``X`` (..., rows, cols): U S V^T -> U S' V^T, S' ~ 1.

    Frobenius-normalised first (with 1% headroom) so that every singular value starts in (0, 1]. The Gram matrix is
    taken on the smaller side (X^T X for tall matrices, X X^T for wide ones).
    """
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    return X


def muon_step(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum_buffer: Tensor,
              momentum: Tensor, lr: Tensor, wd: Tensor, beta2: Tensor, ns_steps: int, red_dim: int,
              ortho_bf16: bool) -> None:
    """One Muon update of the stacked ``params`` (K, rows, cols) in place; ``grads`` is overwritten.

    ``lr`` already includes the shape factor; ``red_dim`` is the dim the second moment averages over (-1 for tall or
    square matrices, whose buffer is (K, rows, 1); -2 for wide ones, (K, 1, cols)). nanochat's muon_step_fused.
    """
    momentum = momentum.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)  # Nesterov: the gradient pushed further along the momentum
    X = g.bfloat16() if ortho_bf16 else g
    # MuonEq: every row rescaled to the mean row norm, a better-conditioned spectrum for the orthogonalisation
    target = X.float().norm(dim=(-2, -1), keepdim=True) / (X.size(-2) ** 0.5)
    row_norm = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (target / row_norm).to(X.dtype)
    g = polar_express(X, ns_steps).to(params.dtype)
    # Muon+: the Frobenius norm of an exactly semi-orthogonal matrix, correcting an under-converged polar step
    target_norm = min(g.size(-2), g.size(-1)) ** 0.5
    g = g * (target_norm / g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(g.dtype)
    # NorMuon: per-row (or per-column) adaptive scale from a factored second moment, total norm preserved
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2.to(g.dtype))
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * red_size) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # cautious weight decay: decay only the entries the update moves towards zero anyway
    lr, wd = lr.to(g.dtype), wd.to(g.dtype)
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # Built on first CUDA use only: CPU runs and imports never pay for torch.compile. dynamic=False like nanochat:
    # a GPT has a handful of shapes, and the hyperparameters are tensors, so nothing else recompiles.
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _on_device(fn: Callable, t: Tensor) -> Callable:
    return _compiled(fn) if t.is_cuda else fn


def muon_lr_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """Tall matrices (mlp.c_fc) take the per-element RMS step of square ones: sqrt(max(1, rows/cols))."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


def second_moment_shape(num: int, shape: torch.Size | tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """``(buffer shape, red_dim)`` of NorMuon's factored second moment for ``num`` matrices of ``shape``."""
    rows, cols = shape[-2], shape[-1]
    return ((num, rows, 1), -1) if rows >= cols else ((num, 1, cols), -2)


class MuonAdamW(torch.optim.Optimizer):
    """nanochat 92d63d4's ``MuonAdamW`` on one process.

    ``param_groups``: dicts with ``kind`` "adamw" (keys lr, betas, eps, weight_decay) or "muon" (lr, momentum,
    ns_steps, beta2, weight_decay; all its parameters one 2-D shape). State layout: per AdamW parameter ``step``
    (int), ``exp_avg``, ``exp_avg_sq``; per Muon group, on its first parameter, ``momentum_buffer`` (K, rows, cols)
    and ``second_momentum_buffer``. ``compute_dtype`` bf16 runs the orthogonalisation in bf16.
    """

    def __init__(self, param_groups: list[dict], compute_dtype: torch.dtype = torch.float32):
        for group in param_groups:
            _check_group(group)
        super().__init__(param_groups, defaults={})
        self.compute_dtype = compute_dtype
        # 0-D CPU fp32 tensors: fp32 hyperparameter arithmetic, and a compiled step never recompiles for new values
        names = ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")
        self._t = {name: torch.zeros((), dtype=torch.float32) for name in names}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every group. ``closure`` (Lightning passes one) runs first, with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    self._adamw_update(p, _grad(p), self.state[p], group)
            else:
                params = group["params"]
                stacked = torch.stack(params)
                state = self._muon_state(group, len(params))
                self._muon_update(torch.stack([_grad(p) for p in params]), stacked, state, group, len(params))
                torch._foreach_copy_(params, list(stacked.unbind(0)))
        return loss

    def _adamw_update(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        """AdamW on ``p`` (a parameter, or this rank's rows of it) with its (averaged) gradient and state."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = self._t
        for name, value in (("step", state["step"]), ("lr", group["lr"]), ("beta1", group["betas"][0]),
                            ("beta2", group["betas"][1]), ("eps", group["eps"]), ("wd", group["weight_decay"])):
            t[name].fill_(value)
        _on_device(adamw_step, p)(p, grad, state["exp_avg"], state["exp_avg_sq"], t["step"], t["lr"], t["beta1"],
                                  t["beta2"], t["eps"], t["wd"])

    def _muon_state(self, group: dict, num: int) -> dict:
        """The group's state (on its first parameter), with buffers for ``num`` matrices created on first use."""
        p = group["params"][0]
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(num, *p.shape, dtype=p.dtype, device=p.device)
        if "second_momentum_buffer" not in state:
            shape, _ = second_moment_shape(num, p.shape)
            state["second_momentum_buffer"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        return state

    def _muon_update(self, grads: Tensor, stacked: Tensor, state: dict, group: dict, owned: int) -> None:
        """Muon on the first ``owned`` matrices of ``stacked`` with their (averaged) ``grads``."""
        if owned == 0:
            return
        shape = group["params"][0].shape
        t = self._t
        t["momentum"].fill_(group["momentum"])
        t["beta2"].fill_(group["beta2"])
        t["lr"].fill_(group["lr"] * muon_lr_scale(shape))
        t["wd"].fill_(group["weight_decay"])
        _, red_dim = second_moment_shape(owned, shape)
        _on_device(muon_step, stacked)(grads[:owned], stacked[:owned], state["momentum_buffer"][:owned],
                                       state["second_momentum_buffer"][:owned], t["momentum"], t["lr"], t["wd"],
                                       t["beta2"], group["ns_steps"], red_dim, self.compute_dtype == torch.bfloat16)


def _grad(p: Tensor) -> Tensor:
    if p.grad is None:
        raise RuntimeError(f"MuonAdamW: a parameter of shape {tuple(p.shape)} has no gradient")
    return p.grad


def _check_group(group: dict) -> None:
    kind = group.get("kind")
    if kind not in ("adamw", "muon"):
        raise NanolitError(f"optimizer group kind {kind!r} is neither 'adamw' nor 'muon'; set kind on every group")
    missing = [k for k in (ADAMW_KEYS if kind == "adamw" else MUON_KEYS) if k not in group]
    if missing:
        raise NanolitError(f"{kind} group {group.get('name', '')!r} lacks {missing}; nanochat's groups set them all")
    if kind == "muon":
        shapes = {tuple(p.shape) for p in group["params"]}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise NanolitError(f"a Muon group stacks matrices of one 2-D shape, got shapes {sorted(shapes)}; "
                               "group the matrices by shape")


def group_hyperparameters(n_embd: int, *, unembedding_lr: float = 0.004, embedding_lr: float = 0.2,
                          matrix_lr: float = 0.02, weight_decay: float = 0.0,
                          scalar_lr: float = 0.5) -> dict[str, dict]:
    """nanochat 92d63d4's optimizer settings by group name (``GPT.setup_optimizer``; defaults are that function's,
    base_train passes batch-scaled LRs and a scaled weight decay, see ``nanolit.recipe2026``).

    AdamW, with s = (n_embd/768)^-0.5 (LRs tuned at width 768; wider embeddings take smaller Adam steps), eps 1e-10:
    lm_head unembedding_lr*s, betas (0.8, 0.96), wd 0.01; wte embedding_lr*s, (0.8, 0.995), wd 0.001;
    value_embeds embedding_lr*s/2, (0.8, 0.995), wd 0.01; resid_lambdas scalar_lr/100, (0.8, 0.95), wd 0.05;
    x0_lambdas scalar_lr, (0.96, 0.95), wd 0; smear (gate, smear and backout lambdas) 0.2 fixed, (0.8, 0.95), wd 0.
    Muon (every matrix shape): matrix_lr, momentum 0.95, 5 Polar Express steps, beta2 0.9, weight_decay.
    """
    s = (n_embd / 768) ** -0.5
    adamw = {
        "lm_head": (unembedding_lr * s, (0.8, 0.96), 0.01),
        "wte": (embedding_lr * s, (0.8, 0.995), 0.001),
        "value_embeds": (embedding_lr * s * 0.5, (0.8, 0.995), 0.01),
        "resid_lambdas": (scalar_lr * 0.01, (0.8, 0.95), 0.05),
        "x0_lambdas": (scalar_lr, (0.96, 0.95), 0.0),
        "smear": (0.2, (0.8, 0.95), 0.0),
    }
    settings = {name: dict(kind="adamw", lr=lr, betas=betas, eps=ADAMW_EPS, weight_decay=wd)
                for name, (lr, betas, wd) in adamw.items()}
    settings["muon"] = dict(kind="muon", lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay)
    return settings


def build_muon_adamw(model: nn.Module, optimizer_cls: type[MuonAdamW] = MuonAdamW, **lrs: float) -> MuonAdamW:
    """nanochat 92d63d4's ``GPT.setup_optimizer`` for a ``GPT2026``: the six AdamW groups of
    :func:`group_hyperparameters` in that order, then one Muon group per matrix shape of ``transformer.h`` (shapes
    sorted, model order inside). ``lrs``: the keywords of :func:`group_hyperparameters`. Every group gets
    ``initial_lr`` (the schedules multiply it) and a ``name`` for LR logging (``muon_<rows>x<cols>`` for Muon),
    kept across ``load_state_dict`` of nanochat's files, which have none. ``optimizer_cls``: ``MuonAdamW`` or its
    sharded form (``nanolit.sharded2026``).
    """
    settings = group_hyperparameters(model.config.n_embd, **lrs)
    members = {
        "lm_head": list(model.lm_head.parameters()),
        "wte": list(model.transformer.wte.parameters()),
        "value_embeds": list(model.value_embeds.parameters()),
        "resid_lambdas": [model.resid_lambdas],
        "x0_lambdas": [model.x0_lambdas],
        "smear": [model.smear_gate.weight, model.smear_lambda, model.backout_lambda],
    }
    groups = [dict(params=params, name=name, **settings[name]) for name, params in members.items()]
    matrices = list(model.transformer.h.parameters())
    for shape in sorted({p.shape for p in matrices}):
        groups.append(dict(params=[p for p in matrices if p.shape == shape], name=f"muon_{shape[0]}x{shape[1]}",
                           **settings["muon"]))
    check_coverage(model, [p for group in groups for p in group["params"]], "the parameters of a GPT2026")
    for group in groups:
        group["initial_lr"] = group["lr"]
    optimizer = optimizer_cls(groups, compute_dtype=model.compute_dtype)
    keep_group_keys(optimizer, ("name",))
    return optimizer


# ------------------------------------------------------------------------------------------------------------------
# nanochat's per-rank optimizer files. Under W ranks rank r keeps: for an AdamW parameter of >= 1024 elements, rows
# [r*R, (r+1)*R) of its moments (R = rows/W); for a smaller one, the whole state; for a Muon group of K matrices,
# the buffers of matrices [r*C, (r+1)*C) with C = ceil(K/W), zero-padded past K. One rank's file is that rank's
# optimizer state_dict. Both functions below are pure; the sharded optimizer uses the same two rules.

ADAMW_SHARD_MIN_NUMEL = 1024  # smaller AdamW parameters are all-reduced and their state replicated


def muon_chunk(num: int, world: int) -> int:
    """Matrices of a Muon group per rank: ceil(K/W), the last rank's chunk zero-padded."""
    return math.ceil(num / world)


def _adamw_sharded(numel: int, world: int) -> bool:
    return world > 1 and numel >= ADAMW_SHARD_MIN_NUMEL


def share_state(group: dict, state: dict, numel: int, rank: int, world: int) -> dict:
    """Rank ``rank``'s part of the single-process ``state`` of one parameter of ``numel`` elements in ``group``
    (for a Muon group, the state its first parameter carries)."""
    if group["kind"] == "adamw":
        if not _adamw_sharded(numel, world):
            return dict(state)
        moments = state["exp_avg"]
        if moments.size(0) % world:
            raise NanolitError(f"AdamW state of shape {tuple(moments.shape)} cannot be split by rows over {world} "
                               f"ranks; its first dim must divide by the world size (nanochat pads the vocab to 64)")
        rows = moments.size(0) // world
        # clone: a view would keep the whole tensor alive
        return {k: v[rank * rows:(rank + 1) * rows].clone() if torch.is_tensor(v) else v for k, v in state.items()}
    chunk = muon_chunk(len(group["params"]), world)
    shared = {}
    for key, buf in state.items():
        part = buf[rank * chunk:(rank + 1) * chunk]
        shared[key] = torch.cat([part, buf.new_zeros(chunk - part.size(0), *buf.shape[1:])])
    return shared


def merge_states(group: dict, parts: list[dict], numel: int) -> dict:
    """One parameter's single-process state from every rank's part, rank 0 first (inverse of :func:`share_state`)."""
    if group["kind"] == "adamw":
        merged = dict(parts[0])  # step, and the whole state of a replicated parameter
        if _adamw_sharded(numel, len(parts)):
            merged.update({k: torch.cat([part[k] for part in parts]) for k in ("exp_avg", "exp_avg_sq")})
        return merged
    num = len(group["params"])
    return {key: torch.cat([part[key] for part in parts])[:num] for key in parts[0]}


def rank_state_dict(full: dict, numels: list[int], rank: int, world: int) -> dict:
    """nanochat's rank-``rank`` optimizer file (of ``world`` ranks) from a single-process ``MuonAdamW`` state_dict;
    ``numels[i]`` is the size of parameter ``i`` (state_dict index order)."""
    state = {i: share_state(group, full["state"][i], numels[i], rank, world)
             for group in full["param_groups"] for i in group["params"] if i in full["state"]}
    return {"state": state, "param_groups": [dict(g) for g in full["param_groups"]]}


def merge_rank_state_dicts(parts: list[dict], numels: list[int]) -> dict:
    """The single-process ``MuonAdamW`` state_dict from nanochat's per-rank optimizer files, rank 0 first."""
    state = {i: merge_states(group, [part["state"][i] for part in parts], numels[i])
             for group in parts[0]["param_groups"] for i in group["params"] if i in parts[0]["state"]}
    return {"state": state, "param_groups": [dict(g) for g in parts[0]["param_groups"]]}

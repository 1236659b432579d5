"""Optimizers: Muon for the transformer's matrices, AdamW for the embedding and the unembedding.

nanochat's split (nanochat d575940 nanochat/gpt.py), its Newton-Schulz orthogonalisation (nanochat d575940
nanochat/muon.py) and its single-process Muon (nanochat d575940 nanochat/muon.py),
with state_dict layouts that load nanochat's single-process optimizer files. Plain torch: no Lightning here.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from nanolit.common import NanolitError

# Quintic Newton-Schulz coefficients (nanochat d575940 nanochat/muon.py), tuned in modded-nanogpt to push every singular
# value into a band around 1 as fast as possible rather than to converge exactly to 1 (which would need many more
# steps).
NS_COEFFS = (3.4445, -4.7750, 2.0315)

# The Newton-Schulz precision when none is given: nanochat d575940 casts to bf16 (nanochat/muon.py).
NS_DTYPE = torch.bfloat16

# AdamW hyperparameters nanochat uses for the embedding and the unembedding (nanochat d575940 nanochat/gpt.py,
# nanochat/adamw.py).
ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10


def _newtonschulz5(G: Tensor, steps: int, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Eager Newton-Schulz iteration on the last two dims of ``G`` (see :func:`zeropower_via_newtonschulz5`)."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide orientation: X @ X.mT is then the smaller of the two Gram matrices
    # Frobenius-normalise so every singular value is <= 1, inside the region where the quintic converges
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


@functools.cache
def _compiled_newtonschulz5() -> Callable[[Tensor, int], Tensor]:
    # Built on first compiled use only: importing this module (and eager runs) must not pay for torch.compile.
    # dynamic=False: a GPT has only a handful of matrix shapes, and one static graph per shape avoids the slow
    # dynamic-shape kernel the default picks after the second shape (H100, d20's 1280x5120: 3.1 ms vs 0.77 ms).
    return torch.compile(_newtonschulz5, dynamic=False)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype: torch.dtype | None = None,
                                compiled: bool | None = None) -> Tensor:
    """Approximately orthogonalise ``G`` (..., rows, cols): U S Vᵀ -> U S' Vᵀ with S' in a band around 1.

    As nanochat d575940 nanochat/muon.py: cast to bf16, work on the wide orientation, divide by (Frobenius norm + 1e-7),
    then ``steps`` quintic iterations X <- aX + (bA + cA²)X with A = XXᵀ. Each iteration maps every singular value
    x to p(x) = ax + bx³ + cx⁵; p keeps [0.682, 1.134] invariant, so singular values that start above ~1% of the
    Frobenius norm end within that band after 5 steps. Compiled as ``compiled`` says.

    ``dtype`` is the iteration's precision, :data:`NS_DTYPE` (bf16, what nanochat d575940 runs) when ``None``:
    bf16 is stable for this iteration, and fp32 exists for comparisons that must not depend on where bf16 rounds.
    ``compiled``: run the compiled iteration (``None``: on CUDA only; training on CPU asks for it when it compiles
    the GPT, as nanochat d575940 compiles it on every device).
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix (or a batch of them); got shape {tuple(G.shape)}")
    fn = _compiled_newtonschulz5() if (G.is_cuda if compiled is None else compiled) else _newtonschulz5
    return fn(G, steps, NS_DTYPE if dtype is None else dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, single process (nanochat d575940 nanochat/muon.py).

    Per matrix: momentum buffer ``buf = lerp(buf, g, 1-μ)``; Nesterov ``u = lerp(g, buf, μ)`` (written into
    ``p.grad`` in place, as nanochat does, to save a matrix-sized temporary); then
    ``p -= lr * sqrt(max(1, rows/cols)) * NS5(u)``. The scale makes tall matrices (mlp.c_fc) take the same
    per-element RMS step as square ones. No weight decay. Parameters must be >= 2-D and have a gradient.

    Param groups are built one per distinct ``numel`` (iterating a set, exactly like nanochat), so
    ``state_dict()`` has nanochat's layout and a nanochat single-process Muon state_dict loads into it.
    Grouping does not affect the math: every matrix is updated independently.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        compile_ns: bool | None = None,
    ) -> None:
        params = list(params)
        if not params:
            raise NanolitError("Muon got no parameters; pass the model's matrix parameters")
        for p in params:
            if not isinstance(p, Tensor):
                raise NanolitError("Muon takes a flat list of tensors (it builds its own groups by numel)")
            if p.ndim < 2:
                raise NanolitError(f"Muon only updates matrices, got shape {tuple(p.shape)}; give it to AdamW")
        if lr < 0:
            raise NanolitError(f"Muon lr must be >= 0 (got {lr})")
        if not 0.0 <= momentum < 1.0:
            raise NanolitError(f"Muon momentum must be in [0, 1) (got {momentum})")
        if ns_steps < 1:
            raise NanolitError(f"Muon ns_steps must be >= 1 (got {ns_steps})")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        groups = [{"params": [p for p in params if p.numel() == size]} for size in {p.numel() for p in params}]
        super().__init__(groups, defaults)
        self.compile_ns = compile_ns  # Newton-Schulz compiled or not (None: on CUDA only)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Muon update of every parameter. ``closure`` (re-evaluates the loss, as Lightning passes) runs
        first with grad enabled; its return value is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    raise RuntimeError(f"Muon: a parameter of shape {tuple(p.shape)} has no gradient")
                by_shape.setdefault(p.shape, []).append(p)
            for params in by_shape.values():
                muon_update(params, [p.grad for p in params], [self.state[p] for p in params], group,
                            compiled=self.compile_ns)
        return loss


def muon_update(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict,
                compiled: bool | None = None) -> None:
    """One Muon update of every matrix in ``params`` (all of one shape) from ``grads`` (overwritten), with their
    ``states`` and ``group``: momentum ``buf = lerp(buf, g, 1-mu)``, Nesterov ``u = lerp(g, buf, mu)`` (in place
    of ``g``, as nanochat does, to save a matrix-sized temporary), ``p -= lr * sqrt(max(1, rows/cols)) * NS5(u)``.

    The one definition of Muon's math: :class:`Muon` calls it per shape, the sharded ``DistMuon`` on the matrices
    its rank owns. Batched: a few foreach kernels and one batched Newton-Schulz instead of ~10 launches per matrix
    (on one H100 the per-matrix loop made Muon 16% of a d20 step, mostly launch gaps; benchmarks/README.md).
    """
    mu = group["momentum"]
    bufs = []
    for g, state in zip(grads, states):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        bufs.append(state["momentum_buffer"])
    torch._foreach_lerp_(bufs, grads, 1 - mu)
    if group["nesterov"]:
        torch._foreach_lerp_(grads, bufs, mu)
    updates = zeropower_via_newtonschulz5(torch.stack(grads if group["nesterov"] else bufs), steps=group["ns_steps"],
                                          compiled=compiled)
    scale = max(1.0, params[0].size(-2) / params[0].size(-1)) ** 0.5
    torch._foreach_add_(params, list(updates.unbind(0)), alpha=-group["lr"] * scale)


def keep_group_keys(optimizer: torch.optim.Optimizer, keys: tuple[str, ...]) -> None:
    """Make ``keys`` of every param group survive ``load_state_dict`` of a state saved without them.

    torch replaces the groups by the saved ones on load; nanochat's optimizer files have no ``name`` key, and
    loggers (LearningRateMonitor) read it, so refill missing keys from the groups as built here.
    """
    built = [{k: group[k] for k in keys} for group in optimizer.param_groups]

    def refill(opt: torch.optim.Optimizer) -> None:
        for group, kept in zip(opt.param_groups, built):
            for key, value in kept.items():
                group.setdefault(key, value)

    optimizer.register_load_state_dict_post_hook(refill)


def check_coverage(model: nn.Module, assigned: list[Tensor], expected: str = "transformer.h, transformer.wte "
                   "and an untied lm_head") -> None:
    """Raise unless every model parameter is in exactly one optimizer group (nanochat d575940 nanochat/gpt.py; nanochat
    asserts this too);
    ``expected`` names what the model may hold, for the message."""
    counts: dict[int, int] = {}
    for p in assigned:
        counts[id(p)] = counts.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    missing = [n for n, p in model.named_parameters() if id(p) not in counts]
    twice = [names.get(i, "?") for i, c in counts.items() if c > 1]
    if missing or twice:
        raise NanolitError(
            f"optimizer split does not cover every parameter once (not covered: {missing or 'none'}; "
            f"covered twice: {twice or 'none'}); the model may only hold {expected}"
        )


def build_optimizers(
    model: nn.Module,
    *,
    unembedding_lr: float = 0.004,
    embedding_lr: float = 0.2,
    matrix_lr: float = 0.02,
    weight_decay: float = 0.0,
    compile_ns: bool | None = None,
) -> list[torch.optim.Optimizer]:
    """nanochat's ``setup_optimizers`` (nanochat d575940 nanochat/gpt.py): returns ``[adamw, muon]``.

    AdamW gets ``lm_head`` then ``wte``, with LRs scaled by ``(n_embd/768) ** -0.5`` (LRs were tuned at width
    768; wider embeddings take smaller Adam steps), betas (0.8, 0.95), eps 1e-10, and is fused when its params
    are on CUDA or the CPU. Muon gets every parameter of ``transformer.h`` at ``matrix_lr`` (unscaled: its update
    is already normalised per matrix) and momentum 0.95. Every group gets ``initial_lr`` (the schedules multiply
    it) and a ``name`` (``lm_head``, ``wte``, ``matrix_<numel>``) for LR logging.

    Works with any module exposing ``transformer.h``, ``transformer.wte.weight`` and ``lm_head.weight``.
    """
    matrix_params = list(model.transformer.h.parameters())
    embedding_params = [model.transformer.wte.weight]
    lm_head_params = [model.lm_head.weight]
    check_coverage(model, matrix_params + embedding_params + lm_head_params)

    n_embd = model.transformer.wte.weight.shape[1]
    dmodel_lr_scale = (n_embd / 768) ** -0.5
    adamw_groups = [
        dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale, name="lm_head"),
        dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale, name="wte"),
    ]
    # fused AdamW has CUDA and CPU kernels (nanochat d575940 fuses it on every device)
    fused = all(p.device.type in ("cuda", "cpu") for p in embedding_params + lm_head_params)
    adamw = torch.optim.AdamW(adamw_groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=weight_decay, fused=fused)

    muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, compile_ns=compile_ns)
    for group in muon.param_groups:
        group["name"] = f"matrix_{group['params'][0].numel()}"

    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
        keep_group_keys(opt, ("name", "initial_lr"))
    return optimizers

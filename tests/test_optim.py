"""Newton-Schulz, Muon and the nanochat optimizer split (nanochat d575940 nanochat/gpt.py, nanochat/muon.py,
nanochat/adamw.py)."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from nanolit.common import NanolitError
import nanolit.optim
from nanolit.optim import NS_COEFFS, Muon, build_optimizers, zeropower_via_newtonschulz5

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# The quintic's band (nanochat d575940 nanochat/muon.py): p(x) = ax + bx³ + cx⁵ has a local max p(0.5545) = 1.2024 and a
# local min
# p(1.0501) = 0.6818. p is decreasing on [0.5545, 1.0501] and increasing beyond, so p maps [0.6818, 1.1344]
# into [p(1.0501), p(0.6818)] = [0.6818, 1.1344]: that interval is invariant.
BAND = (0.6818, 1.1344)
# bf16 keeps 8 significant bits (0.4% per rounding) and each step rounds a few products: allow 3% either side.
BF16_SLACK = 0.03
SPEC_COEFFS = (3.4445, -4.7750, 2.0315)  # nanochat d575940 nanochat/muon.py


def quintic_5(x: torch.Tensor) -> torch.Tensor:
    a, b, c = SPEC_COEFFS
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    return x


class Block(nn.Module):
    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)).square())


class TinyGPT(nn.Module):
    """Stand-in with the attributes build_optimizers reads (not nanolit.model)."""

    def __init__(self, vocab: int = 16, n_embd: int = 32, n_layer: int = 2, hidden: int = 64):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd),
                h=nn.ModuleList([Block(n_embd, hidden) for _ in range(n_layer)]),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = x + block(x)
        return self.lm_head(x)


def tiny_model(seed: int = 0, **kw) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(**kw)


def lm_loss(model: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 16, (2, 8), generator=g)
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())


# --------------------------------------------------------------------------- Newton-Schulz


def test_quintic_band_in_exact_arithmetic():
    assert NS_COEFFS == SPEC_COEFFS
    # Every singular value above 1% of the Frobenius norm lands in the invariant band after 5 steps.
    x = torch.linspace(0.01, 1.0, 200_001, dtype=torch.float64)
    y = quintic_5(x)
    assert y.min() >= BAND[0] - 1e-4 and y.max() <= BAND[1] + 1e-4
    # ...and both ends of the band are reached, so it is not looser than it needs to be.
    assert y.min() < BAND[0] + 1e-3 and y.max() > BAND[1] - 1e-3


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (64, 96), (96, 64), (200, 50), (3, 24, 40)])
def test_ns5_singular_values_in_band(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for _ in range(3):
        G = torch.randn(shape, generator=g)
        G64 = G.double()
        # precondition for the band claim: the smallest singular value is >= 1% of the Frobenius norm
        ratio = torch.linalg.svdvals(G64).min(-1).values / torch.linalg.matrix_norm(G64)
        assert ratio.min() > 0.01
        sv = torch.linalg.svdvals(zeropower_via_newtonschulz5(G).float())
        assert sv.min() >= BAND[0] * (1 - BF16_SLACK), sv.min()
        assert sv.max() <= BAND[1] * (1 + BF16_SLACK), sv.max()


@pytest.mark.parametrize("rows, cols", [(24, 40), (40, 24), (32, 32)])
def test_ns5_maps_each_singular_value_through_the_quintic(rows, cols):
    # G = U diag(s) Vᵀ; the iteration keeps U and V and sends s_i/||s|| to p⁵(s_i/||s||).
    g = torch.Generator().manual_seed(rows * cols)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    s = torch.logspace(-1.5, 0, k, dtype=torch.float64)
    G = (U * s) @ V.T
    in_basis = U.T @ zeropower_via_newtonschulz5(G.float()).double() @ V
    expected = torch.diag(quintic_5(s / s.norm()))
    # bf16 iterates: each of the 5 steps rounds to 2^-9 relative and the quintic's gain (up to 3.4445) carries it
    # on, so entries end up to ~0.05 off; 0.08 covers the worst of 300 seed/shape draws (0.0511)
    torch.testing.assert_close(in_basis, expected, atol=0.08, rtol=0)


def test_ns5_orientation_dtype_and_zero():
    G = torch.randn(12, 40, generator=torch.Generator().manual_seed(1))
    wide = zeropower_via_newtonschulz5(G)
    assert wide.dtype == torch.bfloat16 and wide.shape == G.shape
    # a tall input is processed in the wide orientation: exactly the transpose of the wide result
    assert torch.equal(zeropower_via_newtonschulz5(G.T.contiguous()), wide.T)
    # the +1e-7 in the normalisation keeps a zero gradient at zero instead of NaN
    assert torch.equal(zeropower_via_newtonschulz5(torch.zeros(4, 6)), torch.zeros(4, 6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="matrix"):
        zeropower_via_newtonschulz5(torch.ones(5))


# --------------------------------------------------------------------------- Muon


@pytest.fixture
def fp32_newton_schulz(monkeypatch):
    """Newton-Schulz in fp32 for formula checks: the reference's mul+add and Muon's lerp differ by one fp32 ulp in
    places, which in bf16 can flip an element across a rounding boundary and change the update by far more than an
    ulp. In fp32 an ulp stays an ulp, amplified at most ~490x by the quintic's five steps (gain a=3.4445 each on
    small singular values): 1e-4 of an update is that bound with room."""
    monkeypatch.setattr(nanolit.optim, "NS_DTYPE", torch.float32)


def test_muon_two_steps_match_the_formulas(fp32_newton_schulz):
    g = torch.Generator().manual_seed(0)
    shapes = [(24, 8), (8, 24), (16, 16)]  # tall (scale sqrt(3)), wide (1), square (1)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref_p = [p.detach().clone() for p in params]
    ref_buf = [torch.zeros(s) for s in shapes]
    opt = Muon(params, lr=0.05, momentum=0.85)
    # step 1 with the constructor's values; step 2 after the schedule changed momentum and lr
    for mu, lr in [(0.85, 0.05), (0.9, 0.03)]:
        for group in opt.param_groups:
            group["momentum"], group["lr"] = mu, lr
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        for i, (grad, (rows, cols)) in enumerate(zip(grads, shapes)):
            ref_buf[i] = mu * ref_buf[i] + (1 - mu) * grad
            nesterov = (1 - mu) * grad + mu * ref_buf[i]
            scale = max(1.0, rows / cols) ** 0.5
            ref_p[i] = ref_p[i] - lr * scale * zeropower_via_newtonschulz5(nesterov).float()
            torch.testing.assert_close(opt.state[params[i]]["momentum_buffer"], ref_buf[i], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(params[i].detach(), ref_p[i], rtol=0, atol=lr * scale * 1e-4)


def test_muon_without_nesterov_uses_the_buffer(fp32_newton_schulz):
    g = torch.Generator().manual_seed(3)
    p = nn.Parameter(torch.randn(8, 12, generator=g))
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.5, nesterov=False)
    grads = [torch.randn(8, 12, generator=g) for _ in range(2)]
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    buf1 = 0.5 * grads[0]
    buf2 = 0.5 * buf1 + 0.5 * grads[1]
    expected = start - 0.1 * zeropower_via_newtonschulz5(buf1).float() - 0.1 * zeropower_via_newtonschulz5(buf2).float()
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0.1 * 2 * 1e-4)


def test_muon_groups_by_numel_like_nanochat():
    shapes = [(4, 8), (8, 4), (2, 2), (16, 3), (4, 1), (3, 16), (3, 3)]  # numels 32, 32, 4, 48, 4, 48, 9
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = Muon(params)
    # one group per distinct numel, in the iteration order of the set nanochat builds, params in model order
    sizes = list({p.numel() for p in params})
    assert [g["params"][0].numel() for g in opt.param_groups] == sizes
    for group, size in zip(opt.param_groups, sizes):
        assert [id(p) for p in group["params"]] == [id(p) for p in params if p.numel() == size]
        assert {k: group[k] for k in ("lr", "momentum", "nesterov", "ns_steps")} == dict(
            lr=0.02, momentum=0.95, nesterov=True, ns_steps=5
        )
    assert sorted(len(g["params"]) for g in opt.param_groups) == [1, 2, 2, 2]


def _stepped_pair(seed: int):
    """A tiny model and its optimizers after two steps, plus a fresh copy of the model at the same weights."""
    model = tiny_model(seed)
    opts = build_optimizers(model)
    for step in range(2):
        lm_loss(model, step).backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    twin = tiny_model(seed + 1)
    twin.load_state_dict(model.state_dict())
    return model, opts, twin


def _saved(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_optimizer_state_dict_round_trip():
    model, opts, twin = _stepped_pair(0)
    twin_opts = build_optimizers(twin)
    for opt, twin_opt in zip(opts, twin_opts):
        twin_opt.load_state_dict(_saved(opt.state_dict()))
    for m, o in [(model, opts), (twin, twin_opts)]:
        lm_loss(m, 7).backward()
        for opt in o:
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_nanochat_layout_state_loads_and_keeps_names():
    # nanochat's optimizer files carry initial_lr but no "name"; loading one must not drop our names
    model, opts, twin = _stepped_pair(0)
    twin_opts = build_optimizers(twin)
    names = [[g["name"] for g in opt.param_groups] for opt in twin_opts]
    for opt, twin_opt in zip(opts, twin_opts):
        state = _saved(opt.state_dict())
        for group in state["param_groups"]:
            del group["name"]
            group["lr"] = 0.5 * group["initial_lr"]  # as saved mid-warmdown
        twin_opt.load_state_dict(state)
    assert [[g["name"] for g in opt.param_groups] for opt in twin_opts] == names
    # values that were saved win over the freshly built ones
    for opt in twin_opts:
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(0.5 * group["initial_lr"])
    muon_state = twin_opts[1].state_dict()["state"]
    assert len(muon_state) == len(list(twin.transformer.h.parameters()))
    assert all(set(s) == {"momentum_buffer"} for s in muon_state.values())


def test_step_with_closure_returns_its_loss():
    model = tiny_model(0)
    muon = Muon(model.transformer.h.parameters(), lr=0.02)
    before = [p.detach().clone() for p in model.transformer.h.parameters()]
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        model.zero_grad()
        loss = lm_loss(model)
        loss.backward()
        return loss

    with torch.no_grad():  # the closure must still be able to backprop
        loss = muon.step(closure=closure)
    assert calls == [True]
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.transformer.h.parameters()))
    p = nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.ones(2, 2)
    assert Muon([p]).step() is None


def test_muon_rejects_bad_input():
    with pytest.raises(NanolitError, match="matrices"):
        Muon([nn.Parameter(torch.zeros(4))])
    with pytest.raises(NanolitError, match="no parameters"):
        Muon([])
    with pytest.raises(NanolitError, match="flat list"):
        Muon([{"params": [nn.Parameter(torch.zeros(2, 2))]}])
    with pytest.raises(NanolitError, match="momentum"):
        Muon([nn.Parameter(torch.zeros(2, 2))], momentum=1.0)
    with pytest.raises(RuntimeError, match="no gradient"):
        Muon([nn.Parameter(torch.zeros(2, 2))]).step()


# --------------------------------------------------------------------------- build_optimizers


def test_build_optimizers_d20_width_learning_rates():
    model = tiny_model(0, vocab=8, n_embd=1280, n_layer=1, hidden=4)
    adamw, muon = build_optimizers(model)
    # nanochat d575940 nanochat/gpt.py d20 example: scale (1280/768)^-0.5 = 0.774597
    assert (1280 / 768) ** -0.5 == pytest.approx(0.774597, abs=1e-6)
    assert [g["name"] for g in adamw.param_groups] == ["lm_head", "wte"]
    assert adamw.param_groups[0]["params"] == [model.lm_head.weight]
    assert adamw.param_groups[1]["params"] == [model.transformer.wte.weight]
    assert adamw.param_groups[0]["lr"] == pytest.approx(0.0030984, abs=1e-7)
    assert adamw.param_groups[1]["lr"] == pytest.approx(0.1549193, abs=1e-7)
    assert [g["lr"] for g in muon.param_groups] == [0.02] * len(muon.param_groups)  # not width-scaled
    for opt in (adamw, muon):
        for group in opt.param_groups:
            assert group["initial_lr"] == group["lr"]
    assert [g["name"] for g in muon.param_groups] == ["matrix_5120"]  # c_fc and c_proj: 4*1280 each


def test_build_optimizers_split_and_hyperparameters():
    model = tiny_model(0, n_embd=32, hidden=48)
    adamw, muon = build_optimizers(model, unembedding_lr=0.01, embedding_lr=0.3, matrix_lr=0.05, weight_decay=0.1)
    assert type(adamw) is torch.optim.AdamW and type(muon) is Muon
    scale = (32 / 768) ** -0.5
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.01 * scale, 0.3 * scale])
    for group in adamw.param_groups:
        assert group["betas"] == (0.8, 0.95)
        assert group["eps"] == 1e-10
        assert group["weight_decay"] == 0.1
        assert group["fused"]  # on CPU too, as nanochat d575940 fuses it on every device
    assert build_optimizers(tiny_model(0))[0].param_groups[0]["weight_decay"] == 0.0
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert {id(p) for p in muon_params} == {id(p) for p in model.transformer.h.parameters()}
    assert len(muon_params) == 4
    names = [g["name"] for g in muon.param_groups]
    assert len(set(names)) == len(names) and all(n.startswith("matrix_") for n in names)
    for group in muon.param_groups:
        assert group["lr"] == 0.05 and group["momentum"] == 0.95 and group["nesterov"] and group["ns_steps"] == 5


def test_build_optimizers_requires_exact_coverage():
    model = tiny_model(0)
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(NanolitError, match="extra"):
        build_optimizers(model)
    tied = tiny_model(0)
    tied.lm_head.weight = tied.transformer.wte.weight  # tied weights would be stepped twice
    with pytest.raises(NanolitError, match="covered twice"):
        build_optimizers(tied)


def test_training_steps_lower_the_loss():
    model = tiny_model(0)
    opts = build_optimizers(model)
    first = lm_loss(model).item()
    for _ in range(10):
        lm_loss(model).backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert lm_loss(model).item() < first


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_cuda
def test_compiled_ns5_matches_eager_on_cuda():
    from nanolit.optim import _newtonschulz5

    G = torch.randn(256, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch.testing.assert_close(zeropower_via_newtonschulz5(G).float(), _newtonschulz5(G, 5).float(), atol=2e-2, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_build_optimizers_fused_on_cuda():
    model = tiny_model(0).cuda()
    opts = build_optimizers(model)
    assert all(g["fused"] for g in opts[0].param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    idx = torch.randint(0, 16, (2, 8), device="cuda")
    nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    for opt in opts:
        opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

"""nanochat 92d63d4's MuonAdamW: the fixture's optimizer file, one step against the formulas, groups, per-rank files."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import same_state

from nanolit.common import NanolitError
from nanolit.model2026 import GPTConfig2026, build_gpt2026
from nanolit.optim2026 import (POLAR_EXPRESS_COEFFS, MuonAdamW, build_muon_adamw, group_hyperparameters,
                               merge_rank_state_dicts, polar_express, rank_state_dict)

EPS32 = torch.finfo(torch.float32).eps
# Rounding in Polar Express: an fp32 error in a direction of small singular value is multiplied by the slope of each
# polynomial at 0, a1*a2*a3*a4*a5 ~ 990, and the sums behind each entry (<= 512 terms) add ~sqrt(128) ~ 11 more:
# 6e-8 * 990 * 11 ~ 7e-4 of the largest update entry.
POLAR_FP32 = 1e-3


@pytest.fixture()
def fixture_opt(nanochat_2026, expected_2026):
    model = build_gpt2026(GPTConfig2026(**expected_2026["model_config"]), "cpu")
    model.load_state_dict(torch.load(nanochat_2026 / "model_000050.pt", weights_only=True), assign=True)
    saved = torch.load(nanochat_2026 / "optim_000050_rank0.pt", map_location="cpu", weights_only=True)
    optimizer = build_muon_adamw(model)  # LRs come from the file's groups
    optimizer.load_state_dict(saved)
    return model, optimizer, saved


def flat_params(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


# ------------------------------------------------------------------------------------------------------------------
# The fixture's optimizer file


def test_fixture_file_loads_and_round_trips(fixture_opt):
    model, optimizer, saved = fixture_opt
    assert [g["name"] for g in optimizer.param_groups] == [
        "lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas", "smear",
        "muon_1x12", "muon_128x128", "muon_128x512", "muon_512x128"]  # kept though the file has no names
    ours = optimizer.state_dict()
    assert [{k: v for k, v in g.items() if k != "name"} for g in ours["param_groups"]] == saved["param_groups"]
    assert same_state(ours["state"], saved["state"])
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    again = build_muon_adamw(model)
    again.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(again.state[model.lm_head.weight]["exp_avg_sq"], saved["state"][0]["exp_avg_sq"])
    assert again.state[model.lm_head.weight]["step"] == 50


def reference_muon(P, G, buf, second, mu, lr, wd, beta2):
    """The Muon update of nanochat 92d63d4 written from its definitions, in float64."""
    buf = mu * buf + (1 - mu) * G
    u = mu * buf + (1 - mu) * G  # Nesterov
    rows, cols = u.shape[-2:]
    X = u * (u.norm(dim=(-2, -1), keepdim=True) / rows**0.5) / u.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    g = X * min(rows, cols) ** 0.5 / X.norm(dim=(-2, -1), keepdim=True)
    v = (g * g).mean(dim=-1 if rows >= cols else -2, keepdim=True)
    second = beta2 * second + (1 - beta2) * v
    s = g / second.clamp_min(1e-10).sqrt()
    s = s * g.norm(dim=(-2, -1), keepdim=True) / s.norm(dim=(-2, -1), keepdim=True)
    lr = lr * max(1, rows / cols) ** 0.5
    return P - lr * s - lr * wd * P * ((s * P) >= 0)


def reference_adamw(p, g, m, v, t, lr, betas, eps, wd):
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    return p * (1 - lr * wd) - lr / (1 - betas[0] ** t) * m / ((v / (1 - betas[1] ** t)).sqrt() + eps)


def test_one_step_from_the_fixture_state_follows_the_formulas(fixture_opt, expected_2026):
    model, optimizer, _ = fixture_opt
    ids = torch.tensor(expected_2026["batch_ids"]).view(2, 257)
    model(ids[:, :-1], ids[:, 1:]).backward()
    params = flat_params(optimizer)
    before = [p.detach().double() for p in params]
    grads = [p.grad.double() for p in params]
    state = copy.deepcopy(optimizer.state_dict())
    optimizer.step()
    index = 0
    for group in state["param_groups"]:
        ids_ = group["params"]
        if group["kind"] == "adamw":
            for i in ids_:
                s = state["state"][i]
                expected = reference_adamw(before[i], grads[i], s["exp_avg"].double(), s["exp_avg_sq"].double(),
                                           s["step"] + 1, group["lr"], group["betas"], group["eps"],
                                           group["weight_decay"])
                # ~10 fp32 roundings of each element: one ulp of the parameter plus 1e-5 of the update
                tol = 2 * EPS32 * before[i].abs() + 1e-5 * (expected - before[i]).abs().max()
                assert ((params[i].double() - expected).abs() <= tol).all(), group
        else:
            s = state["state"][ids_[0]]
            P, G = torch.stack([before[i] for i in ids_]), torch.stack([grads[i] for i in ids_])
            expected = reference_muon(P, G, s["momentum_buffer"].double(), s["second_momentum_buffer"].double(),
                                      group["momentum"], group["lr"], group["weight_decay"], group["beta2"])
            got = torch.stack([params[i].detach().double() for i in ids_])
            tol = 2 * EPS32 * P.abs() + POLAR_FP32 * (expected - P).abs().max()
            assert ((got - expected).abs() <= tol).all(), group
        index += len(ids_)
    assert index == len(params)
    assert all(optimizer.state[p]["step"] == 51 for p in params[:8])


# ------------------------------------------------------------------------------------------------------------------
# The pieces of Muon


def composed_polar(x: torch.Tensor) -> torch.Tensor:
    for a, b, c in POLAR_EXPRESS_COEFFS:
        x = a * x + b * x**3 + c * x**5
    return x


# In exact arithmetic every singular value in [2e-3, 1] of the (1.01-headroom) normalised matrix ends in this band:
BAND = (0.85887, 1.14113)


def test_polar_express_band_in_exact_arithmetic():
    y = composed_polar(torch.linspace(2e-3, 1.0, 1_000_001, dtype=torch.float64) / 1.01)
    assert BAND[0] - 1e-5 <= y.min() < BAND[0] + 1e-4 and BAND[1] - 1e-4 < y.max() <= BAND[1] + 1e-5


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (48, 48), (3, 20, 60)])
def test_polar_express_singular_values_in_band(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    ratio = torch.linalg.svdvals(G.double()).min(-1).values / torch.linalg.matrix_norm(G.double())
    if ratio.min() < 2e-3:
        pytest.skip("this draw has a singular value below the band's precondition")
    sv = torch.linalg.svdvals(polar_express(G, 5))
    # fp32 through 5 iterations: the band's ends move by at most POLAR_FP32 relative
    assert sv.min() >= BAND[0] * (1 - POLAR_FP32) and sv.max() <= BAND[1] * (1 + POLAR_FP32)


def one_matrix_step(p: torch.Tensor, g: torch.Tensor, lr: float, wd: float) -> torch.Tensor:
    p = torch.nn.Parameter(p.clone())
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=lr, momentum=0.0, ns_steps=5, beta2=0.9, weight_decay=wd)])
    p.grad = g.clone()
    opt.step()
    return p.detach()


@pytest.mark.parametrize("rows,cols", [(16, 48), (48, 16), (32, 32)])
def test_update_norm_lr_scale_and_cautious_decay(rows, cols):
    gen = torch.Generator().manual_seed(rows + cols)
    p, g = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    lr = 1e-2
    update = (p - one_matrix_step(p, g, lr, 0.0)) / lr
    # Muon+ sets the Frobenius norm to sqrt(min(m, n)), NorMuon redistributes it over rows/columns but keeps it; the LR
    # is sqrt(max(1, rows/cols)) times larger for tall matrices. fp32 norms of ~1e3 terms: 1e-5 relative.
    expected = min(rows, cols) ** 0.5 * max(1.0, rows / cols) ** 0.5
    assert update.norm().item() == pytest.approx(expected, rel=1e-5)
    decayed = (p - one_matrix_step(p, g, lr, 0.5)) / lr
    toward_zero = (update * p) >= 0  # the update already shrinks these entries: only they are decayed
    assert 0 < toward_zero.sum() < p.numel()
    assert torch.allclose(decayed[~toward_zero], update[~toward_zero], rtol=0, atol=1e-5)
    scale = max(1.0, rows / cols) ** 0.5  # the decay takes the scaled LR too
    assert torch.allclose(decayed[toward_zero], update[toward_zero] + 0.5 * scale * p[toward_zero], rtol=1e-5,
                          atol=1e-5)


def test_bf16_compute_orthogonalises_in_bf16():
    p, g = torch.randn(16, 48), torch.randn(16, 48)
    a, b = (torch.nn.Parameter(p.clone()) for _ in range(2))
    for param, dtype in ((a, torch.float32), (b, torch.bfloat16)):
        opt = MuonAdamW([dict(kind="muon", params=[param], lr=0.01, momentum=0.5, ns_steps=5, beta2=0.9,
                              weight_decay=0.0)], compute_dtype=dtype)
        param.grad = g.clone()
        opt.step()
    diff = (a - b).abs().max().item()
    # bf16 keeps 8 mantissa bits: ~4e-3 relative per rounding on updates of lr * O(1) = 1e-2
    assert 0 < diff < 1e-3 and b.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------------
# Groups, errors, closure


def test_groups_are_nanochats():
    model = build_gpt2026(GPTConfig2026.from_knobs(4, vocab_size=1000, max_seq_len=64, aspect_ratio=48, head_dim=64),
                          "cpu")
    opt = build_muon_adamw(model, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.2,
                           scalar_lr=0.5)
    s = (192 / 768) ** -0.5
    table = [(g["name"], g["kind"], g["lr"], g.get("betas"), g["weight_decay"], len(g["params"]))
             for g in opt.param_groups]
    assert table[:6] == [
        ("lm_head", "adamw", 0.008 * s, (0.8, 0.96), 0.01, 1), ("wte", "adamw", 0.3 * s, (0.8, 0.995), 0.001, 1),
        ("value_embeds", "adamw", 0.3 * s * 0.5, (0.8, 0.995), 0.01, 2),
        ("resid_lambdas", "adamw", 0.005, (0.8, 0.95), 0.05, 1), ("x0_lambdas", "adamw", 0.5, (0.96, 0.95), 0.0, 1),
        ("smear", "adamw", 0.2, (0.8, 0.95), 0.0, 3)]
    assert [(name, n) for name, _, _, _, _, n in table[6:]] == [
        ("muon_3x12", 2), ("muon_192x192", 16), ("muon_192x768", 4), ("muon_768x192", 4)]
    assert all(g["initial_lr"] == g["lr"] and g["eps"] == 1e-10 for g in opt.param_groups if g["kind"] == "adamw")
    assert all((g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == (0.95, 5, 0.9, 0.2)
               for g in opt.param_groups if g["kind"] == "muon")
    assert group_hyperparameters(192, embedding_lr=0.3)["wte"]["lr"] == 0.3 * s


def test_bad_groups_missing_gradients_and_closure():
    p = torch.nn.Parameter(torch.ones(2, 3))
    with pytest.raises(NanolitError, match="kind"):
        MuonAdamW([dict(params=[p], lr=0.1)])
    with pytest.raises(NanolitError, match="lacks"):
        MuonAdamW([dict(kind="muon", params=[p], lr=0.1)])
    with pytest.raises(NanolitError, match="one 2-D shape"):
        MuonAdamW([dict(kind="muon", params=[p, torch.nn.Parameter(torch.ones(3, 2))], lr=0.1, momentum=0.9,
                        ns_steps=5, beta2=0.9, weight_decay=0.0)])
    opt = MuonAdamW([dict(kind="adamw", params=[p], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)])
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step()

    def closure():
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 6.0 and opt.state[p]["step"] == 1


# ------------------------------------------------------------------------------------------------------------------
# nanochat's per-rank files


@pytest.mark.parametrize("world", [2, 4])
def test_rank_files_split_and_merge(fixture_opt, world):
    model, optimizer, saved = fixture_opt
    numels = [p.numel() for p in flat_params(optimizer)]
    parts = [rank_state_dict(saved, numels, r, world) for r in range(world)]
    if world == 2:  # wte (4096 rows) is split by rows; resid_lambdas (2 elements) is replicated
        assert parts[1]["state"][1]["exp_avg"].shape == (2048, 128)
        assert torch.equal(parts[1]["state"][1]["exp_avg"], saved["state"][1]["exp_avg"][2048:])
        assert torch.equal(parts[1]["state"][3]["exp_avg"], saved["state"][3]["exp_avg"])
    chunk = math.ceil(8 / world)  # the 8 square matrices: ceil(K/W) per rank
    assert all(p["state"][9]["momentum_buffer"].shape == (chunk, 128, 128) for p in parts)
    # the single ve_gate matrix belongs to rank 0; the other ranks hold one zero-padded slot
    assert torch.equal(parts[0]["state"][8]["momentum_buffer"], saved["state"][8]["momentum_buffer"])
    assert all(p["state"][8]["second_momentum_buffer"].abs().sum() == 0 for p in parts[1:])
    merged = merge_rank_state_dicts(parts, numels)
    assert merged["param_groups"] == saved["param_groups"] and same_state(merged["state"], saved["state"])


def test_rank_files_need_rows_divisible_by_the_world_size(fixture_opt):
    _, optimizer, saved = fixture_opt
    with pytest.raises(NanolitError, match="split by rows over 3 ranks"):
        rank_state_dict(saved, [p.numel() for p in flat_params(optimizer)], 0, 3)

"""The 2026 recipe on CUDA: bf16 compute, the compiled optimizer steps, FlexAttention with gradients (GPU session)."""
from __future__ import annotations

import copy

import pytest
import torch

from nanolit.attention import flex_attention, sdpa_attention
from nanolit.checkpoint import load_nanochat
from nanolit.model2026 import GPTConfig2026, build_gpt2026, detect_compute_dtype
from nanolit.optim2026 import build_muon_adamw

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fixture_on_cuda_in_the_compute_dtype(nanochat_2026, expected_2026):
    model, _ = load_nanochat(nanochat_2026, device="cuda")
    dtype, _ = detect_compute_dtype("cuda")
    assert model.compute_dtype == dtype and model.cos.dtype == dtype
    ids = torch.tensor(expected_2026["batch_ids"], device="cuda").view(2, 257)
    with torch.no_grad():
        loss = model(ids[:, :-1], ids[:, 1:]).item()
    # bf16 activations (8 mantissa bits, ~4e-3 per rounding) through two layers: ~1e-2 of a loss of ~7
    assert loss == pytest.approx(expected_2026["loss_mean"], abs=5e-2 if dtype == torch.bfloat16 else 1e-4)


def test_compiled_optimizer_steps_equal_eager():
    """On CUDA MuonAdamW compiles both step functions (0-D CPU hyperparameter tensors, as nanochat does)."""
    config = GPTConfig2026(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = build_gpt2026(config, "cuda", compute_dtype=torch.float32)
    twin = copy.deepcopy(model)
    compiled, eager = build_muon_adamw(model), build_muon_adamw(twin)
    ids = torch.randint(0, 512, (2, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for m in (model, twin):
        m(ids[:, :-1], ids[:, 1:]).backward()
    compiled.step()
    import nanolit.optim2026 as optim2026

    eager_fns = optim2026._on_device
    try:
        optim2026._on_device = lambda fn, t: fn  # the same step, uncompiled
        eager.step()
    finally:
        optim2026._on_device = eager_fns
    for a, b in zip(model.parameters(), twin.parameters()):
        # inductor fuses elementwise chains (no intermediate rounding) and reorders sums: a few fp32 ulp, amplified
        # at most ~1e3 in Polar Express's small singular directions, on updates of lr ~ 1e-2
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_flex_attention_with_gradients_on_cuda():
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 512, 64, device="cuda", generator=gen, requires_grad=True) for _ in range(3))
    out_flex = flex_attention(q, k, v, 128)
    grads_flex = torch.autograd.grad(out_flex.sum(), (q, k, v))
    out_sdpa = sdpa_attention(q, k, v, 128)
    grads_sdpa = torch.autograd.grad(out_sdpa.sum(), (q, k, v))
    # fp32 (TF32 off by default for SDPA's math path): a few ulp of O(1) values
    torch.testing.assert_close(out_flex, out_sdpa, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads_flex, grads_sdpa):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)

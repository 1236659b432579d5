"""The 2026 GPT (nanochat 92d63d4): fixture parity, sliding windows, KV cache, smear, dtypes, FLOPs, init."""
from __future__ import annotations

import math

import pytest
import torch

from nanolit.attention import attention, flex_attention, sdpa_attention, window_mask
from nanolit.common import NanolitError
from nanolit.engine import Engine, KVCache
from nanolit.model2026 import (GPT2026, GPTConfig2026, Linear, build_gpt2026, detect_compute_dtype,
                               padded_vocab_size, window_sizes)
from nanolit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def fixture_model(nanochat_2026, expected_2026) -> GPT2026:
    state = torch.load(nanochat_2026 / "model_000050.pt", map_location="cpu", weights_only=True)
    model = build_gpt2026(GPTConfig2026(**expected_2026["model_config"]), "cpu")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def fixture_batch(expected_2026) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(expected_2026["batch_ids"]).view(2, 257)
    return ids[:, :-1], ids[:, 1:]


def tiny(seq: int = 64, depth: int = 3, vocab: int = 200, pattern: str = "SSL", n_kv_head: int | None = None,
         dtype=torch.float32, seed: int = 0) -> GPT2026:
    config = GPTConfig2026(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=4,
                           n_kv_head=n_kv_head or 4, n_embd=64, window_pattern=pattern)
    model = build_gpt2026(config, "cpu", seed=seed, compute_dtype=dtype)
    with torch.no_grad():  # make every part count: the init zeroes the projections and the smear lambda
        for p in model.parameters():
            if p.ndim == 2 and p.abs().max() == 0:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        model.smear_lambda.fill_(0.7)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The fixture: nanochat 92d63d4's own figures for its step-50 d2 model


def test_fixture_state_dict_layout(fixture_model, nanochat_2026, expected_2026):
    saved = torch.load(nanochat_2026 / "model_000050.pt", map_location="cpu", weights_only=True)
    ours = fixture_model.state_dict()
    assert list(ours) == list(saved)  # keys and their order
    assert {k: list(v.shape) for k, v in ours.items()} == expected_2026["state_dict_shapes"]
    assert sorted({str(v.dtype) for v in ours.values()}) == expected_2026["state_dict_dtypes"]


def test_fixture_loss_and_logits(fixture_model, fixture_batch, expected_2026):
    x, y = fixture_batch
    with torch.no_grad():
        loss_mean = fixture_model(x, y).item()
        loss_sum = fixture_model(x, y, loss_reduction="sum").item()
        last = fixture_model(x)[0, -1]
    # fp32 everywhere; another thread count or BLAS blocking reorders the 128- and 512-wide dot products, which moves
    # a logit by a few ulp (~1e-6 here) and the mean over 512 tokens by about as much: 1e-5 is 10x that.
    assert loss_mean == pytest.approx(expected_2026["loss_mean"], abs=1e-5)
    assert loss_sum == pytest.approx(expected_2026["loss_sum"], rel=1e-5)
    top = last.topk(5)
    assert top.indices.tolist() == expected_2026["logits_top5_row0_last"]  # 3rd/4th differ by 1.2e-4 >> 1e-6
    assert top.values.tolist() == pytest.approx(expected_2026["logits_top5_values_row0_last"], abs=1e-5)
    assert last.abs().sum().item() == pytest.approx(expected_2026["logits_sum_abs_row0_last"], rel=1e-5)
    assert last.shape == (4096,) and last.dtype == torch.float32


def test_fixture_parameter_counts_and_flops(fixture_model, expected_2026):
    assert fixture_model.num_scaling_params() == expected_2026["num_params"]
    # 6 x (matrices 393228 + lm_head 524288 + smear gate 24) + 12*H*D*window for the S (128) and L (256) layers
    assert fixture_model.num_matmul_params() == 393228 + 524288 + 24
    assert fixture_model.estimate_flops() == 6 * 917540 + 12 * 128 * 128 + 12 * 128 * 256


def test_fixture_greedy_generation_three_ways(fixture_model, nanochat_2026, expected_2026):
    prompt = expected_2026["prompt_ids"]
    assert list(fixture_model.generate(prompt, 16)) == expected_2026["greedy16"]
    assert list(fixture_model.generate(prompt, 16, use_kv_cache=False)) == expected_2026["greedy16"]
    tokenizer = Tokenizer.from_directory(nanochat_2026 / "tokenizer")
    rows, _ = Engine(fixture_model, tokenizer).generate_batch(prompt, 2, max_tokens=16, temperature=0)
    assert [row[len(prompt):] for row in rows] == [expected_2026["greedy16"]] * 2
    assert tokenizer.decode(expected_2026["greedy16"]) == expected_2026["greedy16_text"]


# ---------------------------------------------------------------------------------------------------------------
# Sliding-window attention


def reference_attention(q, k, v, window: int) -> torch.Tensor:
    """Textbook masked softmax attention in float64, keys repeated for GQA."""
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    Tq, Tk = q.size(2), k.size(2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    for i in range(Tq):
        for j in range(Tk):
            pos = Tk - Tq + i
            if j > pos or (window >= 0 and pos - j > window):
                scores[..., i, j] = float("-inf")
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("Tq,Tk,window,heads", [(24, 24, 7, (4, 4)), (24, 24, 24, (4, 2)), (24, 24, -1, (2, 2)),
                                                 (1, 30, 9, (4, 2)), (1, 30, 40, (2, 2)), (6, 30, 9, (4, 4)),
                                                 (6, 30, -1, (4, 1))])
def test_sdpa_sliding_window_equals_the_reference(Tq, Tk, window, heads):
    gen = torch.Generator().manual_seed(Tq * 100 + Tk)
    q = torch.randn(2, heads[0], Tq, 16, generator=gen)
    k, v = (torch.randn(2, heads[1], Tk, 16, generator=gen) for _ in range(2))
    # fp32 softmax over <= 30 keys of O(1) scores against float64: errors of a few fp32 ulp (1e-7) per term
    torch.testing.assert_close(sdpa_attention(q, k, v, window).double(), reference_attention(q, k, v, window),
                               rtol=0, atol=1e-5)


def test_window_mask_counts_window_plus_one_keys():
    mask = window_mask(10, 10, 3)
    assert mask.sum(dim=1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert window_mask(2, 10, -1).sum(dim=1).tolist() == [9, 10]


@pytest.mark.slow
def test_flex_attention_equals_sdpa_without_gradients(fixture_model, fixture_batch, expected_2026):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 256, 32, generator=gen) for _ in range(3))
    with torch.no_grad():
        # both fp32, the softmax sums blocked differently: a few ulp of O(1) outputs
        torch.testing.assert_close(flex_attention(q, k, v, 128), sdpa_attention(q, k, v, 128), rtol=0, atol=1e-5)
        torch.testing.assert_close(attention(q, k, v, 128, "flex"), sdpa_attention(q, k, v, 128), rtol=0, atol=1e-5)
    with pytest.raises(NanolitError, match="no backward on CPU"):
        flex_attention(q.requires_grad_(), k, v, 128)
    # "flex" leaves to SDPA what FlexAttention cannot do or would recompile for: the very same tensors come back
    assert torch.equal(attention(q, k, v, 128, "flex"), sdpa_attention(q, k, v, 128))  # gradients on CPU
    with torch.no_grad():
        assert torch.equal(attention(q[:, :, -1:], k, v, 128, "flex"), sdpa_attention(q[:, :, -1:], k, v, 128))
        assert torch.equal(attention(q, k, v, 256, "flex"), sdpa_attention(q, k, v, 256))
    x, y = fixture_batch
    try:
        fixture_model.attn_impl = "flex"
        with torch.no_grad():
            assert fixture_model(x, y).item() == pytest.approx(expected_2026["loss_mean"], abs=1e-5)
        fixture_model(x, y).backward()  # training in flex mode takes SDPA on CPU
    finally:
        fixture_model.attn_impl = "sdpa"
        fixture_model.zero_grad(set_to_none=True)


def test_window_sizes_follow_the_pattern():
    config = GPTConfig2026(sequence_len=256, n_layer=6, window_pattern="SSSL")
    assert window_sizes(config) == [128, 128, 128, 256, 128, 256]  # the last layer is always long
    assert window_sizes(GPTConfig2026(sequence_len=2048, n_layer=4)) == [512, 512, 512, 2048]
    assert window_sizes(GPTConfig2026(sequence_len=1000, n_layer=3, window_pattern="sl")) == [256, 1000, 1000]
    for bad in ("", "SXL"):
        with pytest.raises(NanolitError, match="window_pattern"):
            window_sizes(GPTConfig2026(window_pattern=bad))


# ---------------------------------------------------------------------------------------------------------------
# KV cache, smear, generation


def full_logits(model: GPT2026, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def test_kv_cache_decoding_equals_full_passes_beyond_both_windows():
    model = tiny(seq=32, depth=3, pattern="SSL", n_kv_head=2)
    model.window_sizes = [5, 11, 32]  # S would round up to 128 tokens: small windows so that 48 tokens cross all
    ids = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(3))
    expected = full_logits(model, ids)
    cache = KVCache(2, 2, 8, 16, 3)  # too short on purpose: it grows
    with torch.no_grad():
        steps = [model(ids[:, :7], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 48)]
    # the same fp32 ops per position; SDPA's kernels differ between a masked block and a one-query slice, so the
    # softmax sums are ordered differently: a few ulp of O(1) logits
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=1e-5)


def test_chunked_prefill_equals_one_pass_smear_included():
    model = tiny(seq=32, depth=2, pattern="SL")
    model.window_sizes = [6, 32]
    ids = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = KVCache(1, 4, 30, 16, 2)
    with torch.no_grad():
        chunks = [model(ids[:, a:b], kv_cache=cache) for a, b in ((0, 9), (9, 10), (10, 30))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full_logits(model, ids), rtol=0, atol=1e-5)


def test_smear_mixes_the_previous_token_only():
    model = tiny(depth=1, pattern="L")
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(5))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 200
    with torch.no_grad():
        x = torch.nn.functional.rms_norm(model.transformer.wte(ids), (64,))
        x2 = torch.nn.functional.rms_norm(model.transformer.wte(changed), (64,))
        diff = (model._smear(x, None) - model._smear(x2, None)).abs().amax(dim=-1)[0]
        assert torch.equal(model._smear(x[:, :1], None), x[:, :1])  # a lone first token is left alone
    assert diff[:6].max() == 0 and diff[6] > 0 and diff[7] > 0 and diff[8:].max() == 0


def test_engine_prefill_copies_the_smear_state():
    model = tiny()
    small = KVCache(1, 4, 5, 16, 3)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5]]), kv_cache=small)
    big = KVCache(3, 4, 9, 16, 3)
    big.prefill(small)
    assert big.prev_embedding.shape == (3, 1, 64)
    assert torch.equal(big.prev_embedding, small.prev_embedding.expand(3, -1, -1))
    big.reset()
    assert big.prev_embedding is None and big.get_pos() == 0


def test_generation_with_and_without_cache_agree_when_sampling():
    model = tiny()
    a = list(model.generate([1, 2, 3], 20, temperature=1.0, top_k=50, seed=7))
    b = list(model.generate([1, 2, 3], 20, temperature=1.0, top_k=50, seed=7, use_kv_cache=False))
    assert a == b and len(a) == 20


# ---------------------------------------------------------------------------------------------------------------
# Loss variants, vocab padding, compute dtype


def test_loss_reductions_ignore_index_and_chunked_head():
    model = tiny(vocab=100).train()
    assert model.transformer.wte.weight.shape[0] == padded_vocab_size(100) == 128
    ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(6))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :5] = -1
    logits = model(x)
    assert logits.shape == (2, 16, 100)
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == (32,) and (per_token.view(2, 16)[0, :5] == 0).all()
    mean = model(x, y)
    torch.testing.assert_close(mean, per_token.sum() / 27)
    torch.testing.assert_close(model(x, y, loss_reduction="sum"), per_token.sum())
    grads = torch.autograd.grad(mean, list(model.parameters()))
    chunked = model(x, y, loss_chunk_size=5)
    chunked_grads = torch.autograd.grad(chunked, list(model.parameters()))
    # chunked head: the same fp32 values summed in chunks of 5 rows, reassociation error of a few ulp
    torch.testing.assert_close(chunked, mean, rtol=1e-6, atol=1e-6)
    for g, h in zip(grads, chunked_grads):
        torch.testing.assert_close(h, g, rtol=1e-5, atol=1e-7)


def test_padding_rows_never_reach_the_output():
    model = tiny(vocab=100)
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(8))
    before = full_logits(model, ids)
    with torch.no_grad():
        model.lm_head.weight[100:].fill_(1e3)
        model.transformer.wte.weight[100:].fill_(1e3)
    assert torch.equal(full_logits(model, ids), before)


def test_bf16_compute_keeps_fp32_master_weights():
    fp32 = tiny(dtype=torch.float32)
    bf16 = tiny(dtype=torch.bfloat16)
    bf16.load_state_dict({k: v.to(bf16.state_dict()[k].dtype) for k, v in fp32.state_dict().items()})
    assert bf16.transformer.wte.weight.dtype == torch.bfloat16 and bf16.value_embeds["2"].weight.dtype == torch.bfloat16
    assert bf16.lm_head.weight.dtype == torch.float32 and bf16.resid_lambdas.dtype == torch.float32
    assert bf16.cos.dtype == torch.bfloat16
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(9))
    out32, out16 = full_logits(fp32, ids), full_logits(bf16, ids)
    assert out16.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa (rel. 2^-9 per rounding) through ~20 rounded ops: a few 1e-2 of O(1) logits
    assert (out16 - out32).abs().max() < 0.1 and (out16 - out32).abs().max() > 0


def test_compute_dtype_detection(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    assert detect_compute_dtype("cpu")[0] == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert detect_compute_dtype("cpu") == (torch.bfloat16, "set via NANOCHAT_DTYPE=bfloat16")
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    with pytest.raises(NanolitError, match="NANOCHAT_DTYPE"):
        detect_compute_dtype("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Width rule and init


@pytest.mark.parametrize("depth,aspect,head_dim,width,heads", [(2, 64, 128, 128, 1), (12, 64, 128, 768, 6),
                                                               (20, 64, 128, 1280, 10), (3, 64, 128, 256, 2),
                                                               (4, 48, 64, 192, 3)])
def test_width_from_aspect_ratio_and_head_dim(depth, aspect, head_dim, width, heads):
    config = GPTConfig2026.from_knobs(depth, vocab_size=4096, max_seq_len=256, aspect_ratio=aspect, head_dim=head_dim)
    assert (config.n_embd, config.n_head, config.n_kv_head, config.n_layer) == (width, heads, heads, depth)


def test_init_follows_nanochat():
    model = build_gpt2026(GPTConfig2026(sequence_len=64, vocab_size=1000, n_layer=5, n_head=2, n_kv_head=2,
                                        n_embd=256), "cpu")
    s = 3**0.5 / 16
    assert model.resid_lambdas.tolist() == pytest.approx([1.15, 1.125, 1.10, 1.075, 1.05])
    assert model.x0_lambdas.tolist() == pytest.approx([0.20, 0.1625, 0.125, 0.0875, 0.05])
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert sorted(model.value_embeds) == ["0", "2", "4"]  # alternating, the last layer included
    assert [b.attn.ve_gate is not None for b in model.transformer.h] == [True, False, True, False, True]
    block = model.transformer.h[0]
    assert block.attn.c_q.weight.abs().max() <= s and block.mlp.c_fc.weight.abs().max() <= 0.4 * s
    assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
    assert 0 <= block.attn.ve_gate.weight.min() and block.attn.ve_gate.weight.max() <= 0.02
    # 1024x256 draws: the sample std is within 1% of the target
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.01)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.01)
    assert all(isinstance(m, Linear) for m in (model.lm_head, model.smear_gate, block.attn.c_q, block.mlp.c_fc))

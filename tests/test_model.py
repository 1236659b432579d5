"""GPT: nanochat-exact math on a real nanochat checkpoint, shapes/FLOPs table, init, KV cache, rotary."""
import json

import pytest
import torch

from nanolit.common import NanolitError
from nanolit.engine import KVCache
from nanolit.model import GPT, GPTConfig, build_gpt


def load_fixture_model(folder):
    meta = json.loads((folder / "meta_000050.json").read_text())
    sd = torch.load(folder / "model_000050.pt", map_location="cpu", weights_only=True)
    model = build_gpt(GPTConfig(**meta["model_config"]))
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def d2(nanochat_d2):
    return load_fixture_model(nanochat_d2)


def test_state_dict_keys_match_nanochat(d2, nanochat_d2):
    sd = torch.load(nanochat_d2 / "model_000050.pt", map_location="cpu", weights_only=True)
    assert list(d2.state_dict().keys()) == list(sd.keys())
    assert "cos" not in d2.state_dict()


def test_loss_and_logits_match_nanochat(d2, expected_d2):
    batch = torch.tensor(expected_d2["batch_ids"]).view(2, 257)
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        assert d2(x, y).item() == pytest.approx(expected_d2["loss_mean"], abs=1e-5)
        assert d2(x, y, loss_reduction="sum").item() == pytest.approx(expected_d2["loss_sum"], rel=1e-5)
        per_token = d2(x, y, loss_reduction="none")
        assert per_token.shape == (2 * 256,)
        logits = d2(x)
    assert logits.dtype == torch.float32 and logits.abs().max() <= 15.0
    assert logits[0, -1].topk(5).indices.tolist() == expected_d2["logits_top5_row0_last"]


def test_ignore_index(d2, expected_d2):
    batch = torch.tensor(expected_d2["batch_ids"]).view(2, 257)
    x, y = batch[:, :-1], batch[:, 1:].clone()
    with torch.no_grad():
        full = d2(x, y, loss_reduction="none")
        y[:, 100:] = -1
        masked = d2(x, y, loss_reduction="none")
        mean = d2(x, y)
    assert torch.all(masked.view(2, 256)[:, 100:] == 0)
    assert mean.item() == pytest.approx(full.view(2, 256)[:, :100].mean().item(), rel=1e-6)


def naive_generate(model, tokens, max_tokens):
    ids = list(tokens)
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[:, -1, :]
        ids.append(int(logits.argmax(-1)))
    return ids[len(tokens):]


def test_greedy_generation_matches_nanochat_and_naive(d2, expected_d2):
    got = list(d2.generate(expected_d2["prompt_ids"], 16))
    assert got == expected_d2["greedy16"]
    assert got == naive_generate(d2, expected_d2["prompt_ids"], 16)


def test_sampling_is_seeded(d2, expected_d2):
    a = list(d2.generate(expected_d2["prompt_ids"], 8, temperature=1.0, top_k=50, seed=1))
    b = list(d2.generate(expected_d2["prompt_ids"], 8, temperature=1.0, top_k=50, seed=1))
    assert a == b


@pytest.mark.parametrize("depth,params,flops,iters", [
    (4, 36_700_160, 1.447035e8, 1_400),
    (12, 185_597_952, 1.038090e9, 7_080),
    (20, 560_988_160, 3.491758e9, 21_400),
    (26, 1_081_999_360, 6.900941e9, 41_275),
    (32, 1_879_048_192, 1.207960e10, 71_680),
])
def test_spec_table(depth, params, flops, iters):
    """nanochat d575940 scripts/base_train.py's table (V=65536, T=2048, ratio 20, batch 524288), built on the meta
    device."""
    config = GPTConfig.from_depth(depth, vocab_size=65536, sequence_len=2048)
    assert config.n_embd == depth * 64 and config.n_embd // config.n_head == 128
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() == params
    assert model.estimate_flops() == pytest.approx(flops, rel=1e-6)
    assert (20 * params) // 524288 == iters


@pytest.mark.parametrize("depth", [5, 9, 11, 13])
def test_bad_depth_is_a_clear_error(depth):
    with pytest.raises(NanolitError, match="not divisible"):
        GPTConfig.from_depth(depth, vocab_size=65536, sequence_len=2048)


def test_odd_depth_that_works():
    c = GPTConfig.from_depth(7, 65536, 2048)
    assert (c.n_head, c.n_embd // c.n_head) == (4, 112)


def test_init_like_nanochat():
    config = GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    torch.manual_seed(123)  # the global RNG must not matter: init draws from its own seeded generator
    a = build_gpt(config)
    torch.manual_seed(999)
    b = build_gpt(config)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.count_nonzero(a.lm_head.weight) == 0
    for block in a.transformer.h:
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
        assert block.attn.c_q.weight.std().item() == pytest.approx(128 ** -0.5, rel=0.05)
        # c_fc: fan_out 512 > fan_in 128 so std = 1/sqrt(128)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(128 ** -0.5, rel=0.05)
    assert a.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    # the draws are exactly normal(0, std) from a generator seeded with 42, in module order
    gen = torch.Generator().manual_seed(42)
    wte = torch.empty(512, 128).normal_(0.0, 1.0, generator=gen)
    assert torch.equal(a.transformer.wte.weight, wte)
    assert torch.equal(b.transformer.h[0].attn.c_q.weight, torch.empty(128, 128).normal_(0, 128 ** -0.5, generator=gen))


def test_rotary_table_extends_for_long_inputs():
    config = GPTConfig(sequence_len=8, vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    model = build_gpt(config)
    torch.nn.init.normal_(model.lm_head.weight)
    idx = torch.randint(0, 64, (1, 100))  # > 10 * sequence_len positions
    with torch.no_grad():
        short = model(idx[:, :50])
        long = model(idx)
    assert model.cos.size(1) >= 100
    torch.testing.assert_close(long[:, :50], short)


def test_kv_cache_gqa_and_chunked_prefill():
    config = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = build_gpt(config).eval()
    for p in model.parameters():  # undo the zero-inits so every path matters
        torch.nn.init.normal_(p, std=0.1)
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(2, 2, 20, 16, 2)
        first = model(idx[:, :12], kv_cache=cache)  # prefill into an empty cache
        second = model(idx[:, 12:18], kv_cache=cache)  # chunk on top of a non-empty cache: explicit mask
        third = model(idx[:, 18:19], kv_cache=cache)  # single-token decode
        fourth = model(idx[:, 19:20], kv_cache=cache)  # fills the last of the 20 slots
    got = torch.cat([first, second, third, fourth], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
    assert cache.get_pos() == 20


def test_kv_cache_grows():
    cache = KVCache(1, 1, 4, 2, 1)
    k = torch.randn(1, 1, 6, 2)
    ks, vs = cache.insert_kv(0, k, k)
    assert ks.shape[2] == 6 and cache.kv_cache.size(4) == 2048  # ceil((6 + 1024) / 1024) * 1024
    torch.testing.assert_close(ks, k)

"""The chunked loss head gives nanochat's loss and gradients, in fp32, under bf16 autocast, compiled and in training."""
import copy

import pytest
import torch
import torch.nn.functional as F
from test_model import load_fixture_model
from test_module import T as MODULE_T, V as MODULE_V, FixedSteps, make_module, make_steps, trainer

import nanolit.model
from nanolit.loss import softcap_cross_entropy
from nanolit.model import GPTConfig, build_gpt

N, D, V = 300, 32, 1000


def one_shot(x, w, t, reduction="mean"):
    """nanochat's head: lm_head, fp32, softcap 15, cross-entropy ignoring -1 (nanochat d575940 nanochat/gpt.py)."""
    logits = F.linear(x, w).float()
    return F.cross_entropy(15 * torch.tanh(logits / 15), t, ignore_index=-1, reduction=reduction)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).requires_grad_()
    w = (0.5 * torch.randn(V, D, generator=g)).requires_grad_()  # large logits: the softcap really bends them
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -1
    return x, w, t


def grads(loss_fn, x, w):
    x.grad = w.grad = None
    loss = loss_fn()
    (3.0 * loss).backward()  # a scaled upstream gradient, as grad accumulation gives
    return loss.detach(), x.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 64, 77, N, 4 * N])
def test_fp32_loss_and_gradients_equal_the_one_shot_head(chunk):
    x, w, t = inputs()
    ref = grads(lambda: one_shot(x, w, t), x, w)
    got = grads(lambda: softcap_cross_entropy(x, w, t, 15.0, chunk), x, w)
    assert (15 * torch.tanh(F.linear(x, w) / 15)).abs().max() > 10  # the softcap is exercised, not linear
    # the chunked head sums its gradients over ~1000 rows by hand, in another order than autograd's matmul: a few
    # units of 2^-24 of the sums (2.6-6.4e-7 of the norm measured), well inside 1e-5
    for a, b in zip(got, ref):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-12


def test_bf16_autocast_matches_within_bf16_rounding():
    x, w, t = inputs(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads(lambda: one_shot(x, w, t), x, w)
        got = grads(lambda: softcap_cross_entropy(x, w, t, 15.0, 128), x, w)
    assert got[1].dtype == x.dtype and got[2].dtype == w.dtype  # gradients in the parameters' dtypes
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 softmax
    # the one-shot head rounds the whole weight gradient to bf16 once; the chunks sum in fp32 (more exact)
    for a, b in zip(got[1:], ref[1:]):
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_evaluation_reductions(reduction):
    x, w, t = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(softcap_cross_entropy(x, w, t, 15.0, 50, reduction), one_shot(x, w, t, reduction),
                                   rtol=1e-6, atol=1e-5)


def test_all_targets_ignored_is_nan_like_cross_entropy():
    x, w, t = inputs(3)
    t[:] = -1
    assert torch.isnan(one_shot(x, w, t)) and torch.isnan(softcap_cross_entropy(x, w, t, 15.0, 64))


def test_bad_arguments_are_clear_errors():
    x, w, t = inputs(4)
    with pytest.raises(ValueError, match="reduction='mean' only"):
        softcap_cross_entropy(x, w, t, 15.0, 64, "none")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        softcap_cross_entropy(x, w, t, 15.0, 0)


def test_nanochat_checkpoint_gives_its_losses(nanochat_d2, expected_d2):
    d2 = load_fixture_model(nanochat_d2)
    batch = torch.tensor(expected_d2["batch_ids"]).view(2, 257)
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        assert d2(x, y, loss_chunk_size=96).item() == pytest.approx(expected_d2["loss_mean"], abs=1e-5)
        assert d2(x, y, loss_reduction="sum", loss_chunk_size=96).item() == pytest.approx(expected_d2["loss_sum"],
                                                                                          rel=1e-5)
        torch.testing.assert_close(d2(x, y, loss_reduction="none", loss_chunk_size=96),
                                   d2(x, y, loss_reduction="none"), rtol=1e-6, atol=1e-5)


def test_training_with_chunks_matches_training_without(monkeypatch):
    """The module knob reaches the training forward; AdamW's parameters end where the one-shot head puts them.

    Muon's groups are frozen (matrix_lr=0): its bf16 Newton-Schulz turns the heads' last-bit gradient differences
    into bf16-sized update differences (the same reason 1 and 2 DDP ranks differ, tests/test_ddp.py).
    """
    calls = []
    monkeypatch.setattr(nanolit.model, "softcap_cross_entropy",
                        lambda *a, **k: calls.append(a[4]) or softcap_cross_entropy(*a, **k))
    steps = make_steps(3, seed=5)
    start = build_gpt(GPTConfig.from_depth(2, vocab_size=MODULE_V, sequence_len=MODULE_T)).state_dict()  # seed 42: both runs
    plain = make_module(num_iterations=3, matrix_lr=0.0, export=False)
    chunked = make_module(num_iterations=3, matrix_lr=0.0, export=False, loss_chunk_size=10)
    trainer().fit(plain, FixedSteps(copy.deepcopy(steps)))
    assert calls == []
    trainer().fit(chunked, FixedSteps(copy.deepcopy(steps)))
    assert calls == [10] * 3 * 3  # every micro-step of every step
    # The heads' gradients differ in the last bits (3e-7 relative); Adam divides that by |g|, so an element whose
    # gradient nearly cancels can move much further, elementwise. Per tensor, the runs stay within 1e-3 of the
    # distance it moved (1.2e-5 the worst of 30 data seeds); a wrong loss head is off by about all of it.
    for (name, p), q in zip(plain.gpt.state_dict().items(), chunked.gpt.state_dict().values()):
        moved = (p - start[name].to(p.dtype)).norm()
        assert (p - q).norm() <= 1e-3 * moved, name
    assert not torch.equal(plain.gpt.lm_head.weight, torch.zeros_like(plain.gpt.lm_head.weight))  # it trained


def test_plan_names_the_loss_head():
    assert make_module().loss_head_plan()["loss head"].startswith("one shot: [32 x vocab] logits")
    assert make_module(loss_chunk_size=10).loss_head_plan() == {"loss head": "chunks of 10 rows, 4 per micro-batch"}


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    """Training compiles the GPT on CUDA; the chunked head must trace into the same graph (fullgraph=True)."""
    torch.manual_seed(0)
    gpt = build_gpt(GPTConfig.from_depth(2, vocab_size=512, sequence_len=32))
    with torch.no_grad():
        gpt.lm_head.weight.normal_(0, 0.05)
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    y[:, :3] = -1

    def step(model, **kw):
        gpt.zero_grad(set_to_none=True)
        loss = model(x, y, **kw)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in gpt.parameters()]

    ref = step(gpt)
    got = step(torch.compile(gpt, dynamic=False, fullgraph=True), loss_chunk_size=20)
    # inductor reorders and vectorises the sums per instruction set: fp32 sums of 64 rows in another order differ by
    # ~sqrt(64) * 2^-24 of their size, far below 1e-5 of the norm
    for a, b in zip(got, ref):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-12

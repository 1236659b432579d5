"""GPTModule: one training_step == one optimizer step, and the math equals nanochat's loop (nanochat d575940
scripts/base_train.py)."""
import copy

import lightning.pytorch as L
import pytest
import torch

from nanolit.common import NanolitError
from nanolit.data.loader import grad_accum_steps
from nanolit.model import GPTConfig, build_gpt
from nanolit.module import GPTModule, resolve_num_iterations
from nanolit.optim import build_optimizers
from nanolit.schedules import lr_multiplier, muon_momentum

V, T, B, A = 64, 16, 2, 3  # vocab, seq, device batch, grad accumulation


class FixedSteps(L.LightningDataModule):
    """A DataModule yielding pre-made step batches [A, B, T+1] (no tokenizer), like BaseDataModule's shape."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.vocab_size = V

    def train_dataloader(self):
        return Steps(self.steps)


class Steps:
    """An iterable that is not a list (Lightning reads a list as several dataloaders)."""

    def __init__(self, steps):
        self.steps = steps

    def __iter__(self):
        return iter(self.steps)


def make_steps(n, seed=0, accum=A):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (accum, B, T + 1), generator=g) for _ in range(n)]


def make_module(**kw):
    args = dict(depth=2, max_seq_len=T, device_batch_size=B, total_batch_size=A * B * T, vocab_size=V,
                num_iterations=5, warmdown_ratio=0.4, warmup_ratio=0.4, final_lr_frac=0.1, compile=False)
    args.update(kw)
    return GPTModule(**args)


def trainer(**kw):
    args = dict(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    args.update(kw)
    return L.Trainer(**args)


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs, self.momenta = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        adamw, muon = trainer.optimizers
        self.lrs.append([g["lr"] for g in adamw.param_groups + muon.param_groups])
        self.momenta.append(muon.param_groups[0]["momentum"])


def test_global_step_counts_optimizer_steps_and_horizon_is_max_steps():
    module, rec = make_module(), RecordLR()
    t = trainer(callbacks=[rec])
    t.fit(module, FixedSteps(make_steps(20)))
    assert t.global_step == 5  # two optimizers, yet one count per training_step (Lightning #17958)
    assert t.max_steps == 5 and len(rec.lrs) == 5


def reference_run(steps, module_kwargs):
    """nanochat's loop (nanochat d575940 scripts/base_train.py) written out by hand, without Lightning."""
    hp = dict(depth=2, num_iterations=5, warmup_ratio=0.4, warmdown_ratio=0.4, final_lr_frac=0.1, grad_clip=1.0,
              embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0)
    hp.update(module_kwargs)
    model = build_gpt(GPTConfig.from_depth(hp["depth"], V, T))
    adamw, muon = build_optimizers(model, unembedding_lr=hp["unembedding_lr"], embedding_lr=hp["embedding_lr"],
                                   matrix_lr=hp["matrix_lr"], weight_decay=hp["weight_decay"])
    lrs = []
    for step, batch in enumerate(steps[:hp["num_iterations"]]):
        for i in range(batch.size(0)):
            loss = model(batch[i, :, :-1], batch[i, :, 1:])
            (loss / batch.size(0)).backward()
        if hp["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        lrm = lr_multiplier(step, hp["num_iterations"], hp["warmup_ratio"], hp["warmdown_ratio"], hp["final_lr_frac"])
        for opt in (adamw, muon):
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lrm
        for g in muon.param_groups:
            g["momentum"] = muon_momentum(step)
        lrs.append([g["lr"] for g in adamw.param_groups + muon.param_groups])
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    return model, lrs


@pytest.mark.parametrize("kw", [{}, {"grad_clip": 0.0, "weight_decay": 0.1}])
def test_training_matches_nanochat_loop(kw):
    steps = make_steps(5, seed=1)
    module, rec = make_module(**kw), RecordLR()
    trainer(callbacks=[rec]).fit(module, FixedSteps(copy.deepcopy(steps)))
    ref, ref_lrs = reference_run(steps, kw)
    assert rec.lrs == ref_lrs
    assert rec.momenta == pytest.approx([muon_momentum(s) for s in range(5)])
    # warmup (step 0 at 1/2), constant, warmdown towards final_lr_frac: the schedule really moved
    assert [lr[2] for lr in rec.lrs] == pytest.approx([0.01, 0.02, 0.02, 0.02, 0.011])
    for (name, p), q in zip(module.gpt.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_init_lr_frac_scales_every_group():
    module = make_module(init_lr_frac=0.5, num_iterations=1)
    rec = RecordLR()
    trainer(callbacks=[rec]).fit(module, FixedSteps(make_steps(2)))
    ref_module = make_module(num_iterations=1)
    rec_ref = RecordLR()
    trainer(callbacks=[rec_ref]).fit(ref_module, FixedSteps(make_steps(2)))
    assert rec.lrs[0] == pytest.approx([x * 0.5 for x in rec_ref.lrs[0]])


def test_horizon_precedence():
    assert resolve_num_iterations(7, 1e18, 20, 1000, 10.0, 100) == (7, "num_iterations")
    n, src = resolve_num_iterations(-1, 1e6, 20, 1000, 10.0, 100)
    assert n == round(1e6 / (10.0 * 100)) and src.startswith("target_flops")
    n, src = resolve_num_iterations(-1, -1, 20, 560_988_160, 3.49e9, 524288)
    assert n == 21_400 and src.startswith("target_param_data_ratio")  # nanochat d575940 scripts/base_train.py d20 row
    with pytest.raises(NanolitError, match="no training horizon"):
        resolve_num_iterations(-1, -1, -1, 1000, 10.0, 100)


def test_derived_horizon_from_ratio_sets_max_steps():
    module = make_module(num_iterations=-1, target_param_data_ratio=0.01)
    t = trainer()
    t.fit(module, FixedSteps(make_steps(50)))
    expected = int(0.01 * module.gpt.num_params()) // (A * B * T)
    assert expected > 0 and t.global_step == expected == t.max_steps


def test_contradicting_max_steps_is_an_error():
    with pytest.raises(NanolitError, match="contradicts"):
        trainer(max_steps=3).fit(make_module(), FixedSteps(make_steps(5)))


def test_batch_math_error_names_the_nearest_valid_total():
    with pytest.raises(NanolitError, match=r"use total_batch_size=4096"):
        grad_accum_steps(4000, 8, 256, 2)
    with pytest.raises(NanolitError, match="total_batch_size"):
        trainer().fit(make_module(total_batch_size=100), FixedSteps(make_steps(5)))


def test_wrong_batch_shape_is_an_error():
    with pytest.raises(NanolitError, match="grad_accum"):
        trainer().fit(make_module(), FixedSteps(make_steps(5, accum=2)))


def test_nan_loss_stops_with_the_step():
    module = make_module()
    steps = make_steps(5)

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                pl_module.gpt.lm_head.weight.data.fill_(float("nan"))

    with pytest.raises(NanolitError, match="at step 2"):
        trainer(callbacks=[Poison()]).fit(module, FixedSteps(steps))


def test_protocol_for_callbacks():
    module = make_module()
    t = trainer()
    t.fit(module, FixedSteps(make_steps(5)))
    x = torch.randint(0, V, (2, T))
    assert module.loss_per_token(x, x).shape == (2 * T,)
    assert len(module.generate([1, 2, 3], 4)) == 4
    assert module.tokens_per_step == A * B * T
    assert module.flops_per_token == module.gpt.estimate_flops()
    assert module.num_iterations == 5
    assert "gpt.transformer.wte.weight" in module.state_dict()
    assert not any("_orig_mod" in k for k in module.state_dict())


def test_compile_default_follows_the_cpu_compiler(monkeypatch):
    """compile=None compiles on a CPU where torch finds a C++ compiler (and chunks the loss head there), and stays
    eager without one; the plan table says which."""
    import nanolit.cpu
    from nanolit.module import CPU_LOSS_CHUNK_ROWS

    module = make_module(compile=None, loss_chunk_size=None)
    module.trainer = trainer()
    monkeypatch.setattr(nanolit.cpu, "cpu_compiler", lambda: None)
    assert not module.compiles() and module.loss_chunk_rows() == 0
    assert "no C++ compiler" in module.compile_plan()["compile"]
    monkeypatch.setattr(nanolit.cpu, "cpu_compiler", lambda: "c++")
    assert module.compiles() and module.loss_chunk_rows() == CPU_LOSS_CHUNK_ROWS
    assert "first step pays the compilation" in module.compile_plan()["compile"]
    explicit = make_module(compile=None, loss_chunk_size=0)
    explicit.trainer = module.trainer
    assert explicit.loss_chunk_rows() == 0  # a number is kept as given
    assert make_module(compile=False, loss_chunk_size=None).loss_chunk_rows() == 0


@pytest.mark.skipif(__import__("nanolit.cpu").cpu.cpu_compiler() is None, reason="no C++ compiler for torch.compile")
def test_compiled_cpu_default_trains_like_eager(monkeypatch):
    """The CPU default (compiled GPT and Newton-Schulz, chunked loss head, fused AdamW) trains as the eager one-shot
    loop does. Newton-Schulz runs in fp32 on both sides: in bf16 a ~1e-7 change (compiled kernels and chunk sums add
    in another order) can move an element across a bf16 rounding boundary and change a whole update, by an amount
    that depends on the CPU's kernels. In fp32 the two runs differ by summation order only: ~1e-7 relative per
    operation, kept below 1e-5 of each loss and 1e-4 of the distance each weight moved over 3 steps (the same
    bound as the 1-process against 2-process run in tests/test_ddp.py)."""
    import nanolit.optim

    monkeypatch.setattr(nanolit.optim, "NS_DTYPE", torch.float32)
    steps = make_steps(3, seed=2)
    eager, compiled = make_module(num_iterations=3), make_module(num_iterations=3, compile=None, loss_chunk_size=None)
    losses = {}
    for name, module in (("eager", eager), ("compiled", compiled)):
        rec = RecordLoss()
        trainer(callbacks=[rec]).fit(module, FixedSteps(copy.deepcopy(steps)))
        losses[name] = rec.losses
    assert compiled.train_model is not compiled.gpt and compiled.loss_chunk_rows() > 0  # the default did compile
    assert all(g.get("fused") for g in compiled.trainer.optimizers[0].param_groups)
    assert compiled.trainer.optimizers[1].compile_ns
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    start = build_gpt(GPTConfig.from_depth(2, V, T)).state_dict()
    for (name, p), q in zip(compiled.gpt.state_dict().items(), eager.gpt.state_dict().values()):
        assert (p - q).norm() <= 1e-4 * (q - start[name]).norm(), name


class RecordLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())

"""Sharded optimizers (DistAdamW, DistMuon) and NoWrapDDPStrategy (nanochat d575940 nanochat/muon.py,
nanochat/adamw.py).

Two gloo processes must take the same steps as one process given the rank-mean gradient, checkpoints must
consolidate into the single-process layout and load on any world size, sharded or not, and a Lightning fit on
two processes must match one process.
"""
from __future__ import annotations

import copy
import io
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import leave_process_group
from nanolit.common import NanolitError
from nanolit.model import GPTConfig, build_gpt
from nanolit.optim import Muon, build_optimizers
from nanolit.sharded import DistAdamW, DistMuon, build_sharded_optimizers

W = 2  # ranks in the multi-process tests (the machine has two cores)
ADAMW_SHAPES = [(6, 4), (6, 4)]  # 3 rows per rank
# model order interleaves shapes; shape groups: (4,4) x3 (last chunk padded), (4,8) x2, (8,4) x1 (rank 1 owns
# none of it); the numel-32 Muon group holds two shapes
MUON_SHAPES = [(4, 4), (8, 4), (4, 4), (4, 8), (4, 4), (4, 8)]
OWNED = [4, 2]  # matrices per rank: indices 0, 2 of (4,4), 0 of (4,8), 0 of (8,4) -> rank 0; the rest -> rank 1
LRM = [1.0, 0.5, 0.25]  # per-step LR multiplier and Muon momentum, as the schedules change them
MOMENTUM = [0.85, 0.9, 0.95]


# ------------------------------------------------------------------------------------------------ helpers
def make_params(seed: int = 0) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    return ([nn.Parameter(torch.randn(s, generator=g)) for s in ADAMW_SHAPES],
            [nn.Parameter(torch.randn(s, generator=g)) for s in MUON_SHAPES])


def copy_params(params: list[torch.Tensor]) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def adamw_groups(params):
    return [dict(params=[params[0]], lr=0.01, name="lm_head", initial_lr=0.01),
            dict(params=[params[1]], lr=0.2, name="wte", initial_lr=0.2)]


ADAMW_KW = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)


def with_initial_lr(muon):
    for group in muon.param_groups:
        group["initial_lr"] = group["lr"]
    return muon


def sharded_opts(adamw_params, muon_params):
    return DistAdamW(adamw_groups(adamw_params), **ADAMW_KW), with_initial_lr(DistMuon(muon_params, lr=0.02))


def single_opts(adamw_params, muon_params):
    return torch.optim.AdamW(adamw_groups(adamw_params), **ADAMW_KW), with_initial_lr(Muon(muon_params, lr=0.02))


def grad(step: int, rank: int, k: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + 100 * rank + k))


def mean_grad(step: int, k: int, shape) -> torch.Tensor:
    return (grad(step, 0, k, shape) + grad(step, 1, k, shape)) / 2  # the same sum-then-halve as the optimizers


def take_step(opts, params, step: int, grad_of) -> None:
    """One step: set every gradient from ``grad_of(step, k, shape)``, schedule LR and momentum, step both."""
    for k, p in enumerate(params):
        p.grad = grad_of(step, k, p.shape)
    adamw, muon = opts
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * LRM[step]
    for group in muon.param_groups:
        group["momentum"] = MOMENTUM[step]
    adamw.step()
    muon.step()


def rank_grad(rank):
    return lambda step, k, shape: grad(step, rank, k, shape)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def init_gloo(rank: int, tmp: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=W)


def _run_then_exit(rank: int, fn, tmp: Path) -> None:
    fn(rank, tmp)
    # torch 2.13's gloo now and then aborts in the interpreter's exit handlers after async collectives ("terminate
    # called without an active exception", SIGABRT); the worker's results are on disk, so skip those handlers
    os._exit(0)


def spawn(fn, tmp: Path) -> None:
    mp.spawn(_run_then_exit, args=(fn, tmp), nprocs=W, join=True)


def assert_muon_equal(a, b):
    # Muon's rank-mean gradient is bitwise the reference mean, and the owner runs the same code on it
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def assert_adamw_close(a, b, rtol=1e-6, atol=1e-7):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ one process (no process group)
def test_world_size_one_matches_the_single_process_optimizers():
    a, m = make_params()
    a_ref, m_ref = copy_params(a), copy_params(m)
    opts, ref = sharded_opts(a, m), single_opts(a_ref, m_ref)
    for step in range(3):
        take_step(opts, a + m, step, rank_grad(0))
        take_step(ref, a_ref + m_ref, step, rank_grad(0))
    assert_muon_equal(snapshot(m), snapshot(m_ref))
    # nanochat's eps placement differs from torch's by ~eps/|update| here: invisible at these gradients
    assert_adamw_close(snapshot(a), snapshot(a_ref))


def test_adamw_update_is_nanochats_formula_with_its_eps_placement():
    # gradients near eps make the placement visible: nanochat adds eps to sqrt(v) before the bias correction
    p0 = torch.ones(4, 3)
    g = torch.full((4, 3), 3e-10)
    p = nn.Parameter(p0.clone())
    opt = DistAdamW([p], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.5)
    p.grad = g.clone()
    opt.step()
    m, v = 0.2 * g, 0.05 * g * g
    expected = p0 * (1 - 0.1 * 0.5) - 0.1 * (0.05 ** 0.5 / 0.2) * m / (v.sqrt() + 1e-10)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
    torch_p = nn.Parameter(p0.clone())
    torch_p.grad = g.clone()
    torch.optim.AdamW([torch_p], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.5).step()
    assert (torch_p.detach() - p.detach()).abs().min() > 1e-3  # torch's effective eps is smaller


def test_build_sharded_optimizers_mirrors_build_optimizers():
    model = build_gpt(GPTConfig.from_depth(2, 64, 16))
    sharded, single = build_sharded_optimizers(model, embedding_lr=0.3, weight_decay=0.1), build_optimizers(
        model, embedding_lr=0.3, weight_decay=0.1)
    assert [type(o) for o in sharded] == [DistAdamW, DistMuon]
    for ours, theirs in zip(sharded, single):
        assert len(ours.param_groups) == len(theirs.param_groups)
        for a, b in zip(ours.param_groups, theirs.param_groups):
            assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
            assert {k: v for k, v in a.items() if k != "params"} == {k: v for k, v in b.items() if k != "params"}
    assert {k: sharded[0].param_groups[1][k] for k in ("name", "betas", "eps", "weight_decay")} == dict(
        name="wte", betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    # Newton-Schulz compiled or not as the unsharded Muon: the training core asks both the same way
    assert sharded[1].compile_ns is single[1].compile_ns is None
    assert build_sharded_optimizers(model, compile_ns=False)[1].compile_ns is False


def test_dist_muon_passes_its_compile_choice_to_the_update(monkeypatch):
    import nanolit.sharded

    seen = []
    monkeypatch.setattr(nanolit.sharded, "muon_update", lambda *args, compiled=None: seen.append(compiled))
    _, m = make_params()
    for p in m:
        p.grad = torch.ones_like(p)
    DistMuon(m, compile_ns=False).step()  # one process: Muon's own batches, one call per shape
    assert seen == [False, False, False]


def _through_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # Lightning loads checkpoints weights_only


def test_state_dict_round_trips_between_sharded_and_unsharded_on_one_process():
    a, m = make_params()
    opts = sharded_opts(a, m)
    for step in range(2):
        take_step(opts, a + m, step, rank_grad(0))
    states = [_through_file(opt.state_dict()) for opt in opts]
    # the layout is the single-process optimizers' own, so they load it, and vice versa
    a2, m2 = copy_params(a), copy_params(m)
    single = single_opts(a2, m2)
    for opt, state in zip(single, states):
        opt.load_state_dict(copy.deepcopy(state))
    a3, m3 = copy_params(a), copy_params(m)
    again = sharded_opts(a3, m3)
    for opt, state in zip(again, [_through_file(o.state_dict()) for o in single]):
        opt.load_state_dict(state)
    take_step(opts, a + m, 2, rank_grad(0))
    take_step(single, a2 + m2, 2, rank_grad(0))
    take_step(again, a3 + m3, 2, rank_grad(0))
    assert_muon_equal(snapshot(m), snapshot(m2))
    assert_muon_equal(snapshot(m), snapshot(m3))
    assert_adamw_close(snapshot(a), snapshot(a2))
    for x, y in zip(snapshot(a), snapshot(a3)):
        assert torch.equal(x, y)
    assert opts[0].state[a[0]]["step"].item() == 3 and opts[0].state[a[0]]["step"].device.type == "cpu"


def test_muon_ownership_is_block_cyclic_within_sorted_shape_groups():
    _, m = make_params()
    muon = DistMuon(m)
    # shape groups (4,4): m0 m2 m4; (4,8): m3 m5; (8,4): m1 -- the i-th of a group goes to rank i % W
    assert [muon.owners(2)[p] for p in m] == [0, 0, 1, 0, 0, 1]
    assert [muon.owners(4)[p] for p in m] == [0, 0, 1, 0, 2, 1]


def test_refuses_what_it_does_not_implement():
    with pytest.raises(NanolitError, match="amsgrad or maximize"):
        DistAdamW([dict(params=[nn.Parameter(torch.zeros(2, 2))], amsgrad=True)])
    p = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match="no gradient"):
        DistMuon([p]).step()


# ---------------------------------------------------------------------------------------- two gloo processes
def _steps_worker(rank: int, tmp: Path) -> None:
    init_gloo(rank, tmp)
    a, m = make_params()
    opts = sharded_opts(a, m)
    for step in range(3):
        take_step(opts, a + m, step, rank_grad(rank))
    adamw, muon = opts
    torch.save({"params": snapshot(a + m), "exp_avg": [adamw.state[p]["exp_avg"] for p in a],
                "buffers": {k: muon.state[p]["momentum_buffer"] for k, p in enumerate(m) if muon.state.get(p)}},
               tmp / f"steps{rank}.pt")
    with pytest.raises(NanolitError, match="vocab_size divisible by 2"):
        DistAdamW([dict(params=[nn.Parameter(torch.zeros(5, 4))], name="wte")])
    with pytest.raises(RuntimeError, match="consolidate_state_dict"):
        adamw.state_dict()
    leave_process_group()


@pytest.mark.slow  # two spawned processes: ~10 s here
def test_two_ranks_step_like_one_process_on_the_mean_gradient(tmp_path):
    spawn(_steps_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"steps{r}.pt", weights_only=True) for r in range(W)]
    for x, y in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(x, y)  # the all-gathers leave every rank with the same parameters

    a, m = make_params()
    a_ref, m_ref = copy_params(a), copy_params(m)
    single, sharded_one = single_opts(a_ref, m_ref), sharded_opts(a, m)
    for step in range(3):
        take_step(single, a_ref + m_ref, step, mean_grad)
        take_step(sharded_one, a + m, step, mean_grad)
    # each rank holds its share of the state, built from the rank-mean gradient (Muon and Adam are nearly
    # scale-invariant, so the parameters alone would hardly notice a sum in place of a mean)
    for r, rank in enumerate(ranks):
        for got, p in zip(rank["exp_avg"], a):
            assert torch.equal(got, sharded_one[0].state[p]["exp_avg"][3 * r:3 * (r + 1)])
        assert len(rank["buffers"]) == OWNED[r]
        for k, buf in rank["buffers"].items():
            assert torch.equal(buf, single[1].state[m_ref[k]]["momentum_buffer"])
    assert sorted(k for rank in ranks for k in rank["buffers"]) == list(range(len(MUON_SHAPES)))
    got_a, got_m = ranks[0]["params"][:2], ranks[0]["params"][2:]
    assert_muon_equal(got_m, snapshot(m_ref))
    for x, y in zip(got_a, snapshot(a)):  # the same nanochat AdamW on one process: same numbers
        assert torch.equal(x, y)
    assert_adamw_close(got_a, snapshot(a_ref))  # torch's AdamW: the same up to eps placement


def _checkpoint_worker(rank: int, tmp: Path) -> None:
    init_gloo(rank, tmp)
    # A: two sharded steps, consolidate (every rank), save on rank 0, then a third step
    a, m = make_params()
    opts = sharded_opts(a, m)
    for step in range(2):
        take_step(opts, a + m, step, rank_grad(rank))
    for opt in opts:
        opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"adamw": opts[0].state_dict(), "muon": opts[1].state_dict(), "params": snapshot(a + m)},
                   tmp / "sharded_ckpt.pt")
    else:
        with pytest.raises(RuntimeError, match="consolidate_state_dict"):
            opts[0].state_dict()  # only rank 0 received the consolidated state
    take_step(opts, a + m, 2, rank_grad(rank))
    results = {"uninterrupted": snapshot(a + m)}
    dist.barrier()
    # B: resume from the sharded checkpoint; C: from the single-process one (made by the test beforehand)
    for name, ckpt in (("from_sharded", "sharded_ckpt.pt"), ("from_single", "single_ckpt.pt")):
        saved = torch.load(tmp / ckpt, weights_only=True)
        params = copy_params(saved["params"])
        opts = sharded_opts(params[:2], params[2:])
        opts[0].load_state_dict(saved["adamw"])
        opts[1].load_state_dict(saved["muon"])
        take_step(opts, params, 2, rank_grad(rank))
        results[name] = snapshot(params)
        results[name + "_owned"] = sum(1 for p in params[2:] if opts[1].state.get(p))
    torch.save(results, tmp / f"ckpt{rank}.pt")
    leave_process_group()


@pytest.mark.slow  # two spawned processes: ~10 s here
def test_checkpoints_consolidate_and_load_on_any_world_size(tmp_path):
    # the single-process run the sharded one resumes from (world size 1 -> 2, unsharded -> sharded)
    a, m = make_params()
    single = single_opts(a, m)
    for step in range(2):
        take_step(single, a + m, step, mean_grad)
    torch.save({"adamw": single[0].state_dict(), "muon": single[1].state_dict(), "params": snapshot(a + m)},
               tmp_path / "single_ckpt.pt")
    single_state = copy.deepcopy([opt.state_dict() for opt in single])
    take_step(single, a + m, 2, mean_grad)
    single_next = snapshot(a + m)

    spawn(_checkpoint_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"ckpt{r}.pt", weights_only=True) for r in range(W)]
    ckpt = torch.load(tmp_path / "sharded_ckpt.pt", weights_only=True)

    # the consolidated state is the single-process optimizers' state_dict: same groups, keys, shapes, values
    for ours, theirs in zip((ckpt["adamw"], ckpt["muon"]), single_state):
        assert ours["param_groups"] == theirs["param_groups"]
        assert ours["state"].keys() == theirs["state"].keys()
        for i, entry in ours["state"].items():
            assert entry.keys() == theirs["state"][i].keys()
            for key, value in entry.items():
                assert value.shape == theirs["state"][i][key].shape and value.dtype == theirs["state"][i][key].dtype
                assert value.device.type == "cpu"
                # exp_avg is mul+add on one side and lerp on the other: one fp32 ulp of the O(0.3) summands (3e-8),
                # which a cancelling sum keeps while the result shrinks, hence an absolute bound
                torch.testing.assert_close(value, theirs["state"][i][key], rtol=1e-5, atol=1e-7)

    for rank in ranks:
        uninterrupted = rank["uninterrupted"]
        for x, y in zip(rank["from_sharded"], uninterrupted):  # 2 -> 2 ranks: exactly the same next step
            assert torch.equal(x, y)
        assert rank["from_sharded_owned"] == rank["from_single_owned"]  # each rank kept only its own buffers
        assert_muon_equal(rank["from_single"][2:], single_next[2:])  # 1 -> 2 ranks, unsharded -> sharded
        assert_adamw_close(rank["from_single"][:2], single_next[:2])
    assert [r["from_sharded_owned"] for r in ranks] == OWNED

    # 2 ranks -> 1 process, sharded -> unsharded
    params = copy_params(ckpt["params"])
    back = single_opts(params[:2], params[2:])
    back[0].load_state_dict(ckpt["adamw"])
    back[1].load_state_dict(ckpt["muon"])
    take_step(back, params, 2, mean_grad)
    assert_muon_equal(snapshot(params[2:]), ranks[0]["uninterrupted"][2:])
    assert_adamw_close(snapshot(params[:2]), ranks[0]["uninterrupted"][:2])


# ------------------------------------------------------------------------------------- strategy and Lightning
def test_strategy_is_registered_and_reachable_from_the_cli(monkeypatch):
    # a bare `--trainer.strategy=nanolit.strategies.NoWrapDDPStrategy` reaches Lightning as a strategy *name*
    # (jsonargparse tries str first), hence class_path, or the registered name once this module is imported
    import lightning.pytorch as L
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    from nanolit.strategies import NoWrapDDPStrategy

    trainer = L.Trainer(strategy="ddp_nowrap", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy) is NoWrapDDPStrategy
    monkeypatch.setattr(sys, "argv", ["nanolit"])  # LightningCLI would otherwise see pytest's arguments
    cli = LightningCLI(BoringModel, run=False, args=[
        "--trainer.strategy.class_path=nanolit.strategies.NoWrapDDPStrategy", "--trainer.accelerator=cpu",
        "--trainer.devices=2", "--trainer.logger=false"])
    assert type(cli.trainer.strategy) is NoWrapDDPStrategy and cli.trainer.num_devices == 2


V, T, B = 64, 16, 2  # vocab, sequence, device batch of the Lightning runs
SCRIPT = textwrap.dedent('''
    """Lightning fits for test_sharded: importable (the test runs the 1-process fits) and run by torchrun."""
    import os
    import sys
    from pathlib import Path

    import lightning.pytorch as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from nanolit.common import NanolitError
    from nanolit.module import GPTModule
    from nanolit.strategies import NoWrapDDPStrategy

    V, T, B, STEPS = {V}, {T}, {B}, 4


    class Steps:
        def __init__(self, steps):
            self.steps = steps

        def __iter__(self):
            return iter(self.steps)


    class RankSteps(L.LightningDataModule):
        """Global steps of 2 micro-batches; of W ranks, rank r trains on micro-batches [r*2/W, (r+1)*2/W).
        Counts the steps it handed out, so a resumed run continues with the next one."""

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(7)
            self.steps = [torch.randint(0, V, (2, B, T + 1), generator=g) for _ in range(STEPS)]
            self.vocab_size = V
            self.consumed = 0

        def train_dataloader(self):
            per_rank = 2 // self.trainer.world_size
            rank = self.trainer.global_rank
            return Steps([s[rank * per_rank:(rank + 1) * per_rank] for s in self.steps[self.consumed:]])

        def on_before_batch_transfer(self, batch, dataloader_idx):
            if self.trainer.training:
                self.consumed += 1
            return batch

        def state_dict(self):
            return {{"consumed": self.consumed}}

        def load_state_dict(self, state):
            self.consumed = state["consumed"]


    def fit(root, sharded, devices, ckpt_path=None):
        """4 steps of a d2 GPT without clipping (nanochat clips per rank: only an unclipped run can match),
        checkpoints at steps 2 and 4; returns the module."""
        module = GPTModule(shard_optimizer=sharded, depth=2, max_seq_len=T, device_batch_size=B, total_batch_size=2 * B * T, vocab_size=V,
                     num_iterations=STEPS, warmup_ratio=0.25, warmdown_ratio=0.5, final_lr_frac=0.1,
                     grad_clip=0.0, weight_decay=0.1, compile=False, export=False)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=NoWrapDDPStrategy() if devices > 1 else "auto",
                            max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root),
                            callbacks=[ModelCheckpoint(dirpath=str(root), filename="{{step}}", every_n_train_steps=2,
                                                       save_top_k=-1)])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the torchrun processes' kernels (OMP_NUM_THREADS=1), so results compare bitwise
        try:
            trainer.fit(module, RankSteps(), ckpt_path=None if ckpt_path is None else str(ckpt_path))
        finally:
            torch.set_num_threads(threads)
        return module


    if __name__ == "__main__":
        out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
        weights = {{"sharded": fit(out / "sharded", True, 2).gpt.state_dict(),
                   "from_single": fit(out / "from_single", True, 2, out / "single" / "step=2.ckpt").gpt.state_dict()}}
        try:
            fit(out / "refused", False, 2)
            weights["refused"] = "trained"
        except NanolitError as e:
            weights["refused"] = str(e)
        torch.save(weights, out / f"rank{{rank}}.pt")
        torch.distributed.barrier()  # leave together (a rank exiting early can abort its gloo peer)
        torch.distributed.destroy_process_group()
''').format(V=V, T=T, B=B)


def assert_weights_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.slow  # torchrun starts two processes that import Lightning and fit three times: ~30 s here
def test_lightning_two_process_sharded_fit_matches_one_process(tmp_path):
    script = tmp_path / "sharded_fit.py"
    script.write_text(SCRIPT)
    runs = runpy.run_path(str(script))  # the same classes in this process, for the 1-process fits
    fit = runs["fit"]
    single = fit(tmp_path / "single", False, 1).gpt.state_dict()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(W),
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(W)]
    for key in ("sharded", "from_single"):
        assert_weights_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
    for rank in ranks:
        assert "shard_optimizer" in rank["refused"]  # NoWrapDDPStrategy with unsharded optimizers

    # 2 sharded processes take the same steps as 1 sharded process (the rank-mean gradient is the same)
    one = fit(tmp_path / "one", True, 1).gpt.state_dict()
    assert_weights_close(ranks[0]["sharded"], one, rtol=0, atol=0)
    # Lightning's checkpoint of the 2-process run holds the consolidated state: the 1-process run's, exactly,
    # in the unsharded optimizers' layout, loadable weights_only
    states = {name: torch.load(tmp_path / name / "step=2.ckpt", weights_only=True)["optimizer_states"]
              for name in ("sharded", "one", "single")}
    for ours, one_proc, unsharded in zip(states["sharded"], states["one"], states["single"], strict=True):
        assert ours["param_groups"] == one_proc["param_groups"] == unsharded["param_groups"]
        assert ours["state"].keys() == one_proc["state"].keys() == unsharded["state"].keys()
        for i, entry in ours["state"].items():
            assert entry.keys() == unsharded["state"][i].keys()
            for key, value in entry.items():
                assert torch.equal(value, one_proc["state"][i][key])
                assert value.shape == unsharded["state"][i][key].shape
    # an unsharded 1-process checkpoint resumes on 2 sharded processes exactly as on 1 sharded process
    resumed_one = fit(tmp_path / "from_single_one", True, 1, tmp_path / "single" / "step=2.ckpt").gpt.state_dict()
    assert_weights_close(ranks[0]["from_single"], resumed_one, rtol=0, atol=0)
    # and the 2-process sharded checkpoint resumes unsharded on 1 process exactly as the 1-process sharded one does
    # (their step-2 states are equal, asserted above). Sharded and unsharded *runs* are not compared: they place
    # AdamW's eps differently (nanochat's DistAdamW vs torch's AdamW, tested in test_optim), and where a gradient
    # entry is near eps that is a fraction of a whole step, which last-bit rounding decides.
    back = fit(tmp_path / "back", False, 1, tmp_path / "sharded" / "step=2.ckpt").gpt.state_dict()
    back_one = fit(tmp_path / "back_one", False, 1, tmp_path / "one" / "step=2.ckpt").gpt.state_dict()
    assert_weights_close(back, back_one, rtol=0, atol=0)

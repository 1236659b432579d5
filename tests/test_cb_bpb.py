"""BitsPerByte metric and BPBValidation callback (nanochat d575940 scripts/base_train.py, nanochat/loss_eval.py)."""
from __future__ import annotations

import copy
import csv
import math

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from test_cb_toys import CharTokenizer, make_trainer, reference_bpb, toy_pair
from torch.utils.data import DataLoader

from conftest import leave_process_group
from nanolit.callbacks import RunState, BitsPerByte, BPBValidation
from nanolit.common import NanolitError
from nanolit.eval.bpb import bits_per_byte


def _random_batches(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    vocab = CharTokenizer().get_vocab_size()
    out = []
    for _ in range(count):
        loss = torch.rand(3, 5, generator=gen) * 4
        y = torch.randint(0, vocab, (3, 5), generator=gen)
        y[0, 0], y[1, 2], y[2, 4] = -1, 0, -1  # ignored targets and a <|bos|> (0 bytes) target
        out.append((loss, y))
    return out


def _by_hand(batches, token_bytes) -> float:
    nats, total_bytes = 0.0, 0
    for loss, y in batches:
        for value, target in zip(loss.flatten().tolist(), y.flatten().tolist()):
            if target >= 0 and int(token_bytes[target]) > 0:
                nats += value
                total_bytes += int(token_bytes[target])
    return nats / (math.log(2) * total_bytes)


def test_metric_matches_definition():
    token_bytes = CharTokenizer().token_bytes()
    batches = _random_batches(4)
    metric = BitsPerByte()
    for loss, y in batches:
        metric.update(loss, y, token_bytes)
    assert metric.compute().item() == pytest.approx(_by_hand(batches, token_bytes), rel=1e-6)


def test_metric_with_no_bytes_is_inf():
    metric = BitsPerByte()
    metric.update(torch.ones(4), torch.tensor([-1, 0, -1, 0]), CharTokenizer().token_bytes())
    assert metric.compute().item() == math.inf


def test_two_partial_states_merge_to_the_whole():
    """What DDP does: each rank sums its share; summing the states gives the bpb of everything."""
    token_bytes = CharTokenizer().token_bytes()
    batches = _random_batches(6)
    rank0, rank1 = BitsPerByte(), BitsPerByte()
    for i, (loss, y) in enumerate(batches):
        (rank0 if i % 2 == 0 else rank1).update(loss, y, token_bytes)
    assert bits_per_byte(rank0.total_nats, rank0.total_bytes) != pytest.approx(_by_hand(batches, token_bytes))
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(_by_hand(batches, token_bytes), rel=1e-6)


def _gloo_worker(rank: int, store: str, result_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    token_bytes = CharTokenizer().token_bytes()
    metric = BitsPerByte()
    for loss, y in _random_batches(6)[rank::2]:
        metric.update(loss, y, token_bytes)
    value = metric.compute().item()  # a collective: both ranks
    torch.save(value, f"{result_path}.{rank}")
    leave_process_group()


@pytest.mark.slow  # two processes that each import torch and Lightning: ~20 s on a small shared CPU
def test_metric_all_reduces_across_two_gloo_processes(tmp_path):
    store = str(tmp_path / "store")  # a file store: a free port found and closed first could be taken before the ranks bind it
    mp.spawn(_gloo_worker, args=(store, str(tmp_path / "bpb")), nprocs=2, join=True)
    expected = _by_hand(_random_batches(6), CharTokenizer().token_bytes())
    for rank in range(2):
        assert torch.load(tmp_path / f"bpb.{rank}") == pytest.approx(expected, rel=1e-6)


def test_callback_value_schedule_and_state(tmp_path, capsys):
    module, data = toy_pair(num_iterations=7)
    initial = copy.deepcopy(module.model)
    bpb = BPBValidation(eval_every=3)
    trainer = make_trainer(tmp_path, [bpb], max_steps=7)
    trainer.fit(module, datamodule=data)

    assert [step for step, _ in bpb.run_state.val_bpb_history] == [0, 3, 6, 7]  # step 0, every 3, and the final model
    assert data.val_loader_calls == 4  # a fresh val loader per eval, as nanochat rebuilds it
    assert bpb.run_state.val_bpb_history[0][1] == pytest.approx(reference_bpb(initial, data.val_batches, data.token_bytes), rel=1e-5)
    assert bpb.run_state.val_bpb_history[-1][1] == pytest.approx(reference_bpb(module.model, data.val_batches, data.token_bytes),
                                               rel=1e-5)
    assert bpb.run_state.val_bpb == bpb.run_state.val_bpb_history[-1][1]
    assert bpb.run_state.min_val_bpb == min(v for _, v in bpb.run_state.val_bpb_history)
    assert bpb.run_state.val_bpb_history[-1][1] < bpb.run_state.val_bpb_history[0][1]  # the bigram learns the text
    out = capsys.readouterr().out
    assert f"Step 00003 | Validation bpb: {bpb.run_state.val_bpb_history[1][1]:.4f}" in out

    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        logged = [(int(r["step"]), float(r["val/bpb"])) for r in csv.DictReader(f) if r["val/bpb"]]
    assert [s for s, _ in logged] == [s for s, _ in bpb.run_state.val_bpb_history]
    assert [v for _, v in logged] == pytest.approx([v for _, v in bpb.run_state.val_bpb_history])
    assert trainer.callback_metrics["val/bpb"].item() == pytest.approx(bpb.run_state.val_bpb)

    # the figures live in the run state, which checkpoints them (the callback itself keeps none)
    restored = RunState()
    restored.load_state_dict(bpb.run_state.state_dict())
    assert (restored.min_val_bpb, restored.val_bpb, restored.val_bpb_history) == (
        bpb.run_state.min_val_bpb, bpb.run_state.val_bpb, bpb.run_state.val_bpb_history)
    assert bpb.state_dict() == {}


class ModeRecordingModule(L.LightningModule):
    """Wraps the toy bigram to record the mode and grad state each hook sees."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.tokens_per_step, self.flops_per_token, self.num_iterations = 32, 1.0, 3
        self.seen_eval, self.seen_train = [], []

    def training_step(self, batch, batch_idx):
        self.seen_train.append(self.training)
        return self.inner.training_step(batch, batch_idx)

    def loss_per_token(self, x, y):
        self.seen_eval.append((self.training, torch.is_grad_enabled()))
        return self.inner.loss_per_token(x, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_evaluates_in_eval_mode_without_grad_and_restores_train_mode(tmp_path):
    inner, data = toy_pair()
    module = ModeRecordingModule(inner)
    make_trainer(tmp_path, [BPBValidation(eval_every=1)], max_steps=3).fit(module, datamodule=data)
    assert module.seen_eval and set(module.seen_eval) == {(False, False)}
    assert module.seen_train == [True, True, True]


def test_resumed_run_continues_the_same_history(tmp_path):
    module, data = toy_pair(num_iterations=7)
    full = BPBValidation(eval_every=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    make_trainer(tmp_path / "a", [full, ckpt], max_steps=7, enable_checkpointing=True).fit(module, datamodule=data)

    module, data = toy_pair(num_iterations=7)
    resumed = BPBValidation(eval_every=2)
    make_trainer(tmp_path / "b", [resumed], max_steps=7).fit(module, datamodule=data,
                                                              ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    # The step-4 checkpoint was written before the step-4 eval (evals run at the start of a step), so the
    # resumed run evaluates 4 itself: every eval happens exactly once.
    assert [s for s, _ in resumed.run_state.val_bpb_history] == [0, 2, 4, 6, 7]
    assert [v for _, v in resumed.run_state.val_bpb_history] == pytest.approx(
        [v for _, v in full.run_state.val_bpb_history])
    assert resumed.run_state.min_val_bpb == pytest.approx(full.run_state.min_val_bpb)


@pytest.mark.parametrize("every", ["250", 2.5, 0, -2, True, None])
def test_bad_interval_is_a_user_error(every):
    with pytest.raises(NanolitError, match="eval_every"):
        BPBValidation(eval_every=every)


def test_missing_datamodule_is_a_clear_error(tmp_path):
    module, data = toy_pair()
    trainer = make_trainer(tmp_path, [BPBValidation(eval_every=1)], max_steps=1)
    with pytest.raises(NanolitError, match="DataModule"):
        trainer.fit(module, train_dataloaders=data.train_dataloader())


# --- the real nanochat fixture: same number as nanochat's evaluate_bpb -----------------------------------------

class FixtureModule(L.LightningModule):
    """Hosts the real nanochat d2 model behind the protocol; lr 0 so the final model equals the checkpoint."""

    def __init__(self, gpt) -> None:
        super().__init__()
        self.gpt = gpt
        self.tokens_per_step, self.flops_per_token, self.num_iterations = 1024, 1.0, 1

    def loss_per_token(self, x, y):
        return self.gpt(x, y, loss_reduction="none").view(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": self.gpt(x, y)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class FixtureData(L.LightningDataModule):
    def __init__(self, tokenizer, batches) -> None:
        super().__init__()
        self.tokenizer, self.token_bytes, self.batches = tokenizer, tokenizer.token_bytes(), batches

    def train_dataloader(self):
        return DataLoader(self.batches[:1], batch_size=None)

    def val_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


@pytest.mark.slow  # 32 forwards of the d2 model on [4, 256]: ~30 s on a small shared CPU
def test_fixture_val_bpb_matches_nanochat(tmp_path, nanochat_d2, expected_d2):
    pq = pytest.importorskip("pyarrow.parquet")
    from nanolit.checkpoint import build_model
    from nanolit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_directory(nanochat_d2 / "tokenizer")
    gpt, _ = build_model(nanochat_d2, 50, "cpu", phase="eval")
    # expected.json's val_bpb_note: 32 batches of B=4, T=256 from the val shard, every document with <|bos|>
    # prepended, concatenated; each batch takes B*T+1 tokens (nanochat d575940 nanochat/dataloader.py).
    B, T, steps = 4, 256, 32
    docs = pq.read_table(nanochat_d2 / "base_data" / "shard_00004.parquet").column("text").to_pylist()
    stream = []
    for ids in tokenizer.encode(docs, prepend=tokenizer.get_bos_token_id()):
        stream.extend(ids)
        if len(stream) >= steps * (B * T + 1):
            break
    flat = torch.tensor(stream[: steps * (B * T + 1)]).view(steps, B * T + 1)
    batches = [(row[:-1].view(B, T), row[1:].view(B, T)) for row in flat]

    bpb = BPBValidation(eval_every=1000)
    make_trainer(tmp_path, [bpb], max_steps=1).fit(FixtureModule(gpt), datamodule=FixtureData(tokenizer, batches))
    assert bpb.run_state.val_bpb_history[0][0] == 0
    assert bpb.run_state.val_bpb_history[0][1] == pytest.approx(expected_d2["val_bpb"], rel=1e-5)

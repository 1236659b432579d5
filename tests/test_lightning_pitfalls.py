"""The Lightning 2.6 behaviours nanolit's design works around, pinned by tests.

If a Lightning upgrade fixes one of them, its test fails and the workaround can go.
"""
import lightning.pytorch as L
import pytest
import torch

from lightning.pytorch.callbacks import ModelCheckpoint


class Tiny(L.LightningModule):
    """Manual optimization with two optimizers, stepped through their LightningOptimizers (what nanolit avoids)."""

    def __init__(self, raw_second: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        self.raw_second = raw_second
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(int(batch[0, 0]))
        opt_a, opt_b = self.optimizers()
        self.manual_backward((self.a(batch.float()) + self.b(batch.float())).sum())
        opt_a.step()
        opt_b.optimizer.step() if self.raw_second else opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]


def trainer(**kw):
    return L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def batches(n):
    return [torch.full((1, 2), i) for i in range(n)]


class Batches:
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_two_lightning_optimizer_steps_double_count_global_step():
    """Lightning issue #17958: each LightningOptimizer.step() adds 1 to global_step."""
    doubled = Tiny()
    trainer(max_steps=10, enable_checkpointing=False).fit(doubled, Batches(batches(20)))
    assert len(doubled.seen) == 5  # max_steps=10 stopped after 5 batches
    single = Tiny(raw_second=True)  # nanolit's fix: the second optimizer steps raw
    t = trainer(max_steps=10, enable_checkpointing=False)
    t.fit(single, Batches(batches(20)))
    assert len(single.seen) == 10 and t.global_step == 10


def test_optimizer_step_without_closure_argument_fails_under_lightning():
    """Lightning calls optimizer.step(closure=...); nanochat's Muon.step(self) would raise."""

    class NoClosureSGD(torch.optim.SGD):
        def step(self):  # nanochat d575940's signature
            return super().step()

    class Module(Tiny):
        def configure_optimizers(self):
            return [NoClosureSGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]

    with pytest.raises(TypeError, match="closure"):
        trainer(max_steps=2, enable_checkpointing=False).fit(Module(raw_second=True), Batches(batches(4)))


class StatefulLoader:
    """A loader with state_dict/load_state_dict: Lightning saves and restores it itself."""

    def __init__(self, n):
        self.n, self.pos = n, 0

    def __iter__(self):
        while self.pos < self.n:
            self.pos += 1
            yield torch.full((1, 2), self.pos - 1)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


class StatefulData(L.LightningDataModule):
    def train_dataloader(self):
        return StatefulLoader(20)


def test_lightnings_stateful_loader_resume_skips_a_batch(tmp_path):
    """Lightning 2.6: the saved loader state is one prefetched batch ahead, so a resume skips a batch.
    nanolit's loaders have no state_dict; the DataModule records the state of the batch being consumed."""
    first = Tiny(raw_second=True)
    trainer(max_steps=5, callbacks=[ModelCheckpoint(tmp_path, every_n_train_steps=3, save_top_k=-1)]).fit(
        first, datamodule=StatefulData())
    assert first.seen == [0, 1, 2, 3, 4]
    resumed = Tiny(raw_second=True)
    trainer(max_steps=6, enable_checkpointing=False).fit(resumed, datamodule=StatefulData(),
                                                          ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert resumed.seen[0] == 4  # batch 3 was never trained: one batch off

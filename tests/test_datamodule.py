"""BaseDataModule: setup errors, properties, and exact mid-run resume through Lightning (Lightning would save the state
of the batch it already prefetched)."""
from __future__ import annotations

import shutil
import warnings

import lightning.pytorch as L
import pytest
import torch
from conftest import write_word_shards
from lightning.pytorch.callbacks import ModelCheckpoint

from nanolit.common import NanolitError
from nanolit.data.datamodule import BaseDataModule

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SMALL = dict(device_batch_size=2, max_seq_len=16, total_batch_size=64, eval_tokens=96)  # A = 64 / 32 = 2


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, nanochat_d2):
    """A nanochat-layout base dir: the fixture's tokenizer and a few tiny shards built from random text."""
    base = tmp_path_factory.mktemp("base")
    shutil.copytree(nanochat_d2 / "tokenizer", base / "tokenizer")
    write_word_shards(base, num_docs=80, max_words=25, chars_per_shard=600, seed=1)
    return base


class Recorder(L.LightningModule):
    """Toy module that records every batch its training_step gets."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return self.weight * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(base_dir, tmp_path, max_steps, ckpt_path=None, callbacks=(), accelerator="cpu", **trainer_kw) -> Recorder:
    module = Recorder()
    trainer = L.Trainer(
        max_steps=max_steps, accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
        default_root_dir=tmp_path, **trainer_kw,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(resuming from a checkpoint|no pre-optimization|val_dataloader).*")
        trainer.fit(module, datamodule=BaseDataModule(str(base_dir), **SMALL), ckpt_path=ckpt_path)
    return module


def test_setup_and_properties(base_dir):
    dm = BaseDataModule(str(base_dir), **SMALL)
    dm.setup("fit")
    assert dm.grad_accum_steps == 2
    assert dm.vocab_size == 4096 and dm.tokenizer.get_bos_token_id() == 4087
    assert dm.token_bytes.dtype == torch.int32 and dm.token_bytes.shape == (4096,)
    val = dm.val_dataloader()
    assert len(val) == 96 // (2 * 16) and val[0][0].shape == val[0][1].shape == (2, 16)
    assert dm.val_dataloader() is val  # built once: every eval scores the same tokens
    assert torch.equal(val[0][0][0, 1:], val[0][1][0, :-1])


def test_setup_errors(base_dir, tmp_path):
    with pytest.raises(NanolitError, match=r"total_batch_size=100 is not a multiple .* use total_batch_size=96"):
        BaseDataModule(str(base_dir), device_batch_size=2, max_seq_len=16, total_batch_size=100).setup()
    empty = tmp_path / "empty"
    with pytest.raises(NanolitError, match="does not exist"):
        BaseDataModule(str(empty), **SMALL).setup()
    empty.mkdir()
    with pytest.raises(NanolitError, match=r"no parquet shards in .*base_data.*nanolit data download -n 2"):
        BaseDataModule(str(empty), **SMALL).setup()
    (empty / "base_data").mkdir()
    shutil.copy(sorted((base_dir / "base_data").iterdir())[0], empty / "base_data")
    with pytest.raises(NanolitError, match="need at least 2"):
        BaseDataModule(str(empty), **SMALL).setup()
    shutil.copy(sorted((base_dir / "base_data").iterdir())[1], empty / "base_data")
    with pytest.raises(NanolitError, match="no tokenizer.pkl"):
        BaseDataModule(str(empty), **SMALL).setup()


def test_loader_has_no_state_dict(base_dir):
    """Lightning saves and restores a loader that has state_dict itself, one prefetched batch ahead: ours has none."""
    dm = BaseDataModule(str(base_dir), **SMALL)
    dm.setup()
    loader = dm.train_dataloader()
    stream = iter(loader)
    assert not hasattr(loader, "state_dict") and not hasattr(stream, "state_dict")
    tokens, state = next(stream)
    assert tokens.shape == (2, 2, 17) and set(state) >= {"pq_idx", "rg_idx"}
    assert dm.state_dict() == {}  # nothing consumed by a training step yet
    dm.teardown("fit")


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_lightning_resume_is_exact(base_dir, tmp_path, accelerator):
    full = _fit(base_dir, tmp_path / "full", 6, accelerator=accelerator, limit_val_batches=0).seen
    assert len(full) == 6 and all(b.shape == (2, 2, 17) and b.device.type == accelerator for b in full)
    assert not any(torch.equal(full[i], full[j]) for i in range(6) for j in range(i))

    # Save at step 3 in the middle of a 5-step run: the loader has already prefetched further by then.
    ckpt_dir = tmp_path / "ckpt"
    _fit(base_dir, tmp_path / "first", 5, accelerator=accelerator,
         callbacks=[ModelCheckpoint(ckpt_dir, every_n_train_steps=3, save_top_k=-1)])
    ckpt = ckpt_dir / "epoch=0-step=3.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert len(saved["BaseDataModule"]["train_loader"]) == 1
    assert saved["loops"]["fit_loop"]["state_dict"].get("combined_loader", []) == []  # Lightning kept no copy

    resumed = _fit(base_dir, tmp_path / "resumed", 6, ckpt_path=ckpt, accelerator=accelerator).seen  # val loop on
    assert len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:]))


@pytest.mark.gpu
@needs_cuda
def test_cuda_transfer_pins_and_does_not_block(base_dir):
    dm = BaseDataModule(str(base_dir), **SMALL)
    x, y = dm.val_dataloader()[0]
    moved = dm.transfer_batch_to_device((x, y), torch.device("cuda", 0), 0)
    assert all(t.device.type == "cuda" for t in moved)
    torch.cuda.synchronize()
    assert torch.equal(moved[0].cpu(), x) and torch.equal(moved[1].cpu(), y)


class RankRecorder(Recorder):
    """Recorder for spawned DDP ranks: each saves the batches it saw to ``<prefix>_<rank>.pt`` at the end."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def on_train_end(self):
        torch.save([b.cpu() for b in self.seen], f"{self.prefix}_{self.global_rank}.pt")


@pytest.mark.slow
def test_ddp_resume_is_exact_on_every_rank(base_dir, tmp_path):
    """Two CPU ranks: the checkpoint holds both ranks' positions (gathered), and each rank resumes exactly."""

    def fit(tag, max_steps, ckpt_path=None, callbacks=()):
        trainer = L.Trainer(
            max_steps=max_steps, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks), default_root_dir=tmp_path / tag, limit_val_batches=0,
        )
        trainer.fit(RankRecorder(str(tmp_path / tag)), datamodule=BaseDataModule(str(base_dir), **SMALL),
                    ckpt_path=ckpt_path)
        return [torch.load(tmp_path / f"{tag}_{rank}.pt") for rank in (0, 1)]

    ckpt_dir = tmp_path / "ckpt"  # checkpointing does not touch the stream, so this run is also the reference
    full = fit("full", 6, callbacks=[ModelCheckpoint(ckpt_dir, every_n_train_steps=3, save_top_k=-1)])
    ckpt = ckpt_dir / "epoch=0-step=3.ckpt"
    states = torch.load(ckpt, weights_only=True)["BaseDataModule"]["train_loader"]
    assert [s["rg_idx"] % 2 for s in states] == [0, 1]
    resumed = fit("resumed", 6, ckpt_path=ckpt)
    for rank in (0, 1):
        assert len(full[rank]) == 6 and len(resumed[rank]) == 3
        assert all(torch.equal(a, b) for a, b in zip(resumed[rank], full[rank][3:]))
    assert not torch.equal(full[0][0], full[1][0])

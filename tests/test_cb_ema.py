"""EMALossLogger: nanochat's debiased EMA of the train loss (nanochat d575940 scripts/base_train.py,
scripts/mid_train.py)."""
from __future__ import annotations

import csv

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from test_cb_toys import ToyModule, make_trainer, toy_pair

from nanolit.callbacks import EMALossLogger
from nanolit.common import NanolitError


def test_update_matches_hand_computation():
    ema = EMALossLogger(beta=0.9)
    # smooth: 0.1*2 = 0.2; 0.9*0.2 + 0.1*1 = 0.28; 0.9*0.28 + 0.1*3 = 0.552
    assert ema.update(2.0, step=0) == pytest.approx(0.2 / (1 - 0.9))
    assert ema.update(1.0, step=1) == pytest.approx(0.28 / (1 - 0.9 ** 2))
    assert ema.update(3.0, step=2) == pytest.approx(0.552 / (1 - 0.9 ** 3))
    assert ema.run_state.smooth_train_loss == pytest.approx(0.552)
    assert ema.run_state.train_loss == pytest.approx(2.0369003690)


def test_debias_offset_reproduces_mid_train_off_by_one():
    base, mid = EMALossLogger(), EMALossLogger(debias_offset=1)
    for step, loss in enumerate([2.0, 1.0, 3.0]):
        base.update(loss, step)
        mid.update(loss, step)
    assert mid.run_state.smooth_train_loss == base.run_state.smooth_train_loss
    assert mid.run_state.train_loss == pytest.approx(0.552 / (1 - 0.9 ** 4))


def _logged(log_dir) -> list[dict]:
    with open(log_dir / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]


def test_logs_debiased_and_raw_loss_each_step(tmp_path):
    module, data = toy_pair()
    ema = EMALossLogger()
    trainer = make_trainer(tmp_path, [ema], max_steps=6)
    trainer.fit(module, datamodule=data)
    rows = _logged(tmp_path / "run" / "version_0")
    assert [int(r["step"]) for r in rows] == list(range(6))
    smooth = 0.0
    for step, row in enumerate(rows):
        smooth = 0.9 * smooth + 0.1 * float(row["train/loss_raw"])
        assert float(row["train/loss"]) == pytest.approx(smooth / (1 - 0.9 ** (step + 1)), rel=1e-6)
    # The raw loss is the last micro-step's loss the module exposed, and it goes down as the bigram learns.
    assert float(rows[-1]["train/loss_raw"]) < float(rows[0]["train/loss_raw"])
    assert ema.run_state.train_loss == pytest.approx(float(rows[-1]["train/loss"]), rel=1e-6)


class NoLastLossModule(ToyModule):
    """A module that only returns ``{"loss": ...}``: the callback falls back to it."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.last_train_loss = None
        self.returned.append(out["loss"].item())
        return out


def test_falls_back_to_the_returned_loss(tmp_path):
    _, data = toy_pair()
    module = NoLastLossModule(data.tokenizer.get_vocab_size())
    module.returned = []
    ema = EMALossLogger()
    make_trainer(tmp_path, [ema], max_steps=3).fit(module, datamodule=data)
    assert ema.run_state.last_train_loss == pytest.approx(module.returned[-1])
    expected = EMALossLogger()
    for step, loss in enumerate(module.returned):
        expected.update(loss, step)
    assert ema.run_state.train_loss == pytest.approx(expected.run_state.train_loss)


def test_state_survives_resume_exactly(tmp_path):
    full_ema = EMALossLogger()
    module, data = toy_pair()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(tmp_path / "full", [full_ema, ckpt], max_steps=8, enable_checkpointing=True)
    trainer.fit(module, datamodule=data)

    resumed_ema = EMALossLogger()
    module, data = toy_pair()
    make_trainer(tmp_path / "resumed", [resumed_ema], max_steps=8).fit(
        module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert resumed_ema.run_state.smooth_train_loss == full_ema.run_state.smooth_train_loss
    assert resumed_ema.run_state.train_loss == full_ema.run_state.train_loss


@pytest.mark.parametrize("kwargs", [{"beta": 1.0}, {"beta": -0.1}, {"beta": "0.9"}, {"debias_offset": -1},
                                    {"debias_offset": 0.5}])
def test_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(NanolitError):
        EMALossLogger(**kwargs)

"""When the evaluation callbacks fire (nanochat d575940 scripts/base_train.py): counted calls on a toy run."""
from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from test_cb_toys import make_trainer, toy_pair

from nanolit.callbacks import BPBValidation, COREEvaluation, Sampler
from nanolit.common import NanolitError


def _spy(callback, calls: list):
    """Replace the callback's evaluation with a recorder of (name, step); the schedule logic stays real."""
    callback.evaluate = lambda trainer, pl_module, step: calls.append((type(callback).__name__, step))
    return callback


def _run(tmp_path, callbacks, max_steps, **fit_kwargs) -> None:
    module, data = toy_pair(num_iterations=max_steps)
    make_trainer(tmp_path, callbacks, max_steps=max_steps, **fit_kwargs).fit(module, datamodule=data)


def _steps(calls, name):
    return [step for who, step in calls if who == name]


@pytest.mark.parametrize("every, max_steps, bpb_steps, other_steps", [
    (3, 7, [0, 3, 6, 7], [3, 6, 7]),  # nanochat: step 0 (val bpb only), every N, and the last step
    (3, 6, [0, 3, 6], [3, 6]),  # the last step is a multiple: evaluated once, not twice
    (10, 4, [0, 4], [4]),  # the interval is never reached: only the start and the end
    (1, 3, [0, 1, 2, 3], [1, 2, 3]),
])
def test_fires_at_nanochat_steps(tmp_path, every, max_steps, bpb_steps, other_steps):
    calls = []
    callbacks = [_spy(BPBValidation(eval_every=every), calls),
                 _spy(COREEvaluation(bundle_dir=str(tmp_path), core_metric_every=every), calls),
                 _spy(Sampler(sample_every=every), calls)]
    callbacks[1].setup = lambda *args, **kwargs: None  # no bundle needed to count calls
    _run(tmp_path, callbacks, max_steps)
    assert _steps(calls, "BPBValidation") == bpb_steps
    assert _steps(calls, "COREEvaluation") == other_steps
    assert _steps(calls, "Sampler") == other_steps
    # nanochat's order within a step: val bpb, then CORE, then sampling (the callback list order).
    assert [who for who, step in calls if step == max_steps] == ["BPBValidation", "COREEvaluation", "Sampler"]


def test_minus_one_disables_everything_including_the_end(tmp_path):
    calls = []
    callbacks = [_spy(BPBValidation(eval_every=-1), calls),
                 _spy(COREEvaluation(bundle_dir=str(tmp_path / "nowhere"), core_metric_every=-1), calls),
                 _spy(Sampler(sample_every=-1), calls)]
    _run(tmp_path, callbacks, 5)
    assert calls == []


def test_resume_does_not_repeat_or_skip_evaluations(tmp_path):
    calls_a, calls_b = [], []
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _run(tmp_path / "a", [_spy(BPBValidation(eval_every=2), calls_a), _spy(Sampler(sample_every=2), calls_a), ckpt],
         7, enable_checkpointing=True)
    module, data = toy_pair(num_iterations=7)
    trainer = make_trainer(tmp_path / "b", [_spy(BPBValidation(eval_every=2), calls_b),
                                            _spy(Sampler(sample_every=2), calls_b)], max_steps=7)
    trainer.fit(module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert _steps(calls_a, "BPBValidation") == [0, 2, 4, 6, 7]
    assert _steps(calls_b, "BPBValidation") == [4, 6, 7]
    assert _steps(calls_b, "Sampler") == [4, 6, 7]


@pytest.mark.parametrize("make", [
    lambda v: BPBValidation(eval_every=v),
    lambda v: COREEvaluation(core_metric_every=v),
    lambda v: Sampler(sample_every=v),
])
@pytest.mark.parametrize("value", ["2000", 2000.0, 0, -5, False])
def test_interval_that_is_not_a_step_count_is_a_user_error(make, value):
    with pytest.raises(NanolitError, match="every"):
        make(value)

"""The Lightning internals nanolit relies on, in one place (nanolit/lightning_adapter.py): pinned to the Lightning
versions they were read against, and each exercised, so that a Lightning upgrade fails here first."""
from __future__ import annotations

from collections import defaultdict

import lightning
import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from test_cb_toys import make_trainer, toy_pair

from nanolit.lightning_adapter import (CHECKED_VERSIONS, StepBoundary, fit_loop_state_at, is_logging_step,
                                       keep_unregistered, lr_names, set_max_steps)


def test_lightning_is_a_checked_version():
    assert lightning.__version__.startswith(CHECKED_VERSIONS), (
        f"Lightning {lightning.__version__} is not among {CHECKED_VERSIONS}: re-read the internals in "
        "nanolit/lightning_adapter.py (and NanoCLI._parse_ckpt_path) against it, then add it")
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))  # NanoCLI wraps it
    assert callable(getattr(RichProgressBar, "_stop_progress", None))  # stop_rich_progress calls it


def test_set_max_steps_moves_the_horizon(tmp_path):
    module, data = toy_pair(num_iterations=8)

    class Shorten(L.Callback):
        def on_train_start(self, trainer, pl_module):
            set_max_steps(trainer, 3)

    trainer = make_trainer(tmp_path, [Shorten()], max_steps=8)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3 and trainer.max_steps == 3


def test_fit_loop_state_at_is_what_a_checkpoint_at_that_step_holds(tmp_path):
    """The layout resume-from-nanochat writes equals what Lightning saves from on_train_batch_end under manual
    optimization (one batch per optimizer step)."""
    from test_module import FixedSteps, make_module, make_steps  # nanolit's manual-optimization module

    saved = {}

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                saved["loop"] = trainer.fit_loop.state_dict()
                saved["expected"] = fit_loop_state_at(trainer, 2)

    make_trainer(tmp_path, [Grab()], max_steps=-1).fit(make_module(num_iterations=3), FixedSteps(make_steps(3)))
    loop, expected = saved["loop"], saved["expected"]
    for key in ("epoch_loop.batch_progress", "epoch_loop.manual_optimization.optim_step_progress"):
        assert loop[key]["total"] == expected[key]["total"], key
    assert loop["epoch_loop.state_dict"]["_batches_that_stepped"] == expected["epoch_loop.state_dict"][
        "_batches_that_stepped"]


def test_lr_names_are_learning_rate_monitors():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    adamw = torch.optim.AdamW([{"params": params[:1], "name": "wte"}, {"params": params[1:2], "name": "lm_head"}])
    sgd = torch.optim.SGD([params[2]], lr=0.1)
    assert lr_names([adamw, sgd]) == [["lr-AdamW/wte", "lr-AdamW/lm_head"], ["lr-SGD"]]
    names, _ = LearningRateMonitor()._find_names_from_optimizers([adamw, sgd], [], defaultdict(int))
    assert lr_names([adamw, sgd]) == names


def test_step_boundary_and_logging_rule(tmp_path):
    module, data = toy_pair(num_iterations=4)
    seen = []

    class Watch(L.Callback):
        def __init__(self):
            self.boundary = StepBoundary()

        def on_train_start(self, trainer, pl_module):
            self.boundary.start(trainer)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(("start", trainer.global_step, self.boundary.batch_starts()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(("end", trainer.global_step, self.boundary.batch_ends(trainer)))

    make_trainer(tmp_path, [Watch()], max_steps=2, accumulate_grad_batches=3).fit(module, datamodule=data)
    firsts = [step for kind, step, flag in seen if kind == "start" and flag]
    ends = [step for kind, step, flag in seen if kind == "end" and flag]
    assert firsts == [0, 1] and ends == [1, 2] and len(seen) == 12  # 6 micro-batches, 2 optimizer steps
    trainer = make_trainer(tmp_path, [], max_steps=1, log_every_n_steps=5)
    assert [is_logging_step(trainer, s) for s in range(10)] == [s in (4, 9) for s in range(10)]


def test_keep_unregistered_stays_out_of_the_state_dict():
    module = torch.nn.Linear(2, 2)
    keep_unregistered(module, "shadow", torch.nn.Linear(2, 2))
    assert set(module.state_dict()) == {"weight", "bias"} and isinstance(module.shadow, torch.nn.Linear)

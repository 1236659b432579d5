"""ReportWriter: nanochat-style report.md at the end of fit (nanochat d575940 scripts/base_train.py,
nanochat/report.py)."""
from __future__ import annotations

import sys

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_cb_core import make_bundle
from test_cb_toys import make_trainer, toy_pair

from nanolit.callbacks import (BPBValidation, COREEvaluation, EMALossLogger, ReportWriter, Sampler,
                               TokenThroughputMonitor)
from nanolit.callbacks.report import ema_debiased, format_value, sparkline


def test_report_has_nanochat_sections_and_text_charts(tmp_path, monkeypatch):
    if _has_matplotlib():
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # force the text-chart path
    # CORE and sampling every 1000 steps in a 4-step run: the final evaluation only.
    callbacks = [EMALossLogger(), BPBValidation(eval_every=2),
                 COREEvaluation(bundle_dir=str(make_bundle(tmp_path / "bundle")), core_metric_every=1000),
                 Sampler(sample_every=1000, prompts=["the cat"], max_tokens=4),
                 TokenThroughputMonitor(peak_flops=1e7), ReportWriter()]
    module, data = toy_pair(num_iterations=4)
    trainer = make_trainer(tmp_path, callbacks, max_steps=4)
    trainer.fit(module, datamodule=data)
    bpb, core, monitor = callbacks[1], callbacks[2], callbacks[4]

    report = (tmp_path / "run" / "version_0" / "report.md").read_text()
    for heading in ["# nanolit report", "## Environment", "## Config", "## Training", "## CORE (step 00004)",
                    "## Samples (step 00004)", "## Charts"]:
        assert heading in report
    gpus = f"- GPUs: {torch.cuda.device_count()} x " if torch.cuda.is_available() else "- GPUs: none"
    for line in ["- PyTorch: ", "- Lightning: ", gpus, "- model.lr: 0.5000", "- trainer.max_steps: 4",
                 f"- Number of parameters: {sum(p.numel() for p in module.parameters())}",
                 f"- Number of FLOPs per token: {module.flops_per_token:e}",
                 "- Calculated number of iterations: 4", "- Number of training tokens: 128",
                 "- DDP world size: 1",
                 f"- Minimum validation bpb: {bpb.run_state.min_val_bpb:.4f}",
                 f"- Final validation bpb: {bpb.run_state.val_bpb:.4f}",
                 f"- CORE metric estimate: {core.run_state.core['core_metric']:.4f}",
                 f"- Total training flops: {monitor.run_state.total_training_flops:e}",
                 "- Total training time: 0.00m", "- Peak host memory (RSS): "]:
        assert line in report
    assert f"- MFU %: {monitor.run_state.mfu:.2f}%" in report
    assert "| toy_mc |" in report and "| CORE | |" in report
    assert "<|bos|>the cat" in report
    assert "Text charts" in report and "train/loss (EMA)" in report and "val/bpb" in report
    # LearningRateMonitor's names for the same series (one optimizer with one named group)
    assert "lr-SGD/bigram " in report and "lr-SGD/bigram-momentum" in report
    assert any(ch in report for ch in "▁▂▃▄▅▆▇█")
    assert not list((tmp_path / "run" / "version_0").glob("*.png"))


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_report_png_plots_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the nanolit[plots] extra) is not installed")
    module, data = toy_pair(num_iterations=3)
    make_trainer(tmp_path, [BPBValidation(eval_every=1), ReportWriter()], max_steps=3).fit(module, datamodule=data)
    run_dir = tmp_path / "run" / "version_0"
    report = (run_dir / "report.md").read_text()
    for png in ["train_loss.png", "val_bpb.png", "lr.png", "momentum.png"]:
        assert f"]({png})" in report
        assert (run_dir / png).read_bytes().startswith(b"\x89PNG")


def test_history_survives_resume(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # text charts, which print the step range
    module, data = toy_pair(num_iterations=6)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    full = ReportWriter()
    make_trainer(tmp_path / "a", [full, ckpt], max_steps=6, enable_checkpointing=True).fit(module, datamodule=data)

    module, data = toy_pair(num_iterations=6)
    resumed = ReportWriter(path=str(tmp_path / "custom" / "my_report.md"))
    make_trainer(tmp_path / "b", [resumed], max_steps=6).fit(module, datamodule=data,
                                                             ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert [s for s, _ in resumed.series["train/loss_raw"]] == list(range(6))
    assert [v for _, v in resumed.series["train/loss_raw"]] == pytest.approx([v for _, v in full.series["train/loss_raw"]])
    assert (tmp_path / "custom" / "my_report.md").exists()
    assert "(steps 0-5)" in (tmp_path / "custom" / "my_report.md").read_text()


def test_formatting_like_nanochat():
    assert format_value(0.81189) == "0.8119"
    assert format_value(21400) == "21,400"
    assert format_value(9999) == "9999"
    assert format_value("3.49e+09") == "3.49e+09"
    assert format_value(True) == "True"


def test_sparkline_and_ema_helpers():
    assert sparkline([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]) == "▁▂▃▄▅▆▇█"
    assert sparkline([2.0, 2.0]) == "▁▁"
    assert len(sparkline([float(i) for i in range(1000)], width=60)) == 60
    assert sparkline([float("nan")]) == ""
    assert ema_debiased([2.0, 1.0, 3.0]) == pytest.approx([2.0, 0.28 / 0.19, 0.552 / 0.271])

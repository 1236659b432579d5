"""Every callback is configurable from YAML/CLI through its typed ``__init__`` (what LightningCLI uses)."""
from __future__ import annotations

from argparse import ArgumentError

import lightning.pytorch as L
import pytest
from jsonargparse import ArgumentParser

from nanolit.callbacks import (BPBValidation, COREEvaluation, EMALossLogger, ReportWriter, Sampler,
                               TokenThroughputMonitor)

CONFIG = """
callbacks:
  - class_path: nanolit.callbacks.EMALossLogger
    init_args: {beta: 0.95, debias_offset: 1}
  - class_path: nanolit.callbacks.BPBValidation
    init_args: {eval_every: 100}
  - class_path: nanolit.callbacks.COREEvaluation
    init_args: {bundle_dir: /data/eval_bundle, core_metric_every: -1, core_metric_max_per_task: 50, tasks: [copa]}
  - class_path: nanolit.callbacks.Sampler
    init_args: {sample_every: 500, prompts: ["Hello"], max_tokens: 8}
  - class_path: nanolit.callbacks.TokenThroughputMonitor
    init_args: {peak_flops: 989e12, warmup_steps: 5}
  - class_path: nanolit.callbacks.ReportWriter
    init_args: {path: runs/report.md}
"""


def _parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[L.Callback])
    return parser


def test_yaml_config_builds_every_callback():
    parser = _parser()
    ema, bpb, core, sampler, monitor, report = parser.instantiate(parser.parse_string(CONFIG)).callbacks
    assert isinstance(ema, EMALossLogger) and (ema.beta, ema.debias_offset) == (0.95, 1)
    assert isinstance(bpb, BPBValidation) and bpb.every == 100
    assert isinstance(core, COREEvaluation) and not core.enabled and core.max_per_task == 50
    assert core.tasks == ["copa"] and str(core.resolve_bundle_dir()) == "/data/eval_bundle"
    assert isinstance(sampler, Sampler) and (sampler.every, sampler.prompts, sampler.max_tokens) == (500, ["Hello"], 8)
    assert isinstance(monitor, TokenThroughputMonitor) and monitor.peak_flops == 989e12
    assert isinstance(report, ReportWriter) and report.path == "runs/report.md"


def test_interval_that_is_not_a_number_is_rejected_by_the_cli():
    parser = _parser()
    bad = CONFIG.replace("{eval_every: 100}", "{eval_every: often}")
    with pytest.raises(ArgumentError, match=r"eval_every[^\n]*\n\s*Expected a <class 'int'>. Got value: often"):
        parser.instantiate(parser.parse_string(bad))

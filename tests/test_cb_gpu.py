"""All callbacks on a CUDA device under bf16-mixed: synchronised timing, the GPU's peak, evals on the device."""
from __future__ import annotations

import copy

import pytest
import torch
from test_cb_core import make_bundle
from test_cb_toys import make_trainer, reference_bpb, toy_pair

from nanolit.callbacks import (BPBValidation, COREEvaluation, EMALossLogger, ReportWriter, Sampler,
                               TokenThroughputMonitor, peak_bf16_flops)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_callbacks_on_cuda_bf16(tmp_path):
    module, data = toy_pair(num_iterations=12)
    initial = copy.deepcopy(module.model)
    monitor, bpb = TokenThroughputMonitor(window_size=2), BPBValidation(eval_every=6)
    core = COREEvaluation(bundle_dir=str(make_bundle(tmp_path / "bundle")), core_metric_every=6)
    sampler = Sampler(sample_every=6, prompts=["the cat"], max_tokens=4)
    trainer = make_trainer(tmp_path, [EMALossLogger(), bpb, core, sampler, monitor, ReportWriter()], max_steps=12,
                           accelerator="cuda", devices=1, precision="bf16-mixed")
    trainer.fit(module, datamodule=data)

    name = torch.cuda.get_device_name()
    peak = peak_bf16_flops(name)
    if peak is not None:
        assert monitor.available_flops == peak
        assert monitor.run_state.mfu is not None and monitor.run_state.mfu > 0
    assert monitor.run_state.tok_per_sec > 0 and monitor.run_state.total_training_time > 0  # step 11 is counted
    assert [s for s, _ in bpb.run_state.val_bpb_history] == [0, 6, 12]
    assert bpb.run_state.val_bpb_history[0][1] == pytest.approx(reference_bpb(initial, data.val_batches, data.token_bytes), rel=1e-3)
    assert core.run_state.core["step"] == 12 and sampler.run_state.samples["samples"][0]["sample"].startswith("<|bos|>the cat")
    report = (tmp_path / "run" / "version_0" / "report.md").read_text()
    assert name in report and "- Peak memory usage: " in report and "- CUDA: " in report

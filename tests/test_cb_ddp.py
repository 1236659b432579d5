"""The callbacks under real DDP (2 CPU processes, gloo): same numbers as one process, rank-zero side effects."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_cb_core import make_bundle
from test_cb_toys import make_trainer, toy_pair

from nanolit.callbacks import BPBValidation, COREEvaluation, EMALossLogger, Sampler

TESTS_DIR = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests_dir!r})
    from test_cb_toys import make_trainer, toy_pair
    from nanolit.callbacks import BPBValidation, COREEvaluation, EMALossLogger, ReportWriter, Sampler

    root, bundle = sys.argv[1], sys.argv[2]
    bpb, core = BPBValidation(eval_every=2), COREEvaluation(bundle_dir=bundle, core_metric_every=2)
    sampler, ema = Sampler(sample_every=2, prompts=["the cat"], max_tokens=4), EMALossLogger()
    module, data = toy_pair(num_iterations=4)
    trainer = make_trainer(root, [ema, bpb, core, sampler, ReportWriter()], max_steps=4,
                           strategy="ddp", devices=2)
    trainer.fit(module, datamodule=data)
    out = {{"world_size": trainer.world_size, "bpb": bpb.run_state.val_bpb_history, "min_val_bpb": bpb.run_state.min_val_bpb,
           "core": core.run_state.core, "samples": (sampler.run_state.samples or {{}}).get("samples", []), "smooth_loss": ema.run_state.train_loss}}
    with open(f"{{root}}/rank{{trainer.global_rank}}.json", "w") as f:
        json.dump(out, f)
""")


@pytest.mark.slow  # Lightning launches a second Python process that imports torch and Lightning: ~30 s here
def test_two_process_ddp_matches_one_process(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(tests_dir=str(TESTS_DIR)))
    # The child imports nanolit the way this process does (editable install or the repo on sys.path).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ddp"), str(bundle)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]

    # The same run on one process: every rank sees the same training batch, so the models are identical and
    # the sharded, all-reduced evaluations must equal the single-process ones.
    bpb, core = BPBValidation(eval_every=2), COREEvaluation(bundle_dir=str(bundle), core_metric_every=2)
    sampler, ema = Sampler(sample_every=2, prompts=["the cat"], max_tokens=4), EMALossLogger()
    module, data = toy_pair(num_iterations=4)
    make_trainer(tmp_path / "single", [ema, bpb, core, sampler], max_steps=4).fit(module, datamodule=data)

    for rank, out in enumerate(ranks):
        assert out["world_size"] == 2
        assert [s for s, _ in out["bpb"]] == [0, 2, 4]
        assert [v for _, v in out["bpb"]] == pytest.approx([v for _, v in bpb.run_state.val_bpb_history], rel=1e-5)
        assert out["core"]["core_metric"] == pytest.approx(core.run_state.core["core_metric"], abs=1e-6)
        assert out["core"]["results"] == pytest.approx(core.run_state.core["results"])
        assert out["smooth_loss"] == pytest.approx(ema.run_state.train_loss, rel=1e-5)
        # Sampling runs on rank zero alone.
        assert out["samples"] == (sampler.run_state.samples["samples"] if rank == 0 else [])
    run_dir = tmp_path / "ddp" / "run" / "version_0"
    assert (run_dir / "report.md").read_text().count("# nanolit report") == 1
    assert "- DDP world size: 2" in (run_dir / "report.md").read_text()
    assert (run_dir / "samples.md").read_text().count("## Step 00002") == 1
    assert proc.stdout.count("Validation bpb") == 3  # printed by rank zero only

"""COREEvaluation: CORE during training (nanochat d575940 scripts/base_train.py, nanochat/core_eval.py) on a fake bundle
in the real layout."""
from __future__ import annotations

import csv
import json

import pytest
from test_cb_toys import make_trainer, toy_pair

from nanolit.callbacks import RunState, COREEvaluation
from nanolit.common import NanolitError
from nanolit.eval.core import evaluate_core

CORE_YAML = """icl_tasks:
-
  label: toy_mc
  dataset_uri: toy/mc.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
-
  label: toy_lm
  dataset_uri: toy/lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""
META_CSV = "Eval Task,Task Category,Random baseline\ntoy_mc,toy,50\ntoy_lm,toy,0\n"
MC = [{"query": "the cat sat on the", "choices": ["mat.", "dog"], "gold": 0},
      {"query": "the dog ate the", "choices": ["cat", "hat."], "gold": 1},
      {"query": "a cat is not a", "choices": ["dog,", "mat"], "gold": 0},
      {"query": "the cat sat", "choices": ["on", "at"], "gold": 0}]
LM = [{"context": "the cat sat on the", "continuation": "mat"},
      {"context": "the dog ate", "continuation": "the hat"},
      {"context": "a cat is not", "continuation": "a dog"}]


def make_bundle(root, mc_lines=None, lm_lines=None):
    """A bundle in nanochat's layout: core.yaml, eval_meta_data.csv, eval_data/<dataset_uri>."""
    (root / "eval_data" / "toy").mkdir(parents=True)
    (root / "core.yaml").write_text(CORE_YAML)
    (root / "eval_meta_data.csv").write_text(META_CSV)
    if mc_lines is None:
        mc_lines = [json.dumps(item) for item in MC]
    if lm_lines is None:
        lm_lines = [json.dumps(item) for item in LM]
    (root / "eval_data" / "toy" / "mc.jsonl").write_text("\n".join(mc_lines) + "\n")
    if lm_lines is not False:
        (root / "eval_data" / "toy" / "lm.jsonl").write_text("\n".join(lm_lines) + "\n")
    return root


def test_logs_core_metric_and_centered_tasks(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "bundle")
    module, data = toy_pair(num_iterations=4)
    core = COREEvaluation(bundle_dir=str(bundle), core_metric_every=2, core_metric_max_per_task=-1)
    trainer = make_trainer(tmp_path, [core], max_steps=4)
    trainer.fit(module, datamodule=data)

    expected = evaluate_core(module.model, data.tokenizer, "cpu", bundle)  # the final model, as at step 4
    assert core.run_state.core["step"] == 4
    assert core.run_state.core["core_metric"] == pytest.approx(expected["core_metric"])
    assert core.run_state.core["centered_results"] == pytest.approx(expected["centered_results"])
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["core/metric"]]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert float(rows[-1]["core/metric"]) == pytest.approx(expected["core_metric"])
    assert float(rows[-1]["core/toy_mc"]) == pytest.approx(expected["centered_results"]["toy_mc"])
    assert float(rows[-1]["core/toy_lm"]) == pytest.approx(expected["centered_results"]["toy_lm"])
    assert f"Step 00004 | CORE metric: {expected['core_metric']:.4f}" in capsys.readouterr().out

    restored = RunState()
    restored.load_state_dict(core.run_state.state_dict())
    assert restored.core == core.run_state.core


def test_max_per_task_and_tasks_are_passed_through(tmp_path, monkeypatch):
    seen = {}

    def fake_evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=-1, tasks=None):
        seen.update(bundle_dir=bundle_dir, max_per_task=max_per_task, tasks=tasks)
        return {"results": {"toy_lm": 0.5}, "centered_results": {"toy_lm": 0.5}, "core_metric": 0.5}

    monkeypatch.setattr("nanolit.callbacks.core.evaluate_core", fake_evaluate_core)
    bundle = make_bundle(tmp_path / "bundle")
    module, data = toy_pair(num_iterations=1)
    core = COREEvaluation(bundle_dir=str(bundle), core_metric_every=5, core_metric_max_per_task=3, tasks=["toy_lm"])
    make_trainer(tmp_path, [core], max_steps=1).fit(module, datamodule=data)
    assert seen == {"bundle_dir": bundle, "max_per_task": 3, "tasks": ["toy_lm"]}


def test_bundle_defaults_to_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOLIT_BASE_DIR", str(tmp_path / "base"))
    assert COREEvaluation().resolve_bundle_dir() == tmp_path / "base" / "eval_bundle"
    assert COREEvaluation(bundle_dir="/x/y").resolve_bundle_dir().as_posix() == "/x/y"


@pytest.mark.parametrize("broken", ["missing_task_file", "malformed_line", "missing_field", "no_bundle"])
def test_broken_bundle_warns_loudly_and_training_continues(tmp_path, broken):
    if broken == "missing_task_file":
        bundle = make_bundle(tmp_path / "bundle", lm_lines=False)
    elif broken == "malformed_line":
        bundle = make_bundle(tmp_path / "bundle", mc_lines=[json.dumps(MC[0]), '{"query": "the cat",'])
    elif broken == "missing_field":
        bundle = make_bundle(tmp_path / "bundle", lm_lines=[json.dumps({"context": "the cat"})])
    else:
        bundle = tmp_path / "no_bundle_here"
    module, data = toy_pair(num_iterations=4)
    core = COREEvaluation(bundle_dir=str(bundle), core_metric_every=2)
    trainer = make_trainer(tmp_path, [core], max_steps=4)
    with pytest.warns(UserWarning, match="CORE evaluation is OFF for this run, training continues"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4
    assert core.run_state.core is None
    assert core.disabled_reason


def test_error_during_evaluation_switches_core_off(tmp_path):
    """A bundle that loads but cannot be scored (fewer examples than few-shot demos) turns CORE off mid-run."""
    bundle = make_bundle(tmp_path / "bundle")
    module, data = toy_pair(num_iterations=4)
    core = COREEvaluation(bundle_dir=str(bundle), core_metric_every=2, core_metric_max_per_task=1)
    trainer = make_trainer(tmp_path, [core], max_steps=4)
    with pytest.warns(UserWarning, match="CORE evaluation is OFF.*few-shot"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4 and core.run_state.core is None


def test_real_bundle_task(tmp_path, eval_bundle):
    module, data = toy_pair(num_iterations=1)
    # every 1000 steps in a 1-step run: only the final evaluation
    core = COREEvaluation(bundle_dir=str(eval_bundle), core_metric_every=1000, core_metric_max_per_task=8,
                          tasks=["copa"])
    make_trainer(tmp_path, [core], max_steps=1).fit(module, datamodule=data)
    assert core.run_state.core["step"] == 1
    assert set(core.run_state.core["centered_results"]) == {"copa"}
    # copa is two-way multiple choice (random baseline 50%): 8 examples give a multiple of 1/8.
    assert core.run_state.core["results"]["copa"] * 8 == pytest.approx(round(core.run_state.core["results"]["copa"] * 8))


@pytest.mark.parametrize("kwargs", [{"core_metric_max_per_task": 0}, {"core_metric_max_per_task": "500"},
                                    {"tasks": "copa"}, {"tasks": [1, 2]}])
def test_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(NanolitError):
        COREEvaluation(**kwargs)

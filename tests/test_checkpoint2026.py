"""nanochat 92d63d4 checkpoints: read (with the fixture's figures), written in that commit's layout, per-rank files."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import same_state

from nanolit.checkpoint import (build_model, detect_architecture, load_model, load_nanochat, load_optimizer_2026,
                                nanochat_meta_2026, read_optimizer_2026, save_nanochat, save_nanochat_checkpoint)
from nanolit.common import NanolitError
from nanolit.data.bestfit import bestfit_val_batches
from nanolit.eval.bpb import evaluate_bpb
from nanolit.model import GPT
from nanolit.model2026 import GPT2026
from nanolit.optim2026 import build_muon_adamw
from nanolit.recipe2026 import Knobs2026, plan_2026
from nanolit.tokenizer import Tokenizer

STEP = 50


@pytest.fixture(scope="module")
def fixture_state(nanochat_2026) -> dict:
    return torch.load(nanochat_2026 / "model_000050.pt", map_location="cpu", weights_only=True)


def batch(expected) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(expected["batch_ids"]).view(2, 257)
    return ids[:, :-1], ids[:, 1:]


def test_fixture_loads_as_the_2026_model(nanochat_2026, expected_2026, fixture_state):
    assert detect_architecture(fixture_state) == "jul2026"
    assert detect_architecture({f"_orig_mod.{k}": v for k, v in fixture_state.items()}) == "jul2026"
    model, meta = load_nanochat(nanochat_2026)
    assert isinstance(model, GPT2026) and not model.training and meta == expected_2026["meta"]
    assert model.window_sizes == [128, 256] and model.compute_dtype == torch.float32
    with torch.no_grad():
        assert model(*batch(expected_2026)).item() == pytest.approx(expected_2026["loss_mean"], abs=1e-5)
    trained, _ = build_model(nanochat_2026, STEP, "cpu", phase="train")
    assert trained.training


def test_fixture_val_bpb_on_best_fit_batches(nanochat_2026, expected_2026):
    model, meta = load_nanochat(nanochat_2026, STEP)
    tokenizer = Tokenizer.from_directory(nanochat_2026 / "tokenizer")
    B, T, eval_tokens = meta["device_batch_size"], meta["max_seq_len"], meta["user_config"]["eval_tokens"]
    batches = bestfit_val_batches([nanochat_2026 / "base_data" / "shard_00004.parquet"], tokenizer, B, T,
                                  eval_tokens)
    bpb = evaluate_bpb(model, batches, eval_tokens // (B * T), tokenizer.token_bytes())
    # The nats are a fp32 running sum of 32 batch sums in nanochat's order; what differs is each token's loss
    # (eager here, compiled there: ~1e-7 relative, averaging out over 32768 tokens) and the sum's rounding,
    # ~sqrt(32) * 2^-24 = 3.4e-7 relative, 8e-7 of a bpb of 2.46.
    assert bpb == pytest.approx(expected_2026["val_bpb_meta"], abs=1e-6)
    assert expected_2026["val_bpb_meta"] == expected_2026["val_bpb_recomputed_eager"]


def test_save_writes_nanochats_layout(nanochat_2026, expected_2026, tmp_path):
    model, meta = load_nanochat(nanochat_2026, STEP)
    optimizer = build_muon_adamw(model)
    saved_optim = torch.load(nanochat_2026 / "optim_000050_rank0.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved_optim)
    save_nanochat(model, tmp_path, STEP, meta, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_000050.json", "model_000050.pt",
                                                          "optim_000050_rank0.pt"]
    assert json.loads((tmp_path / "meta_000050.json").read_text()) == meta
    ours = torch.load(tmp_path / "model_000050.pt", weights_only=True)
    theirs = torch.load(nanochat_2026 / "model_000050.pt", weights_only=True)
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    written = torch.load(tmp_path / "optim_000050_rank0.pt", weights_only=True)
    assert written["param_groups"] == saved_optim["param_groups"]  # nanochat's keys only, no "name"
    assert same_state(written["state"], saved_optim["state"])
    again, _ = load_nanochat(tmp_path)
    fresh = build_muon_adamw(again)
    load_optimizer_2026(tmp_path, STEP, fresh)
    assert fresh.param_groups[0]["name"] == "lm_head" and fresh.state[again.lm_head.weight]["step"] == 50


def test_multi_rank_files_and_merge(nanochat_2026, tmp_path):
    model, meta = load_nanochat(nanochat_2026, STEP)
    optimizer = build_muon_adamw(model)
    optimizer.load_state_dict(torch.load(nanochat_2026 / "optim_000050_rank0.pt", weights_only=True))
    save_nanochat(model, tmp_path, STEP, meta, [optimizer], rank=0, world_size=2)
    save_nanochat(model, tmp_path / "other", STEP, meta, [optimizer], rank=1, world_size=2)  # ranks > 0: nothing
    assert not (tmp_path / "other").exists()
    rank1 = torch.load(tmp_path / "optim_000050_rank1.pt", weights_only=True)
    assert rank1["state"][1]["exp_avg"].shape == (2048, 128)  # wte's rows 2048..4095
    numels = [p.numel() for g in optimizer.param_groups for p in g["params"]]
    merged = read_optimizer_2026(tmp_path, STEP, numels)
    full = optimizer.state_dict()
    assert same_state(merged["state"], full["state"])
    (tmp_path / "optim_000050_rank0.pt").unlink()
    with pytest.raises(NanolitError, match="ranks 0..W-1"):
        read_optimizer_2026(tmp_path, STEP, numels)


def test_meta_has_the_2026_fields(expected_2026):
    plan = plan_2026(Knobs2026(vocab_size=4096, depth=2, max_seq_len=256, device_batch_size=4, total_batch_size=4096,
                               num_iterations=50))
    fixture = expected_2026["meta"]
    others = {k: fixture["user_config"][k] for k in ("run", "device_type", "fp8", "fp8_recipe", "resume_from_step",
                                                     "eval_every", "eval_tokens", "core_metric_every",
                                                     "core_metric_max_per_task", "sample_every", "save_every",
                                                     "model_tag")}
    loader = {"pq_idx": 2, "rg_idx": 1, "epoch": 6, "next": [6, 2, 1, 18], "buffer": []}
    meta = nanochat_meta_2026(plan, 50, fixture["val_bpb"], loader, fixture["loop_state"], others)
    assert list(meta) == list(fixture)
    assert {k: v for k, v in meta.items() if k != "dataloader_state_dict"} == {
        k: v for k, v in fixture.items() if k != "dataloader_state_dict"}
    assert {k: meta["dataloader_state_dict"][k] for k in fixture["dataloader_state_dict"]} == fixture[
        "dataloader_state_dict"]


def test_old_meta_without_window_pattern_is_full_context(nanochat_2026, fixture_state, tmp_path):
    meta = json.loads((nanochat_2026 / "meta_000050.json").read_text())
    del meta["model_config"]["window_pattern"]
    save_nanochat_checkpoint(tmp_path, STEP, fixture_state, None, meta)
    model, _ = build_model(tmp_path, STEP, "cpu")
    assert model.config.window_pattern == "L" and model.window_sizes == [256, 256]


def test_other_2026_key_sets_are_refused(nanochat_2026, fixture_state, tmp_path):
    partial = {k: v for k, v in fixture_state.items() if k != "backout_lambda"}
    assert detect_architecture(partial) == "mar2026"
    meta = json.loads((nanochat_2026 / "meta_000050.json").read_text())
    save_nanochat_checkpoint(tmp_path, STEP, partial, None, meta)
    with pytest.raises(NanolitError, match="July-2026"):
        build_model(tmp_path, STEP, "cpu")
    save_nanochat_checkpoint(tmp_path / "wrong", STEP, fixture_state, None,
                             {**meta, "model_config": {**meta["model_config"], "n_embd": 256}})
    with pytest.raises(NanolitError, match="does not fit its model_config"):
        build_model(tmp_path / "wrong", STEP, "cpu")


def test_d575940_optimizer_files_are_not_read_as_2026(nanochat_2026, tmp_path):
    old_layout = [{"state": {}, "param_groups": []}, {"state": {}, "param_groups": []}]  # [adamw, muon]
    torch.save(old_layout, tmp_path / "optim_000050_rank0.pt")
    with pytest.raises(NanolitError, match="list"):
        read_optimizer_2026(tmp_path, STEP, [])


def test_load_model_finds_either_generation(nanochat_2026, nanochat_d2, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(nanochat_2026 / "tokenizer", base / "tokenizer")
    for name in ("model_000050.pt", "meta_000050.json"):
        (base / "base_checkpoints" / "d2").mkdir(parents=True, exist_ok=True)
        shutil.copy(nanochat_2026 / name, base / "base_checkpoints" / "d2" / name)
        (base / "mid_checkpoints" / "d2").mkdir(parents=True, exist_ok=True)
        shutil.copy(nanochat_d2 / name, base / "mid_checkpoints" / "d2" / name)
    new, tokenizer, _ = load_model("base", base)
    old, _, _ = load_model("mid", base)
    assert isinstance(new, GPT2026) and type(old) is GPT and tokenizer.get_vocab_size() == 4096

"""Checkpoints: nanochat's files load and reproduce nanochat's numbers; saving is atomic and nanochat-shaped."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import tiktoken
import torch

from nanolit.checkpoint import (
    build_model,
    detect_architecture,
    find_largest_model,
    find_last_step,
    load_model,
    load_nanochat_checkpoint,
    save_nanochat_checkpoint,
)
from nanolit.common import NanolitError
from nanolit.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

STEP = 50


@pytest.fixture(scope="module")
def fixture_state(nanochat_d2):
    return torch.load(nanochat_d2 / f"model_{STEP:06d}.pt", weights_only=True)


@pytest.fixture(scope="module")
def fixture_meta(nanochat_d2):
    return json.loads((nanochat_d2 / f"meta_{STEP:06d}.json").read_text())


def _batch(expected_d2):
    ids = torch.tensor(expected_d2["batch_ids"]).view(2, 257)
    return ids[:, :-1], ids[:, 1:]


def _mean_loss(model, expected_d2) -> float:
    x, y = _batch(expected_d2)
    with torch.no_grad():
        return model(x, y).item()


def test_fixture_reproduces_nanochat_numbers(nanochat_d2, expected_d2):
    model, meta = build_model(nanochat_d2, STEP, "cpu")
    assert meta["step"] == STEP and not model.training
    x, y = _batch(expected_d2)
    with torch.no_grad():
        loss_mean = model(x, y)
        loss_sum = model(x, y, loss_reduction="sum")
        logits = model(x)
    assert loss_mean.item() == pytest.approx(expected_d2["loss_mean"], abs=1e-5)
    assert loss_sum.item() == pytest.approx(expected_d2["loss_sum"], rel=1e-5)
    assert logits[0, -1].topk(5).indices.tolist() == expected_d2["logits_top5_row0_last"]


def test_phase_train_and_bad_phase(nanochat_d2):
    model, _ = build_model(nanochat_d2, STEP, "cpu", phase="train")
    assert model.training
    with pytest.raises(NanolitError, match="phase"):
        build_model(nanochat_d2, STEP, "cpu", phase="test")


def _optim_states():
    """Real AdamW state_dicts (tensors, betas tuples, names) as base_train saves them."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([{"params": [w], "name": "wte", "initial_lr": 0.2}], betas=(0.8, 0.95), eps=1e-10)
    w.grad = torch.ones_like(w)
    opt.step()
    return [opt.state_dict(), opt.state_dict()]


def test_save_load_round_trip_matches_nanochat_layout(nanochat_d2, fixture_state, fixture_meta, tmp_path):
    optim = _optim_states()
    save_nanochat_checkpoint(tmp_path, STEP, fixture_state, optim, fixture_meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_000050.json", "model_000050.pt",
                                                          "optim_000050_rank0.pt"]
    # json.dump(meta, indent=2) as nanochat: byte-identical to the meta file nanochat wrote.
    assert (tmp_path / "meta_000050.json").read_bytes() == (nanochat_d2 / "meta_000050.json").read_bytes()
    model_sd, optim_loaded, meta = load_nanochat_checkpoint(tmp_path, STEP, "cpu", load_optimizer=True)
    assert meta == fixture_meta
    assert list(model_sd) == list(fixture_state)
    assert all(torch.equal(model_sd[k], fixture_state[k]) for k in fixture_state)
    assert len(optim_loaded) == 2
    assert optim_loaded[0]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert torch.equal(optim_loaded[1]["state"][0]["exp_avg"], optim[1]["state"][0]["exp_avg"])
    assert load_nanochat_checkpoint(tmp_path, STEP, "cpu")[1] is None


def test_nonzero_rank_writes_only_its_optimizer(tmp_path):
    save_nanochat_checkpoint(tmp_path, 3, {"w": torch.ones(1)}, _optim_states(), {"step": 3}, rank=1)
    assert [p.name for p in tmp_path.iterdir()] == ["optim_000003_rank1.pt"]
    save_nanochat_checkpoint(tmp_path / "noopt", 3, {"w": torch.ones(1)}, None, {"step": 3})
    assert sorted(p.name for p in (tmp_path / "noopt").iterdir()) == ["meta_000003.json", "model_000003.pt"]


def test_missing_file_is_named(tmp_path):
    save_nanochat_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, None, {"step": 1})
    with pytest.raises(NanolitError, match="optim_000001_rank0.pt"):
        load_nanochat_checkpoint(tmp_path, 1, "cpu", load_optimizer=True)
    with pytest.raises(NanolitError, match="model_000002.pt"):
        load_nanochat_checkpoint(tmp_path, 2, "cpu")


def test_failed_save_keeps_previous_files(tmp_path, monkeypatch):
    save_nanochat_checkpoint(tmp_path, 5, {"w": torch.ones(3)}, [{"m": torch.ones(2)}], {"step": 5})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save = torch.save
    calls = []

    def save_then_fail(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the model file is written, the optimizer file fails
            raise OSError("disk full")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    for step in (5, 6):  # overwriting the good step, and adding a new one
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            save_nanochat_checkpoint(tmp_path, step, {"w": torch.zeros(3)}, [{"m": torch.zeros(2)}], {"step": 9})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # same names (no temporaries, no step 6) and same bytes
    assert find_last_step(tmp_path) == 5


def test_detect_architecture(fixture_state):
    assert detect_architecture(fixture_state) == "dec2025"
    assert detect_architecture({f"_orig_mod.{k}": v for k, v in fixture_state.items()}) == "dec2025"
    newer = {**fixture_state, "resid_lambdas": torch.ones(2), "x0_lambdas": torch.zeros(2)}
    assert detect_architecture(newer) == "jan2026"
    newer["value_embeds.1.weight"] = torch.zeros(1)
    assert detect_architecture(newer) == "jan2026-ve"
    newer["smear_lambda"] = torch.zeros(1)
    assert detect_architecture(newer) == "mar2026"
    assert detect_architecture({**fixture_state, "transformer.h.0.ln.weight": torch.ones(1)}) == "unknown"


def test_newer_architecture_is_refused(fixture_state, fixture_meta, tmp_path):
    newer = {**fixture_state, "resid_lambdas": torch.ones(2), "x0_lambdas": torch.zeros(2)}
    save_nanochat_checkpoint(tmp_path, STEP, newer, None, fixture_meta)
    with pytest.raises(NanolitError, match="Dec-2025"):
        build_model(tmp_path, STEP, "cpu")


def test_compiled_bf16_padded_checkpoint_loads(fixture_state, fixture_meta, expected_d2, tmp_path):
    """`_orig_mod.` keys, bf16 wte (a CUDA run) and vocab padded to a multiple of 64 (later nanochat commits) all load
    on CPU."""
    sd = {f"_orig_mod.{k}": v.clone() for k, v in fixture_state.items()}
    sd["_orig_mod.transformer.wte.weight"] = sd["_orig_mod.transformer.wte.weight"].bfloat16()
    save_nanochat_checkpoint(tmp_path / "plain", STEP, sd, None, fixture_meta)
    for key in ("_orig_mod.transformer.wte.weight", "_orig_mod.lm_head.weight"):
        sd[key] = torch.cat([sd[key], torch.randn(64, sd[key].shape[1]).to(sd[key].dtype)])
    save_nanochat_checkpoint(tmp_path / "padded", STEP, sd, None, fixture_meta)
    plain, _ = build_model(tmp_path / "plain", STEP, "cpu")
    padded, _ = build_model(tmp_path / "padded", STEP, "cpu")
    wte = padded.transformer.wte.weight
    assert wte.dtype == torch.float32 and wte.shape[0] == 4096
    assert torch.equal(wte, fixture_state["transformer.wte.weight"].bfloat16().float())
    # The padding rows never reach the logits; bf16 rounding of wte moves the loss only slightly.
    assert _mean_loss(padded, expected_d2) == _mean_loss(plain, expected_d2)
    assert _mean_loss(padded, expected_d2) == pytest.approx(expected_d2["loss_mean"], abs=1e-2)


def test_config_mismatch_is_a_user_error(fixture_state, fixture_meta, tmp_path):
    meta = {**fixture_meta, "model_config": {**fixture_meta["model_config"], "n_layer": 3}}
    save_nanochat_checkpoint(tmp_path, STEP, fixture_state, None, meta)
    with pytest.raises(NanolitError, match="does not fit"):
        build_model(tmp_path, STEP, "cpu")
    meta = {**fixture_meta, "model_config": {**fixture_meta["model_config"], "window_pattern": "SSSL"}}
    save_nanochat_checkpoint(tmp_path, STEP, fixture_state, None, meta)
    with pytest.raises(NanolitError, match="model_config"):
        build_model(tmp_path, STEP, "cpu")


def test_find_largest_model(tmp_path):
    with pytest.raises(NanolitError):
        find_largest_model(tmp_path / "nothing")
    for name in ("zzz", "d4", "d12", "d2"):
        (tmp_path / name).mkdir()
    (tmp_path / "d99.txt").write_text("a file, not a model folder")
    assert find_largest_model(tmp_path) == "d12"
    other = tmp_path / "other"
    for name, mtime in (("old", 1_000), ("new", 3_000), ("mid", 2_000)):
        (other / name).mkdir(parents=True)
        os.utime(other / name, (mtime, mtime))
    assert find_largest_model(other) == "new"


def test_find_last_step(tmp_path):
    with pytest.raises(NanolitError):
        find_last_step(tmp_path)
    for name in ("model_000010.pt", "model_000200.pt", "meta_000300.json", "optim_000400_rank0.pt"):
        (tmp_path / name).write_bytes(b"")
    assert find_last_step(tmp_path) == 200


def _assemble_base(tmp_path, nanochat_d2):
    ckpt = tmp_path / "base_checkpoints" / "d2"
    ckpt.mkdir(parents=True)
    for name in ("model_000050.pt", "meta_000050.json"):
        (ckpt / name).symlink_to(nanochat_d2 / name)
    (tmp_path / "base_checkpoints" / "d1").mkdir()  # smaller tag: never picked
    shutil.copytree(nanochat_d2 / "tokenizer", tmp_path / "tokenizer")
    return tmp_path


def test_load_model_from_base_dir(nanochat_d2, expected_d2, tmp_path):
    base = _assemble_base(tmp_path, nanochat_d2)
    model, tokenizer, meta = load_model("base", base_dir=base)
    assert meta["step"] == STEP and tokenizer.get_bos_token_id() == 4087
    assert _mean_loss(model, expected_d2) == pytest.approx(expected_d2["loss_mean"], abs=1e-5)
    model, _, _ = load_model("base", base_dir=base, phase="train", model_tag="d2", step=STEP)
    assert model.training
    with pytest.raises(NanolitError, match="sft"):
        load_model("chat", base_dir=base)
    with pytest.raises(NanolitError, match="mid_checkpoints"):
        load_model("mid", base_dir=base)


def test_load_model_refuses_other_tokenizer(nanochat_d2, tmp_path):
    base = _assemble_base(tmp_path, nanochat_d2)
    shutil.rmtree(base / "tokenizer")
    # A byte-level tokenizer (256 + 9 tokens) cannot drive a 4096-token model.
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN,
                            mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)})
    Tokenizer(enc).save(base / "tokenizer")
    with pytest.raises(NanolitError, match="265 tokens"):
        load_model("base", base_dir=base)


# ---- public names: load_nanochat / save_nanochat, truncated files, Lightning checkpoints ----------


def test_save_then_load_nanochat_round_trip(nanochat_d2, tmp_path):
    from nanolit.checkpoint import load_nanochat, save_nanochat
    from nanolit.optim import build_optimizers

    model, meta = load_nanochat(nanochat_d2)  # step=None: the largest step in the folder
    assert meta["step"] == 50
    optimizers = build_optimizers(model)
    save_nanochat(model, tmp_path / "d2", 7, {"val_bpb": 1.5}, optimizers)
    assert sorted(p.name for p in (tmp_path / "d2").iterdir()) == \
        ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt"]
    again, meta2 = load_nanochat(tmp_path / "d2")
    assert meta2["step"] == 7 and meta2["model_config"] == meta["model_config"] and meta2["val_bpb"] == 1.5
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_truncated_pt_is_a_clear_error(nanochat_d2, tmp_path):
    from nanolit.checkpoint import load_nanochat

    folder = tmp_path / "d2"
    folder.mkdir()
    (folder / "meta_000050.json").write_bytes((nanochat_d2 / "meta_000050.json").read_bytes())
    (folder / "model_000050.pt").write_bytes((nanochat_d2 / "model_000050.pt").read_bytes()[:100_000])
    with pytest.raises(NanolitError, match="not a torch checkpoint"):
        load_nanochat(folder)


def test_lightning_checkpoint_loads_as_gpt(nanochat_d2, tmp_path):
    from nanolit.checkpoint import load_lightning_checkpoint, load_nanochat

    model, _ = load_nanochat(nanochat_d2)
    ckpt = {"state_dict": {f"gpt.{k}": v for k, v in model.state_dict().items()}, "global_step": 3,
            "hyper_parameters": {"depth": 2, "max_seq_len": 256}}
    torch.save(ckpt, tmp_path / "x.ckpt")
    again, loaded = load_lightning_checkpoint(tmp_path / "x.ckpt")
    assert loaded["global_step"] == 3
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    torch.save({"state_dict": {}}, tmp_path / "empty.ckpt")
    with pytest.raises(NanolitError, match="no nanolit GPT"):
        load_lightning_checkpoint(tmp_path / "empty.ckpt")

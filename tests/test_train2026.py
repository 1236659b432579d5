"""nanochat 92d63d4's base_train run of the 2026 fixture, repeated by a plain-torch loop over nanolit's pieces.

The fixture's flags: depth 2, max_seq_len 256, device_batch_size 4, total_batch_size 4096, 50 iterations, val bpb
every 10 steps on 32768 tokens. This loop is what base_train does (nanolit's Lightning module does it through
``nanolit fit``): the model, the plan, the optimizer, the schedules, the best-fit loaders and the bpb evaluation.

Tolerances. Step 0 only depends on the init and the first forward: the logged loss is printed to 6 decimals (+-5e-7)
and a fp32 mean of 1024 token losses of ~8.3 carries ~1e-6 of summation-order difference. Later steps also carry
the difference between eager and compiled arithmetic: nanochat compiled the model and both optimizer step
functions, so inductor fused elementwise chains (no intermediate rounding) and reordered reductions; each step then
differs by O(fp32 eps = 6e-8) relative in ~100 rounded operations per value, and every later loss carries all
earlier updates, so after 50 steps a linear accumulation bounds the relative difference by 50 * 100 * 6e-8 = 3e-4.
The LR multiplier is printed to 2 decimals (+-0.005) and computed exactly.
"""
from __future__ import annotations

import pytest
import torch

from nanolit.data.bestfit import BestFitTokenStream, bestfit_val_batches
from nanolit.data.shards import train_val_split
from nanolit.eval.bpb import evaluate_bpb
from nanolit.model2026 import build_gpt2026
from nanolit.optim2026 import build_muon_adamw
from nanolit.recipe2026 import Knobs2026, plan_2026
from nanolit.schedules import lr_multiplier_2026, muon_momentum_2026, muon_weight_decay_2026
from nanolit.tokenizer import Tokenizer

ACCUMULATED = 3e-4  # relative: 50 steps x ~100 ops x fp32 eps (see the module docstring)
EMA_BETA = 0.9  # base_train's smoothing of the printed training loss


def run_fixture_recipe(fixture) -> dict:
    tokenizer = Tokenizer.from_directory(fixture / "tokenizer")
    train, val = train_val_split(sorted((fixture / "base_data").glob("*.parquet")))
    plan = plan_2026(Knobs2026(vocab_size=tokenizer.get_vocab_size(), depth=2, max_seq_len=256, device_batch_size=4,
                               total_batch_size=4096, num_iterations=50))
    model = build_gpt2026(plan.model_config, "cpu")  # nanochat seeds 42 right before its init
    optimizer = build_muon_adamw(model, **plan.optimizer_kwargs())
    val_batches = bestfit_val_batches(val, tokenizer, 4, 256, 32768)
    stream = BestFitTokenStream(train, tokenizer, 4, 256, plan.grad_accum_steps)
    N, A = plan.num_iterations, plan.grad_accum_steps
    out = {"bpb": {}, "loss": {}, "lrm": {}, "first_loss": None}
    smooth = 0.0
    for step in range(N + 1):
        if step % 10 == 0 or step == N:
            model.eval()
            out["bpb"][step] = evaluate_bpb(model, val_batches, 32768 // (4 * 256), tokenizer.token_bytes())
            model.train()
        if step == N:
            break
        tokens, out["loader_state"] = next(stream)
        for a in range(A):
            loss = model(tokens[a, :, :-1], tokens[a, :, 1:])
            train_loss = loss.detach()
            (loss / A).backward()
        lrm = lr_multiplier_2026(step, N)
        momentum, wd = muon_momentum_2026(step, N), muon_weight_decay_2026(step, N, plan.weight_decay)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = momentum, wd
        optimizer.step()
        model.zero_grad(set_to_none=True)
        smooth = EMA_BETA * smooth + (1 - EMA_BETA) * train_loss.item()
        out["loss"][step] = smooth / (1 - EMA_BETA ** (step + 1))
        out["lrm"][step] = lrm
    stream.close()
    out.update(model=model.eval(), optimizer=optimizer, smooth=smooth)
    return out


@pytest.mark.slow
def test_base_train_of_the_fixture_is_reproduced(nanochat_2026, expected_2026):
    run = run_fixture_recipe(nanochat_2026)
    assert run["loss"][0] == pytest.approx(expected_2026["train_loss_step0"], abs=1.5e-6)
    for step, logged in expected_2026["train_loss_logged"].items():
        assert run["loss"][int(step)] == pytest.approx(logged, rel=ACCUMULATED, abs=5e-7), step
    for step, logged in expected_2026["lrm_logged"].items():
        assert abs(run["lrm"][int(step)] - logged) <= 0.005 + 1e-12, step
    for step, bpb in expected_2026["val_bpb_curve"].items():
        assert run["bpb"][int(step)] == pytest.approx(bpb, rel=1e-3), step  # well inside: ACCUMULATED
        assert run["bpb"][int(step)] == pytest.approx(bpb, rel=ACCUMULATED, abs=5e-7), step

    meta = expected_2026["meta"]
    assert {k: run["loader_state"][k] for k in meta["dataloader_state_dict"]} == meta["dataloader_state_dict"]
    assert run["smooth"] == pytest.approx(meta["loop_state"]["smooth_train_loss"], rel=ACCUMULATED)
    # the step-50 weights: nanochat's loss on batch_ids, and its optimizer's last hyperparameters (plain Python floats)
    ids = torch.tensor(expected_2026["batch_ids"]).view(2, 257)
    with torch.no_grad():
        assert run["model"](ids[:, :-1], ids[:, 1:]).item() == pytest.approx(expected_2026["loss_mean"],
                                                                             rel=ACCUMULATED)
    saved = torch.load(nanochat_2026 / "optim_000050_rank0.pt", map_location="cpu", weights_only=True)
    ours = run["optimizer"].state_dict()
    keys = ("kind", "lr", "betas", "eps", "weight_decay", "initial_lr", "momentum", "ns_steps", "beta2", "params")
    assert [{k: g[k] for k in keys if k in g} for g in ours["param_groups"]] == saved["param_groups"]
    assert all(s["step"] == 50 for s in ours["state"].values() if "step" in s)

"""SFTModule on SFTDataModule: the batches the model trains on, chat_sft's horizon and LR, its val loss, the model it
starts from, exact resume through the CLI, and bad input in one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from conftest import write_task_data

from nanolit.callbacks import ReportWriter, RunState, ValidationLoss
from nanolit.checkpoint import load_nanochat, save_nanochat
from nanolit.cli import main
from nanolit.common import NanolitError
from nanolit.data.chat import render_conversation
from nanolit.data.sft import build_sft_mixture, build_sft_val, sft_batches
from nanolit.data.sft_datamodule import SFTDataModule
from nanolit.model import GPTConfig, build_gpt
from nanolit.optim import build_optimizers
from nanolit.schedules import sft_lr_multiplier
from nanolit.sft import SFTModule

ROOT = Path(__file__).resolve().parents[1]
B, A, T = 2, 2, 96  # conversations per micro-batch, micro-batches per step, tokens a conversation is cut at
KNOBS = {"device_batch_size": B, "target_examples_per_step": A * B, "max_seq_len": T}
# write_task_data's mixture: ARC-Easy 3, ARC-Challenge 2, GSM8K 3, SmolTalk 6, identity 2, spelling 300 + 300
MIXTURE_SIZE = 616


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Every task file is local: a missing one must fail, never reach for the Hugging Face hub."""
    monkeypatch.setitem(sys.modules, "datasets", None)


def save_model(folder: Path, step: int, vocab: int, depth: int = 1, seed: int = 0) -> Path:
    """A nanochat-format checkpoint of a random model (sequence_len 64) written by nanolit's writer."""
    save_nanochat(build_gpt(GPTConfig.from_depth(depth, vocab, 64), "cpu", seed=seed), folder, step,
                  {"val_bpb": 1.0, "user_config": {}})
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory, byte_tokenizer) -> Path:
    """Tokenizer, every SFT task file in its real schema, and a mid-trained d1 (step 5) to fine-tune."""
    root = write_task_data(tmp_path_factory.mktemp("sft_base"))
    byte_tokenizer.save(root / "tokenizer")
    save_model(root / "mid_checkpoints" / "d1", 5, byte_tokenizer.get_vocab_size())
    return root


def gpt_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(base: Path, tmp_path: Path, callbacks=(), eval_steps: int = 2, **module_kwargs):
    """SFTModule on SFTDataModule with a plain Trainer (the shared knobs passed to both, as the CLI links them)."""
    knobs = {**KNOBS, "export": False, **module_kwargs}
    module = SFTModule(**knobs)
    datamodule = SFTDataModule(str(base), eval_steps=eval_steps, **{k: knobs[k] for k in KNOBS})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=list(callbacks), default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


class Spy(L.Callback):
    """Every (x, y) the training model is called with, the LRs and Muon momentum of each step, and the start weights."""

    def __init__(self):
        self.calls, self.steps, self.start = [], [], None

    def on_train_start(self, trainer, pl_module):
        self.start = gpt_state(pl_module.gpt)
        model = pl_module.train_model

        def recording(x, y, **kwargs):
            self.calls.append((x.clone(), y.clone()))
            return model(x, y, **kwargs)

        pl_module.__dict__["train_model"] = recording

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        adamw, muon = trainer.optimizers
        groups = adamw.param_groups + muon.param_groups
        self.steps.append({"lr": [g["lr"] for g in groups], "initial_lr": [g["initial_lr"] for g in groups],
                           "momentum": [g["momentum"] for g in muon.param_groups]})


def test_batches_reach_the_model_padded_per_micro_batch_with_only_the_assistant_as_target(base, tmp_path,
                                                                                         byte_tokenizer):
    spy = Spy()
    fit(base, tmp_path, [spy], num_iterations=3)
    assert len(spy.calls) == 2 * A  # two steps trained, A micro-batches each
    mixture = build_sft_mixture(base)
    pad = byte_tokenizer.encode_special("<|assistant_end|>")
    for m, (x, y) in enumerate(spy.calls):
        rows = [render_conversation(byte_tokenizer, mixture[m * B + i], T) for i in range(B)]  # rank 0: 0, 1, 2...
        assert x.shape == y.shape == (B, max(len(ids) for ids, _ in rows) - 1)  # padded to this micro-batch only
        for i, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            assert x[i, :n].tolist() == ids[:-1] and (x[i, n:] == pad).all()
            assert y[i, :n].tolist() == [t if keep else -1 for t, keep in zip(ids[1:], mask[1:])]
            assert (y[i, n:] == -1).all()
            assert 0 < (y[i] >= 0).sum() < n  # the assistant's tokens are targets, the user's are not
    assert any(x.shape[1] != spy.calls[0][0].shape[1] for x, _ in spy.calls)  # widths differ between micro-batches


def test_lr_is_chat_sfts_linear_decay_and_the_last_iteration_is_not_trained(base, tmp_path, byte_tokenizer):
    spy = Spy()
    module, trainer = fit(base, tmp_path, [spy], num_iterations=6, init_lr_frac=0.5)
    assert trainer.global_step == len(spy.steps) == module.num_iterations == 5  # chat_sft: range(6), last not trained
    for step, s in enumerate(spy.steps):
        # the multiplier is applied as initial_lr * (1 - step/6): the same float product, so exact
        assert s["lr"] == [lr * (1 - step / 6) for lr in s["initial_lr"]]
        assert s["momentum"] == [0.95, 0.95]  # no momentum ramp in chat_sft
    assert sft_lr_multiplier(4, 6) == pytest.approx(2 / 6, abs=1e-15)  # the last trained step's
    fresh = build_optimizers(build_gpt(GPTConfig.from_depth(1, byte_tokenizer.get_vocab_size(), 64), "cpu"))
    assert spy.steps[0]["initial_lr"] == pytest.approx([0.5 * g["lr"] for o in fresh for g in o.param_groups])
    mid, _ = load_nanochat(base / "mid_checkpoints" / "d1")
    assert spy.start.keys() == mid.state_dict().keys()
    assert all(torch.equal(spy.start[k], v) for k, v in mid.state_dict().items())  # fine-tunes the mid model
    assert module.stage.init_source.endswith("mid_checkpoints/d1/model_000005.pt")


class StopAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        trainer.should_stop = True


def test_horizon_from_epochs_and_the_plan_names_the_model_and_its_exporter(base, tmp_path, byte_tokenizer):
    folder = tmp_path / "mid_export"
    save_nanochat(build_gpt(GPTConfig.from_depth(1, byte_tokenizer.get_vocab_size(), 64), "cpu"), folder, 9,
                  {"user_config": {}, "nanolit_run": "/runs/mid"})
    module, trainer = fit(base, tmp_path, [StopAtStart()], num_epochs=3, target_examples_per_step=8,
                          init_from=str(folder))
    iterations = MIXTURE_SIZE // 8 * 3  # chat_sft: (len(train_ds) // target_examples_per_step) * num_epochs
    assert module.stage.iterations == iterations and trainer.max_steps == module.num_iterations == iterations - 1
    assert module.grad_accum_steps == 8 // B
    plan = module.training_plan()
    assert plan["model to fine-tune"].startswith(f"{folder / 'model_000009.pt'} (step 9, exported by the run in "
                                                 "/runs/mid, saved ")
    assert plan["horizon"].startswith(f"{iterations - 1} steps: num_iterations={iterations} (num_epochs=3 x (616 ")
    assert plan["batch"].startswith(f"{B} conversations per device x 4 accumulation x 1 device = 8 conversations")
    assert plan["export"] == "off"


def test_val_loss_is_the_mean_of_batch_means(base, tmp_path, byte_tokenizer):
    """chat_sft's val loss: each batch's mean loss over its supervised tokens (the model's mean reduction), averaged."""
    val_loss, report = ValidationLoss(eval_every=100), ReportWriter(str(tmp_path / "report.md"))
    module, _ = fit(base, tmp_path, [RunState(), val_loss, report], eval_steps=2, num_iterations=2)
    stream = sft_batches(build_sft_val(base), byte_tokenizer, B, max_tokens=T)
    batches = [next(stream) for _ in range(2)]
    with torch.no_grad():
        means = [module.gpt.eval()(x, y) for x, y in batches]  # F.cross_entropy's mean, ignore_index=-1
    expected = float(torch.stack(means).mean())
    tokens = sum(int((y >= 0).sum()) for _, y in batches)
    # the callback sums per-token losses in fp32 then divides, F.cross_entropy reduces its own way: each of the
    # `tokens` additions may round by 2**-24 relative, so the two means agree to tokens * 2**-24
    assert val_loss.run_state.val_loss == pytest.approx(expected, rel=tokens * 2 ** -24)
    assert val_loss.run_state.val_loss > 0
    assert f"- Final validation loss: {val_loss.run_state.val_loss:.4f}" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------------------------------- the CLI run


class StopAt(L.Callback):
    """Stop the run after optimizer step ``step`` (the checkpoint callback saves it on the way out)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def cli(base: Path, root: Path, *extra: str) -> None:
    main(["fit", "-c", str(ROOT / "configs/sft.yaml"), f"--data.base_dir={base}", f"--trainer.default_root_dir={root}",
          "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
          f"--model.device_batch_size={B}", f"--model.target_examples_per_step={A * B}", f"--model.max_seq_len={T}",
          "--data.eval_steps=2", "--val_loss.eval_every=2", "--chat_eval.eval_metrics_every=-1", *extra])


def same(a, b) -> bool:
    """Bitwise equality of nested checkpoint content."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_stopped_run_resumed_with_ckpt_path_last_ends_bitwise_equal(base, tmp_path):
    common = ["--model.num_iterations=7", "--model.export=false", "--checkpoint.save_every=2"]
    cli(base, tmp_path / "full", *common)
    stop = tmp_path / "stop.json"  # JSON is YAML: a second config adds the stopping callback
    stop.write_text(json.dumps({"trainer": {"callbacks": [{"class_path": "test_sft_train.StopAt",
                                                           "init_args": {"step": 3}}]}}))
    cli(base, tmp_path / "resumed", *common, "-c", str(stop))
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3  # stopped between saves
    cli(base, tmp_path / "resumed", *common, "--ckpt_path", "last")
    want, got = (torch.load(root / "checkpoints" / "step=000006.ckpt", weights_only=True)
                 for root in (tmp_path / "full", tmp_path / "resumed"))
    assert got["global_step"] == want["global_step"] == 6
    for key in ("state_dict", "optimizer_states", "SFTDataModule"):
        assert same(want[key], got[key]), key
    assert want["SFTDataModule"] == {"train_loader": [{"examples": 6 * A * B}]}
    assert got["callbacks"]["RunState"]["val_loss"] == want["callbacks"]["RunState"]["val_loss"]


def one_line_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanolit: error: ") and "\n" not in err
    return err


def test_bad_input_in_one_line(base, tmp_path, capsys, byte_tokenizer):
    sft = ["fit", "-c", str(ROOT / "configs/sft.yaml"), f"--trainer.default_root_dir={tmp_path / 'run'}",
           "--trainer.accelerator=cpu"]
    empty = write_task_data(tmp_path / "no_mid")
    byte_tokenizer.save(empty / "tokenizer")
    err = one_line_error(capsys, *sft, f"--data.base_dir={empty}")
    assert f"no mid model in {empty / 'mid_checkpoints'} to fine-tune; mid-train one first" in err
    assert "--model.source=base" in err
    err = one_line_error(capsys, *sft, f"--data.base_dir={empty}", "--model.source=base")
    assert f"no base model in {empty / 'base_checkpoints'}" in err and "--model.init_from" in err
    V = byte_tokenizer.get_vocab_size()
    other = save_model(tmp_path / "other_vocab", 4, V + 7)
    err = one_line_error(capsys, *sft, f"--data.base_dir={base}", f"--model.init_from={other}")
    assert f"{other / 'model_000004.pt'} has a {V + 7}-token vocab but the tokenizer in {base / 'tokenizer'} has " \
           f"{V}; fine-tune with the tokenizer" in err
    err = one_line_error(capsys, *sft, f"--data.base_dir={base}", "--model.device_batch_size=3")
    assert "target_examples_per_step=32 is not a multiple of device_batch_size*world_size = 3*1" in err
    err = one_line_error(capsys, *sft, f"--data.base_dir={base}", "--model.source=rl")
    assert "source must be one of base, mid" in err
    (tmp_path / "no_data" / "tokenizer").mkdir(parents=True)
    byte_tokenizer.save(tmp_path / "no_data" / "tokenizer")
    err = one_line_error(capsys, *sft, f"--data.base_dir={tmp_path / 'no_data'}")
    assert err.startswith("nanolit: error: SFT data is missing: ") and "words_alpha.txt not found" in err
    with pytest.raises(NanolitError, match="num_iterations must be a positive number of steps, or -1"):
        SFTModule(num_iterations=0)
    with pytest.raises(NanolitError, match="trains nothing"):
        fit(base, tmp_path, num_iterations=1)


def test_sft_does_not_import_the_callbacks():
    """(The other way, tests/test_layers.py: the callbacks never import nanolit.model, which nanolit.sft does.)"""
    from test_layers import probe

    loaded = probe(["nanolit.data.sft_datamodule", "nanolit.sft"], ("nanolit.",))
    assert "nanolit.midtrain" in loaded["nanolit.sft"]  # the import really happened
    assert {name: [m for m in found if m.startswith("nanolit.callbacks")] for name, found in loaded.items()} == {
        "nanolit.data.sft_datamodule": [], "nanolit.sft": []}

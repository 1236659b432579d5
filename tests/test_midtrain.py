"""MidModule (nanochat d575940 scripts/mid_train.py): base-model loading, the progress-based LR, the epoch end, exports,
masks and dtype checks."""
from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
from conftest import checkpoint_names
import tiktoken
import torch
from test_mid_data import make_base

from nanolit.checkpoint import load_lightning_checkpoint, load_nanochat, save_nanochat
from nanolit.cli import main
from nanolit.common import NanolitError
from nanolit.data import tasks
from nanolit.data.mid import MidDataModule, inputs_and_targets, mid_train_steps
from nanolit.midtrain import MidModule
from nanolit.model import GPTConfig, build_gpt
from nanolit.module import GPTModule
from nanolit.optim import build_optimizers
from nanolit.schedules import mid_lr_multiplier, muon_momentum
from nanolit.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
B, T = 2, 64
V = 256 + len(SPECIAL_TOKENS)  # the byte tokenizer below
TINY = [f"--model.max_seq_len={T}", f"--model.device_batch_size={B}", f"--model.total_batch_size={B * T}",
        "--model.compile=false", f"--data.eval_tokens={B * T}", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.enable_progress_bar=false"]


def byte_tokenizer() -> Tokenizer:
    """Ids 0-255 are bytes, then nanochat's specials: no training, and conversations stay short."""
    enc = tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)})
    return Tokenizer(enc)


@pytest.fixture(autouse=True)
def small_spelling_tasks(monkeypatch):
    """The real mixture with 8 SimpleSpelling and 4 SpellingBee examples (not 280,000), so an epoch is 16 steps."""
    monkeypatch.setattr(tasks.SimpleSpelling, "num_examples", lambda self: 8)
    monkeypatch.setattr(tasks.SpellingBee, "num_examples", lambda self: 4)


def save_base(base: Path, tag: str, depth: int, step: int, vocab: int = V, seed: int = 0) -> Path:
    """A nanochat-format base checkpoint (sequence_len 32, unlike mid's T) made with nanolit's writer."""
    model = build_gpt(GPTConfig.from_depth(depth, vocab, 32), "cpu", seed=seed)
    folder = base / "base_checkpoints" / tag
    save_nanochat(model, folder, step, {"val_bpb": 1.0, "user_config": {}, "device_batch_size": B})
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tokenizer + every mid source (test_mid_data's fixture files) + base models d1 (step 9) and d2 (steps 3, 7)."""
    root = make_base(tmp_path_factory.mktemp("mid"), byte_tokenizer())
    save_base(root, "d1", 1, 9)
    save_base(root, "d2", 2, 3, seed=3)
    save_base(root, "d2", 2, 7, seed=7)
    return root


def epoch_steps(base: Path, A: int = 1, rank: int = 0, world_size: int = 1) -> int:
    """How many steps one epoch of the train mixture has: the stream's steps before its first last_step."""
    mixture = tasks.build_mid_mixture(base, "train")
    stream = mid_train_steps(mixture, byte_tokenizer(), B, T, A, rank, world_size)
    return sum(1 for _ in itertools.takewhile(lambda item: not item[1]["last_step"], stream))


def gpt_state(path_or_model) -> dict:
    model = path_or_model if isinstance(path_or_model, torch.nn.Module) else load_nanochat(path_or_model)[0]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder(L.Callback):
    """Per trained step: every group's lr and initial_lr, Muon's momentum and the DataModule's progress."""

    def __init__(self):
        self.steps = []
        self.start_weights = None

    def on_train_start(self, trainer, pl_module):
        self.start_weights = gpt_state(pl_module.gpt)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        adamw, muon = trainer.optimizers
        groups = adamw.param_groups + muon.param_groups
        self.steps.append({"lr": [g["lr"] for g in groups], "initial_lr": [g["initial_lr"] for g in groups],
                           "momentum": muon.param_groups[0]["momentum"], "progress": trainer.datamodule.progress})


def fit(base: Path, tmp_path: Path, callbacks=(), precision="32-true", data=None, **module_kwargs):
    """MidModule on MidDataModule with a plain Trainer (the batch knobs passed to both, as the CLI links them)."""
    knobs = {"max_seq_len": T, "device_batch_size": B, "total_batch_size": B * T, "compile": False, "dry_run": True,
             **module_kwargs}
    module = MidModule(**knobs)
    batch_math = {k: knobs[k] for k in ("max_seq_len", "device_batch_size", "total_batch_size")}
    datamodule = MidDataModule(base_dir=str(base), eval_tokens=B * T, **batch_math, **(data or {}))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks),
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


# ------------------------------------------------------------------------------------------- schedule, horizon


def test_lr_follows_epoch_progress_and_the_epoch_ends_the_run(base, tmp_path):
    rec = Recorder()
    module, trainer = fit(base, tmp_path, [rec], total_batch_size=2 * B * T, init_lr_frac=0.5)
    n = epoch_steps(base, A=2)
    assert trainer.global_step == len(rec.steps) == n >= 5  # every trained step, and not the flagged one
    assert module.num_iterations == n and trainer.max_steps == n
    progress = [s["progress"] for s in rec.steps]
    assert progress == sorted(progress) and progress[0] < 0.8 <= progress[-1]  # both parts of the schedule
    for step, s in enumerate(rec.steps):
        assert s["lr"] == pytest.approx([lr * mid_lr_multiplier(s["progress"]) for lr in s["initial_lr"]], abs=0)
        assert s["momentum"] == muon_momentum(step)
    # fresh optimizers from the same builder, every LR scaled by init_lr_frac; weights from the last base step (d2/7)
    fresh = build_optimizers(build_gpt(GPTConfig.from_depth(2, V, T), "cpu"))
    assert rec.steps[0]["initial_lr"] == pytest.approx([0.5 * g["lr"] for o in fresh for g in o.param_groups])
    assert same_weights(rec.start_weights, gpt_state(base / "base_checkpoints" / "d2"))
    assert module.stage.init_source.endswith("d2/model_000007.pt")


def test_num_iterations_stops_early(base, tmp_path):
    rec = Recorder()
    module, trainer = fit(base, tmp_path, [rec], data={"num_iterations": 4})
    # nanochat flags last_step when its loader yields step N, so N - 1 steps train (nanochat d575940
    # scripts/mid_train.py)
    assert trainer.global_step == len(rec.steps) == module.num_iterations == 3
    assert [s["progress"] for s in rec.steps] == pytest.approx([2 / 4, 3 / 4, 4 / 4])  # it / N after the look-ahead


# ------------------------------------------------------------------------------------------- the CLI run


def metrics(root: Path) -> list[dict]:
    with open(next(root.glob("logs/version_*/metrics.csv"))) as f:
        return list(csv.DictReader(f))


def test_cli_mid_run_exports_nanochat_files(base, tmp_path):
    root = tmp_path / "run"
    main(["fit", "-c", str(ROOT / "configs/mid.yaml"), f"--data.base_dir={base}",
          f"--trainer.default_root_dir={root}", "--trainer.log_every_n_steps=1", *TINY])
    n = epoch_steps(base)
    # base model: the largest depth (d2, not d1) at its last step; output folder named by depth
    export = base / "mid_checkpoints" / "d2"
    assert sorted(p.name for p in export.iterdir()) == \
        [f"meta_{n:06d}.json", f"model_{n:06d}.pt", f"optim_{n:06d}_rank0.pt"]
    meta = json.loads((export / f"meta_{n:06d}.json").read_text())
    # mid_train's keys, plus the run that exported it (so a later run can tell whose export it finds)
    assert set(meta) == {"step", "val_bpb", "model_config", "user_config", "nanolit_run"} and meta["step"] == n
    assert meta["model_config"] == GPTConfig.from_depth(2, V, T).to_dict()  # sequence_len is mid's T, not 32
    assert meta["user_config"]["matrix_lr"] == 0.02 and meta["user_config"]["base_dir"] == str(base)
    assert len(torch.load(export / f"optim_{n:06d}_rank0.pt", weights_only=True)) == 2  # [adamw, muon]
    # the Lightning checkpoint of the last step holds the same weights, and loads like a base .ckpt
    assert checkpoint_names(root / "checkpoints") == ["last.ckpt", f"step={n:06d}.ckpt"]
    ckpt_model, ckpt = load_lightning_checkpoint(root / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == n
    exported = gpt_state(export)
    assert same_weights(exported, gpt_state(ckpt_model))
    assert not same_weights(exported, gpt_state(base / "base_checkpoints" / "d2"))
    rows = metrics(root)
    bpb = [(int(r["step"]), float(r["val/bpb"])) for r in rows if r.get("val/bpb")]
    assert [s for s, _ in bpb] == [0, n] and meta["val_bpb"] == pytest.approx(bpb[-1][1])
    # mid's EMA debias is one step later than base's (nanochat d575940 scripts/mid_train.py): the first smoothed loss is
    # l0/1.9
    first = next(r for r in rows if r.get("train/loss"))
    assert float(first["train/loss"]) == pytest.approx(float(first["train/loss_raw"]) * 0.1 / (1 - 0.9 ** 2))


def test_dry_run_writes_no_export_and_a_resumed_run_ends_identically(base, tmp_path):
    folder = save_base(tmp_path, "mine", 1, 5)
    common = ["fit", "-c", str(ROOT / "configs/mid.yaml"), f"--data.base_dir={base}", f"--model.init_from={folder}",
              "--model.dry_run=true", "--data.num_iterations=5", "--checkpoint.save_every=2", *TINY]
    main([*common, f"--trainer.default_root_dir={tmp_path / 'full'}"])
    assert not (base / "mid_checkpoints" / "d1").exists()
    full = tmp_path / "full" / "checkpoints"
    assert checkpoint_names(full) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
    # --ckpt_path with a file: LightningCLI re-reads the module's hyperparameters from it (depth included)
    main([*common, f"--trainer.default_root_dir={tmp_path / 'resumed'}", f"--ckpt_path={full / 'step=000002.ckpt'}"])
    resumed = tmp_path / "resumed" / "checkpoints"
    want, got = (load_lightning_checkpoint(p / "step=000004.ckpt") for p in (full, resumed))
    assert got[1]["global_step"] == 4 and same_weights(gpt_state(want[0]), gpt_state(got[0]))


# ------------------------------------------------------------------------------------------- base checkpoints


class FixedSteps(L.LightningDataModule):
    def __init__(self, steps):
        super().__init__()
        self.steps, self.vocab_size = steps, V

    def train_dataloader(self):
        return iter(self.steps)


def test_init_from_a_nanolit_ckpt(base, tmp_path):
    """A base run's Lightning .ckpt (one step of GPTModule), its optimizer state left behind."""
    gpt_module = GPTModule(depth=2, max_seq_len=16, device_batch_size=B, total_batch_size=B * 16, num_iterations=1,
                           vocab_size=V, compile=False, export=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(gpt_module, datamodule=FixedSteps([torch.randint(0, V, (1, B, 17))]))
    trainer.save_checkpoint(tmp_path / "base.ckpt")
    rec = Recorder()
    module, _ = fit(base, tmp_path, [rec], init_from=str(tmp_path / "base.ckpt"), data={"num_iterations": 3})
    assert same_weights(rec.start_weights, gpt_state(gpt_module.gpt))
    assert module.stage.init_source == str(tmp_path / "base.ckpt") and len(rec.steps) == 2
    with pytest.raises(NanolitError, match="single .ckpt"):
        fit(base, tmp_path, init_from=str(tmp_path / "base.ckpt"), step=3)


def test_init_from_a_nanochat_folder_at_a_chosen_step(base, tmp_path):
    rec = Recorder()
    fit(base, tmp_path, [rec], model_tag="d2", step=3, data={"num_iterations": 2})
    assert same_weights(rec.start_weights, gpt_state(load_nanochat(base / "base_checkpoints" / "d2", step=3)[0]))
    with pytest.raises(NanolitError, match="drop one of them"):
        fit(base, tmp_path, init_from=str(base / "base_checkpoints" / "d1"), model_tag="d1")
    with pytest.raises(NanolitError, match="does not exist"):
        fit(base, tmp_path, init_from=str(tmp_path / "nowhere"))


def test_base_vocab_must_match_the_tokenizer(base, tmp_path, capsys):
    folder = save_base(tmp_path, "d1", 1, 4, vocab=V + 7)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(ROOT / "configs/mid.yaml"), f"--data.base_dir={base}", f"--model.init_from={folder}",
              f"--trainer.default_root_dir={tmp_path / 'run'}", *TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{folder / 'model_000004.pt'} has a {V + 7}-token vocab" in err
    assert f"tokenizer in {base / 'tokenizer'} has {V}" in err


# ------------------------------------------------------------------------------------------- masks and dtype


class MaskedLossCheck(L.Callback):
    """Before each step: the loss on (x, y with -1 at masked targets), on all targets, and the masked count."""

    def __init__(self):
        self.pairs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = inputs_and_targets(batch[0])
        every_target = torch.where(batch[0] < 0, ~batch[0], batch[0])[:, 1:]  # the ids the mask hid
        with torch.no_grad(), trainer.precision_plugin.forward_context():  # training's precision (autocast)
            self._pending = (pl_module.gpt(x, y).item(), pl_module.gpt(x, every_target).item(),
                             (y == -1).sum().item(), (x < 0).sum().item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pairs.append((outputs["loss"].item(), *self._pending))


def test_mask_user_tokens_trains_with_minus_one_targets(base, tmp_path):
    check = MaskedLossCheck()
    fit(base, tmp_path, [check], data={"num_iterations": 4, "mask_user_tokens": True})
    assert len(check.pairs) == 3
    for trained, masked, unmasked, n_ignored, n_negative_inputs in check.pairs:
        # training_step's loss is the masked one (same weights, up to float rounding); inputs are never negative
        assert trained == pytest.approx(masked, rel=1e-5) and n_negative_inputs == 0
        assert (masked == unmasked) == (n_ignored == 0)  # same computation, bit for bit, only with nothing masked
    assert sum(n_ignored for *_, n_ignored, _ in check.pairs) > 0


def test_dtype_must_agree_with_the_trainer_precision(base, tmp_path):
    with pytest.raises(NanolitError, match="dtype must be one of"):
        MidModule(dtype="float16")
    with pytest.raises(NanolitError, match="--trainer.precision 32-true"):
        fit(base, tmp_path, dtype="float32", precision="bf16-mixed")
    with pytest.raises(NanolitError, match="--trainer.precision bf16-mixed"):
        fit(base, tmp_path, dtype="bfloat16", precision="64-true")
    module, trainer = fit(base, tmp_path, dtype="float32", data={"num_iterations": 2})
    assert trainer.global_step == 1 and module.gpt.transformer.wte.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests_dir!r})
import lightning.pytorch as L
from nanolit.callbacks import BPBValidation, StepCheckpoint
from nanolit.data import tasks
from nanolit.data.mid import MidDataModule
from nanolit.midtrain import MidModule
tasks.SimpleSpelling.num_examples = lambda self: 4  # as the test's monkeypatch
tasks.SpellingBee.num_examples = lambda self: 4
base, root = sys.argv[1], sys.argv[2]
knobs = dict(max_seq_len={T}, device_batch_size={B}, total_batch_size=2 * {B} * {T})
bpb = BPBValidation(eval_every=100)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=-1, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    callbacks=[bpb, StepCheckpoint(dirpath=root + "/checkpoints")])
module = MidModule(compile=False, **knobs)
trainer.fit(module, datamodule=MidDataModule(base_dir=base, eval_tokens=2 * {B} * {T}, **knobs))
with open(f"{{root}}/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump({{"step": trainer.global_step, "bpb": bpb.run_state.val_bpb_history}}, f)
"""


@pytest.mark.slow  # Lightning launches a second Python process that imports torch and Lightning: ~30 s here
def test_ddp_ranks_stop_together_at_the_first_ranks_epoch_end(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks.SimpleSpelling, "num_examples", lambda self: 4)
    base = make_base(tmp_path / "base", byte_tokenizer())
    save_base(base, "d2", 2, 1)
    # with this mixture the two ranks' shares end at different steps: the first to end stops both (nanochat d575940
    # scripts/mid_train.py)
    per_rank = [epoch_steps(base, rank=r, world_size=2) for r in range(2)]
    assert per_rank[0] != per_rank[1]
    script = tmp_path / "ddp_mid.py"
    script.write_text(DDP_SCRIPT.format(tests_dir=str(Path(__file__).resolve().parent), B=B, T=T))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the child imports nanolit as this process does
    proc = subprocess.run([sys.executable, str(script), str(base), str(tmp_path)], check=False, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = min(per_rank)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["step"] for r in ranks] == [n, n]
    assert ranks[0]["bpb"] == ranks[1]["bpb"] and [s for s, _ in ranks[0]["bpb"]] == [0, n]  # all-reduced
    assert (base / "mid_checkpoints" / "d2" / f"model_{n:06d}.pt").exists()
    assert not (base / "mid_checkpoints" / "d2" / f"optim_{n:06d}_rank1.pt").exists()  # rank 0's optimizer only
    assert (tmp_path / "checkpoints" / f"step={n:06d}.ckpt").exists()

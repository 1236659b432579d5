"""Sampler: greedy samples from fixed prompts (nanochat d575940 scripts/base_train.py)."""
from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from test_cb_toys import make_trainer, toy_pair

from nanolit.callbacks import RunState, NANOCHAT_PROMPTS, Sampler
from nanolit.common import NanolitError


def _greedy_by_hand(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """A bigram's greedy continuation is a chain of argmaxes over its table."""
    tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
    table = model.table.weight.detach()
    out = list(tokens)
    for _ in range(max_tokens):
        out.append(int(torch.argmax(table[out[-1]])))
    return tokenizer.decode(out)


def test_prints_and_writes_greedy_samples(tmp_path, capsys):
    module, data = toy_pair(num_iterations=4)
    sampler = Sampler(sample_every=2, prompts=["the cat", "a dog is"], max_tokens=6)
    trainer = make_trainer(tmp_path, [sampler], max_steps=4)
    trainer.fit(module, datamodule=data)

    expected = [_greedy_by_hand(module.model, data.tokenizer, p, 6) for p in ["the cat", "a dog is"]]
    assert sampler.run_state.samples["step"] == 4
    assert [s["sample"] for s in sampler.run_state.samples["samples"]] == expected
    assert expected[0].startswith("<|bos|>the cat") and len(expected[0]) == len("<|bos|>the cat") + 6
    out = capsys.readouterr().out
    assert all(text in out for text in expected)
    markdown = (tmp_path / "run" / "version_0" / "samples.md").read_text()
    assert "## Step 00002" in markdown and "## Step 00004" in markdown
    assert markdown.rstrip().endswith(f"{expected[0]}\n{expected[1]}\n```")

    restored = RunState()
    restored.load_state_dict(sampler.run_state.state_dict())
    assert restored.samples == sampler.run_state.samples


def test_defaults_are_nanochats_seven_prompts_and_16_tokens():
    sampler = Sampler()
    assert sampler.prompts == NANOCHAT_PROMPTS and len(sampler.prompts) == 7
    assert sampler.prompts[0] == "The capital of France is" and sampler.prompts[-1] == "If 5*x + 3 = 13, then x is"
    assert sampler.max_tokens == 16 and sampler.every == 2000


class RecordingWandb(WandbLogger):
    """A WandbLogger that keeps its tables instead of sending them (no wandb run is started)."""

    def __init__(self, save_dir) -> None:
        super().__init__(offline=True, save_dir=str(save_dir))
        self.tables = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None) -> None:
        self.tables.append((key, columns, data))


def test_wandb_logger_gets_a_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    module, data = toy_pair(num_iterations=2)
    sampler = Sampler(sample_every=-1, prompts=["the cat"], max_tokens=3)
    trainer = make_trainer(tmp_path, [], max_steps=2)
    trainer.fit(module, datamodule=data)
    wandb_logger = RecordingWandb(tmp_path / "wandb")
    trainer.loggers = [wandb_logger]
    sampler.setup(trainer, module, "fit")
    sampler.evaluate(trainer, module, step=2)
    assert wandb_logger.tables == [("samples", ["step", "prompt", "sample"],
                                    [[2, "the cat", sampler.run_state.samples["samples"][0]["sample"]]])]


def test_other_ranks_do_not_sample(tmp_path, monkeypatch):
    module, data = toy_pair(num_iterations=1)
    trainer = make_trainer(tmp_path, [], max_steps=1)
    trainer.fit(module, datamodule=data)
    sampler = Sampler(prompts=["the cat"])
    sampler.setup(trainer, module, "fit")
    monkeypatch.setattr(type(trainer), "is_global_zero", property(lambda self: False))
    sampler.on_train_end(trainer, module)
    assert sampler.run_state.samples is None and not (tmp_path / "run" / "version_0" / "samples.md").exists()
    monkeypatch.undo()
    sampler = Sampler(prompts=["the cat"])
    sampler.setup(trainer, module, "fit")
    sampler.on_train_end(trainer, module)  # the same call on rank zero does sample
    assert sampler.run_state.samples["step"] == 1 and len(sampler.run_state.samples["samples"]) == 1


@pytest.mark.parametrize("kwargs", [{"prompts": "The capital of France is"}, {"prompts": []}, {"prompts": [""]},
                                    {"max_tokens": 0}, {"max_tokens": "16"}])
def test_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(NanolitError):
        Sampler(**kwargs)

"""Greedy samples from fixed prompts during training (nanochat d575940 ``scripts/base_train.py``): a quick look at
what the model knows."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.loggers import WandbLogger

from nanolit.callbacks.periodic import PeriodicEvaluation, check_interval, check_positive, evaluation_mode
from nanolit.callbacks.protocols import Generates, HasTokenizer, require
from nanolit.common import NanolitError, atomic_write
from nanolit.sample import NANOCHAT_PROMPTS



class Sampler(PeriodicEvaluation):
    """Print greedy completions of ``prompts`` at steps ``k * sample_every`` (k >= 1) and at the end (-1: never).

    Runs on global rank zero only. Each prompt is encoded with ``<|bos|>`` prepended and continued by
    ``max_tokens`` greedy tokens (nanochat: 16, temperature 0); the decoded text, BOS included, is printed as
    nanochat prints it. The samples are also appended to ``samples.md`` in the run directory and, with a
    ``WandbLogger``, logged as a wandb table ``samples`` (columns step, prompt, sample).

    Protocol (``nanolit.callbacks.protocols``): the module :class:`Generates`, the DataModule
    :class:`HasTokenizer`.

    The latest samples go into the run state's ``samples`` (``{"step", "samples": [{"prompt", "sample"}]}``,
    checkpointed) for the report.
    """

    def __init__(self, sample_every: int = 2000, prompts: list[str] | None = None, max_tokens: int = 16) -> None:
        super().__init__(check_interval("sample_every", sample_every), at_step_zero=False, rank_zero_only=True)
        prompts = NANOCHAT_PROMPTS if prompts is None else prompts
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise NanolitError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        self.prompts = list(prompts)
        self.max_tokens = check_positive("max_tokens", max_tokens)
        self.run_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.enabled:
            return
        require(pl_module, Generates, "Sampler", "module")
        require(trainer.datamodule, HasTokenizer, "Sampler", "DataModule")
        # trainer.log_dir is a broadcast: read it here, on every rank, never from rank zero alone.
        self.run_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        tokenizer = trainer.datamodule.tokenizer
        bos = tokenizer.get_bos_token_id()
        samples = []
        with evaluation_mode(trainer, pl_module):
            for prompt in self.prompts:
                tokens = tokenizer.encode(prompt, prepend=bos)
                continuation = [int(t) for t in pl_module.generate(tokens, self.max_tokens)]
                samples.append({"prompt": prompt, "sample": tokenizer.decode(tokens + continuation)})
        self.run_state.samples = {"step": step, "samples": samples}
        for item in samples:
            print(item["sample"])
        if self.run_dir is not None:
            self._write_markdown(self.run_dir / "samples.md", step, samples)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="samples", columns=["step", "prompt", "sample"],
                                 data=[[step, s["prompt"], s["sample"]] for s in samples])

    @staticmethod
    def _write_markdown(path: Path, step: int, samples: list[dict[str, str]]) -> None:
        """Append one section per evaluation, rewriting the file atomically (it stays small)."""
        previous = path.read_text(encoding="utf-8") if path.exists() else "# Samples (greedy)\n"
        body = "\n".join(s["sample"] for s in samples)
        with atomic_write(path) as tmp:
            tmp.write_text(f"{previous}\n## Step {step:05d}\n\n```text\n{body}\n```\n", encoding="utf-8")

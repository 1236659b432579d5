"""The CORE metric during training (nanochat d575940 ``scripts/base_train.py`` with ``nanochat/core_eval.py``):
every ``core_metric_every`` steps and at the end."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_warn

from nanolit.callbacks.periodic import PeriodicEvaluation, check_interval, check_positive, evaluation_mode
from nanolit.callbacks.protocols import HasEvalModel, HasTokenizer, require
from nanolit.common import NanolitError, get_base_dir
from nanolit.eval.core import evaluate_core, load_bundle, load_task_data
from nanolit.lightning_adapter import log_to_loggers


class COREEvaluation(PeriodicEvaluation):
    """Evaluate DCLM CORE at steps ``k * core_metric_every`` (k >= 1) and on the final model (-1: never).

    nanochat runs it with ``core_metric_max_per_task=500`` examples per task during training (a cheap estimate;
    the standalone ``nanolit eval core`` uses all). ``bundle_dir`` defaults to ``<base_dir>/eval_bundle``;
    ``tasks`` keeps only those labels.

    Protocol (``nanolit.callbacks.protocols``): the module :class:`HasEvalModel` (an uncompiled model for prompts
    of any length, as nanochat scores its uncompiled ``orig_model``; a model with a context limit says so with
    ``eval_model.max_seq_len``, and prompts are then cropped from the left), the DataModule :class:`HasTokenizer`.

    Every rank takes part: the examples are split across ranks and the results summed.

    An optional resource must not kill a long run: if the bundle, a task file or a line of it is missing or
    malformed, or the model fails on a prompt, the callback warns loudly once and switches itself off; training goes
    on. Logs ``core/metric`` and ``core/<task>`` (centered accuracy); the latest evaluation goes into the run
    state's ``core`` (checkpointed).
    """

    def __init__(self, bundle_dir: str | None = None, core_metric_every: int = 2000,
                 core_metric_max_per_task: int = 500, tasks: list[str] | None = None) -> None:
        super().__init__(check_interval("core_metric_every", core_metric_every), at_step_zero=False)
        self.max_per_task = check_positive("core_metric_max_per_task", core_metric_max_per_task, allow_all=True)
        if tasks is not None and (isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks)):
            raise NanolitError(f"tasks must be a list of CORE task labels, got {tasks!r}")
        self.bundle_dir = bundle_dir
        self.tasks = list(tasks) if tasks is not None else None
        self.disabled_reason: str | None = None

    @property
    def enabled(self) -> bool:
        return super().enabled and self.disabled_reason is None

    def resolve_bundle_dir(self) -> Path:
        return Path(self.bundle_dir) if self.bundle_dir else get_base_dir() / "eval_bundle"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.enabled:
            return
        require(pl_module, HasEvalModel, "COREEvaluation", "module")
        require(trainer.datamodule, HasTokenizer, "COREEvaluation", "DataModule")
        bundle_dir = self.resolve_bundle_dir()
        try:
            # Read every task file now (the bundle is ~13 MB of JSONL) so a broken bundle shows up at step 0,
            # not hours into the run.
            for spec in load_bundle(bundle_dir, tasks=self.tasks):
                load_task_data(bundle_dir, spec)
        except NanolitError as e:
            self._disable(str(e))

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        rank_zero_warn(f"CORE evaluation is OFF for this run, training continues without it: {reason}")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        datamodule = trainer.datamodule
        try:
            with evaluation_mode(trainer, pl_module):
                out = evaluate_core(pl_module.eval_model, datamodule.tokenizer, pl_module.device,
                                    self.resolve_bundle_dir(), max_per_task=self.max_per_task, tasks=self.tasks)
        except NanolitError as e:
            # Every rank reads the same files, so every rank fails at the same point and stops together.
            self._disable(str(e))
            return
        except (IndexError, RuntimeError) as e:  # the model refused a prompt: longer than its context, say
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self._disable(f"the model failed on a CORE prompt ({type(e).__name__}: {reason}); if it has a context "
                          "limit, give eval_model a max_seq_len so prompts are cropped to it")
            return
        self.run_state.core = {"step": step, "core_metric": out["core_metric"], "results": out["results"],
                               "centered_results": out["centered_results"]}
        if trainer.is_global_zero:
            print(f"Step {step:05d} | CORE metric: {out['core_metric']:.4f}")
        metrics = {"core/metric": out["core_metric"]}
        metrics.update({f"core/{label}": value for label, value in out["centered_results"].items()})
        log_to_loggers(trainer, metrics, step)

"""The CORE metric during training (spec §4.10 step 2, §7): every ``core_metric_every`` steps and at the end."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_warn

from nanolit.callbacks.periodic import PeriodicEvaluation, check_interval, check_positive, evaluation_mode
from nanolit.callbacks.periodic import log_to_loggers
from nanolit.common import NanolitError, get_base_dir
from nanolit.eval.core import evaluate_core, load_bundle, load_task_data


class COREEvaluation(PeriodicEvaluation):
    """Evaluate DCLM CORE at steps ``k * core_metric_every`` (k >= 1) and on the final model (-1: never).

    nanochat runs it with ``core_metric_max_per_task=500`` examples per task during training (a cheap estimate;
    the standalone ``nanolit eval core`` uses all). ``bundle_dir`` defaults to ``<base_dir>/eval_bundle``;
    ``tasks`` keeps only those labels.

    Protocol:

    * ``pl_module.eval_model``: an uncompiled ``nn.Module`` with ``model(idx[B, T]) -> logits[B, T, V]``
      (prompt shapes vary, so nanochat scores its uncompiled ``orig_model``);
    * ``trainer.datamodule.tokenizer`` with ``encode(texts, prepend=id)`` and ``get_bos_token_id()``.

    Every rank takes part: the examples are split across ranks and the results summed.

    An optional resource must not kill a long run: if the bundle, a task file or a line of it is missing or
    malformed, the callback warns loudly once and switches itself off; training goes on. Logs ``core/metric``
    and ``core/<task>`` (centered accuracy); ``last_result`` (checkpointed) holds the latest evaluation.
    """

    def __init__(self, bundle_dir: str | None = None, core_metric_every: int = 2000,
                 core_metric_max_per_task: int = 500, tasks: list[str] | None = None) -> None:
        super().__init__(check_interval("core_metric_every", core_metric_every), at_step_zero=False)
        self.max_per_task = check_positive("core_metric_max_per_task", core_metric_max_per_task, allow_all=True)
        if tasks is not None and (isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks)):
            raise NanolitError(f"tasks must be a list of CORE task labels, got {tasks!r}")
        self.bundle_dir = bundle_dir
        self.tasks = list(tasks) if tasks is not None else None
        self.last_result: dict[str, Any] | None = None
        self.disabled_reason: str | None = None

    @property
    def enabled(self) -> bool:
        return super().enabled and self.disabled_reason is None

    def resolve_bundle_dir(self) -> Path:
        return Path(self.bundle_dir) if self.bundle_dir else get_base_dir() / "eval_bundle"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        if not hasattr(pl_module, "eval_model"):  # callbacks set up before the module, which may build it then
            raise NanolitError(f"COREEvaluation needs {type(pl_module).__name__}.eval_model (an nn.Module "
                               "returning logits); add it or remove the callback")
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
        self.last_result = {"step": step, "core_metric": out["core_metric"], "results": out["results"],
                            "centered_results": out["centered_results"]}
        if trainer.is_global_zero:
            print(f"Step {step:05d} | CORE metric: {out['core_metric']:.4f}")
        metrics = {"core/metric": out["core_metric"]}
        metrics.update({f"core/{label}": value for label, value in out["centered_results"].items()})
        log_to_loggers(trainer, metrics, step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_result": self.last_result}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_result = state_dict["last_result"]

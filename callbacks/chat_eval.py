"""Chat evaluation during training (nanochat d575940 ``scripts/chat_sft.py`` with ``scripts/chat_eval.py``): the
accuracies of chat tasks every ``eval_metrics_every`` steps and on the final model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_warn

from nanolit.callbacks.periodic import PeriodicEvaluation, check_interval, check_positive, evaluation_mode
from nanolit.callbacks.protocols import ChatModel, ChatTokenizer, HasEvalModel, HasTokenizer, require
from nanolit.common import NanolitError, get_base_dir
from nanolit.eval.chat import accuracy_key, check_task_names, evaluate_chat, load_chat_task
from nanolit.lightning_adapter import log_to_loggers

SFT_TASKS = "MMLU|ARC-Easy"  # what chat_sft evaluates during training (the quick, categorical ones)


class ChatEvaluation(PeriodicEvaluation):
    """Evaluate chat tasks at steps ``k * eval_metrics_every`` (k >= 1) and on the final model (-1: never).

    chat_sft scores MMLU and ARC-Easy on at most ``eval_metrics_max_problems=1024`` problems each, categorical
    batches of ``2 * device_batch_size`` = 8 prompts; ``tasks`` takes any of ``nanolit.eval.chat.CHAT_TASKS``
    joined by ``|`` (the generative ones sample ``max_new_tokens`` at ``temperature``, ``top_k``, ``num_samples``
    per problem, as ``nanolit eval chat``); with all six the ChatCORE metric is reported too. The task files are read
    from ``base_dir``, by default the DataModule's (else nanolit's default base dir).

    Protocol (``nanolit.callbacks.protocols``): the module :class:`HasEvalModel` with an ``eval_model`` that is a
    :class:`ChatModel` (checked when training starts, once the module has built it), the DataModule
    :class:`HasTokenizer` with a :class:`ChatTokenizer`.

    Every rank takes part: problems are split across ranks and the counts summed. Logs ``chat/<task>`` (accuracy)
    and ``chat/chatcore``; prints chat_sft's ``Step 00200 | mmlu_acc: 0.312500, arc_easy_acc: 0.281250`` on rank
    zero; the latest evaluation goes into the run state's ``chat`` (checkpointed).

    Task data is an optional resource that must not kill a long run: if a task's files are missing or malformed, the
    callback warns loudly once and switches itself off; training goes on.
    """

    def __init__(self, eval_metrics_every: int = 200, eval_metrics_max_problems: int = 1024, tasks: str = SFT_TASKS,
                 batch_size: int = 8, base_dir: str | None = None, num_samples: int = 1, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_k: int | None = 50) -> None:
        super().__init__(check_interval("eval_metrics_every", eval_metrics_every), at_step_zero=False)
        self.max_problems = check_positive("eval_metrics_max_problems", eval_metrics_max_problems, allow_all=True)
        if not isinstance(tasks, str):
            raise NanolitError(f"tasks must be chat task names joined by '|' (e.g. {SFT_TASKS!r}), got {tasks!r}")
        self.task_names = check_task_names(tasks.split("|"))
        self.batch_size = check_positive("batch_size", batch_size)
        self.num_samples = check_positive("num_samples", num_samples)
        self.max_new_tokens = check_positive("max_new_tokens", max_new_tokens)
        self.temperature, self.top_k = temperature, top_k
        self.base_dir = base_dir
        self.tasks: dict[str, Any] = {}
        self.disabled_reason: str | None = None

    @property
    def enabled(self) -> bool:
        return super().enabled and self.disabled_reason is None

    def resolve_base_dir(self, trainer: L.Trainer) -> Path:
        return get_base_dir(self.base_dir or getattr(trainer.datamodule, "base_dir", None))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not self.enabled:
            return
        require(pl_module, HasEvalModel, "ChatEvaluation", "module")
        require(trainer.datamodule, HasTokenizer, "ChatEvaluation", "DataModule")
        require(trainer.datamodule.tokenizer, ChatTokenizer, "ChatEvaluation", "tokenizer")
        base = self.resolve_base_dir(trainer)
        try:  # read every task now, so missing data shows up at the start, not hours into the run
            self.tasks = {name: load_chat_task(name, base) for name in self.task_names}
        except NanolitError as e:
            self._disable(str(e))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            require(pl_module.eval_model, ChatModel, "ChatEvaluation", "eval_model")

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        rank_zero_warn(f"chat evaluation is OFF for this run, training continues without it: {reason}")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        try:
            with evaluation_mode(trainer, pl_module):
                out = evaluate_chat(pl_module.eval_model, trainer.datamodule.tokenizer, tasks=self.tasks,
                                    max_problems=None if self.max_problems == -1 else self.max_problems,
                                    batch_size=self.batch_size, num_samples=self.num_samples,
                                    max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                    top_k=self.top_k)
        except NanolitError as e:
            # Every rank reads the same tasks, so every rank fails at the same problem and stops together.
            self._disable(str(e))
            return
        self.run_state.chat = {"step": step, "results": dict(out["results"]),
                               "counts": {name: list(count) for name, count in out["counts"].items()},
                               "chatcore": out["chatcore"]}
        if trainer.is_global_zero:
            line = [f"{accuracy_key(name)}: {accuracy:.6f}" for name, accuracy in out["results"].items()]
            if out["chatcore"] is not None:
                line.append(f"chatcore: {out['chatcore']:.6f}")
            print(f"Step {step:05d} | {', '.join(line)}")
        metrics = {f"chat/{name}": accuracy for name, accuracy in out["results"].items()}
        if out["chatcore"] is not None:
            metrics["chat/chatcore"] = out["chatcore"]
        log_to_loggers(trainer, metrics, step)

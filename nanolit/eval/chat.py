"""Chat evaluation: ARC, MMLU, GSM8K, HumanEval and SpellingBee scored as nanochat d575940 scripts/chat_eval.py does.

Categorical tasks (multiple choice) need no sampling: a batch of prompts goes through the model once, and the
answer is the choice letter with the largest logit at the last prompt position, among that problem's letters.
Generative tasks sample ``num_samples`` completions per problem with the engine and pass when any of them is right:
GSM8K and SpellingBee by the number after ``####``, HumanEval by running the problem's tests on the completion in
a sandbox (:mod:`nanolit.eval.execution`). Under torch.distributed each rank takes every ``world_size``-th problem
(categorical: batch) and the counts are all-reduced. ChatCORE is the mean over the six tasks of the accuracy
centred on the random baseline, ``(acc - baseline) / (1 - baseline)``, reported only when all six ran.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from nanolit.common import NanolitError, autocast_context
from nanolit.data.chat import render_for_completion
from nanolit.data.tasks import ARC, GSM8K, MMLU, WORDS_FILE, HumanEval, SpellingBee, Task, task_folder
from nanolit.engine import Engine
from nanolit.eval.execution import execute_code

# chat_eval's task list and random baselines (multiple choice of 4: 25%; open-ended: 0%)
CHAT_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
CATEGORICAL = ("ARC-Easy", "ARC-Challenge", "MMLU")
SPELLING_BEE_SIZE = 256  # chat_eval's SpellingBee test size


def load_chat_task(name: str, base_dir: str | os.PathLike) -> Task:
    """The evaluation split of task ``name`` from ``<base_dir>`` (layout of :mod:`nanolit.data.tasks`)."""
    base = Path(base_dir)
    factories = {
        "ARC-Easy": lambda: ARC("ARC-Easy", "test", task_folder(base, "ARC-Easy")),
        "ARC-Challenge": lambda: ARC("ARC-Challenge", "test", task_folder(base, "ARC-Challenge")),
        "MMLU": lambda: MMLU("all", "test", task_folder(base, "mmlu-all")),
        "GSM8K": lambda: GSM8K("main", "test", task_folder(base, "gsm8k-main")),
        "HumanEval": lambda: HumanEval(task_folder(base, "humaneval")),
        "SpellingBee": lambda: SpellingBee(base / WORDS_FILE, size=SPELLING_BEE_SIZE, split="test"),
    }
    return factories[check_task_names([name])[0]]()


def accuracy_key(name: str) -> str:
    """chat_sft's name for task ``name``'s accuracy in its logs and checkpoint meta: ``ARC-Easy`` -> ``arc_easy_acc``."""
    return name.lower().replace("-", "_") + "_acc"


def check_task_names(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in CHAT_TASKS]
    if unknown:
        raise NanolitError(f"unknown chat task {unknown[0]!r}; choose from {'|'.join(CHAT_TASKS)}")
    return list(names)


# ------------------------------------------------------------------------------------------------ answer checks
_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")  # GSM8K's final-answer marker, as openai/grade-school-math reads it


def extract_answer(text: str) -> str | None:
    """The number after ``####`` with thousands commas removed, or None."""
    match = _ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def check_number(conversation: dict, completion: str) -> bool:
    """GSM8K and SpellingBee: the completion's ``####`` number equals the reference's (the last text part)."""
    reference = conversation["messages"][-1]["content"]
    reference = reference[-1]["text"] if isinstance(reference, list) else reference
    predicted = extract_answer(completion)
    return predicted is not None and predicted == extract_answer(reference)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a HumanEval prompt (comments and blank lines skipped)."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


_CODE_BLOCK = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_program(completion: str) -> str:
    """The first fenced code block of a completion, else the whole completion."""
    blocks = _CODE_BLOCK.findall(completion)
    return (blocks[0] if blocks else completion).strip()


def check_humaneval(conversation: dict, completion: str) -> bool:
    """The prompt's imports, the completion's code, the problem's tests and ``check(entry_point)`` run cleanly."""
    program = "\n\n".join([extract_imports(conversation["messages"][0]["content"]), extract_program(completion),
                           conversation["test"]]) + f"\ncheck({conversation['entry_point']})"
    return execute_code(program).success


CHECKS = {"GSM8K": check_number, "SpellingBee": check_number, "HumanEval": check_humaneval}


# ------------------------------------------------------------------------------------------------------ loops
def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(passed: int, total: int, device: torch.device) -> tuple[int, int]:
    if _dist_info()[1] == 1:
        return passed, total
    counts = torch.tensor([passed, total], dtype=torch.long, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return int(counts[0]), int(counts[1])


def run_categorical(task: Task, model, tokenizer, batch_size: int = 8, max_problems: int | None = None
                    ) -> tuple[int, int]:
    """``(passed, total)``: letter logits at the last prompt position, prompts padded with ``<|bos|>`` (those
    positions come after the answer position, so causal attention never sees them)."""
    rank, world = _dist_info()
    device = model.get_device()
    bos = tokenizer.get_bos_token_id()
    num = len(task) if max_problems is None else min(len(task), max_problems)
    letter_ids: dict[str, int] = {}
    passed = total = 0
    for b in range(rank, -(-num // batch_size), world):
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, num))]
        prompts = [render_for_completion(tokenizer, c, where=task.where(b * batch_size + j))
                   for j, c in enumerate(conversations)]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        with torch.no_grad(), autocast_context(device):
            logits = model(ids)
        for j, conversation in enumerate(conversations):
            letters = conversation["letters"]
            ids_of = [letter_ids.setdefault(letter, _single_token(tokenizer, letter)) for letter in letters]
            choice = letters[int(logits[j, len(prompts[j]) - 1, ids_of].argmax())]
            passed += int(choice == conversation["messages"][-1]["content"])
            total += 1
    return _sum_over_ranks(passed, total, device)


def _single_token(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise NanolitError(f"answer letter {letter!r} is {len(ids)} tokens for this tokenizer; categorical scoring "
                           "needs one token per letter")
    return ids[0]


def run_generative(task: Task, check: Callable[[dict, str], bool], model, tokenizer, num_samples: int = 1,
                   max_new_tokens: int = 512, temperature: float = 0.0, top_k: int | None = 50,
                   max_problems: int | None = None) -> tuple[int, int]:
    """``(passed, total)``: a problem passes when any of its ``num_samples`` completions passes ``check``."""
    rank, world = _dist_info()
    engine = Engine(model, tokenizer)
    num = len(task) if max_problems is None else min(len(task), max_problems)
    passed = total = 0
    for i in range(rank, num, world):
        conversation = task[i]
        prompt = render_for_completion(tokenizer, conversation, where=task.where(i))
        rows, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k)
        passed += int(any(check(conversation, tokenizer.decode(row[len(prompt):])) for row in rows))
        total += 1
    return _sum_over_ranks(passed, total, model.get_device())


def evaluate_chat(model, tokenizer, device: torch.device | str | None = None,
                  tasks: str | Sequence[str] | Mapping[str, Task] | None = None, max_problems: int | None = None,
                  base_dir: str | os.PathLike | None = None, batch_size: int = 8, num_samples: int = 1,
                  max_new_tokens: int = 512, temperature: float = 0.0, top_k: int | None = 50,
                  log: Callable[[str], None] | None = None) -> dict:
    """chat_eval on ``model``: ``{"results": {task: accuracy}, "counts": {task: (passed, total)}, "chatcore":
    float or None}``.

    ``tasks``: names (a list, or one string split on ``|``; default all six), loaded from ``base_dir``, or a
    mapping of names to :class:`~nanolit.data.tasks.Task` objects. ``device`` is the model's (checked). Call it
    on every rank under torch.distributed; ``log`` gets one line per finished task.
    """
    if device is not None and torch.device(device) != model.get_device():
        raise NanolitError(f"the model is on {model.get_device()}, not {device}; move it first")
    if isinstance(tasks, Mapping):
        loaded = {name: tasks[name] for name in check_task_names(list(tasks))}
    else:
        names = CHAT_TASKS if tasks is None else tasks.split("|") if isinstance(tasks, str) else tasks
        if base_dir is None:
            raise NanolitError("evaluate_chat needs base_dir (where the task data is) or Task objects")
        loaded = {name: load_chat_task(name, base_dir) for name in check_task_names(names)}
    results, counts = {}, {}
    for name, task in loaded.items():
        if name in CATEGORICAL:
            passed, total = run_categorical(task, model, tokenizer, batch_size, max_problems)
        else:
            passed, total = run_generative(task, CHECKS[name], model, tokenizer, num_samples, max_new_tokens,
                                           temperature, top_k, max_problems)
        if total == 0:
            raise NanolitError(f"task {name} has no problems to evaluate; check its data or max_problems")
        results[name], counts[name] = passed / total, (passed, total)
        if log:
            log(f"{name} accuracy: {100 * results[name]:.2f}% ({passed}/{total})")
    chatcore = None
    if all(name in results for name in CHAT_TASKS):
        chatcore = sum((acc - BASELINES[n]) / (1.0 - BASELINES[n]) for n, acc in results.items()) / len(results)
    return {"results": results, "counts": counts, "chatcore": chatcore}

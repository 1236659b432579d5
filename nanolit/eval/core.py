"""The CORE metric: DCLM's in-context-learning tasks, scored the way nanochat scores them (nanochat d575940
nanochat/core_eval.py).

A bundle folder holds ``core.yaml`` (the task list), ``eval_meta_data.csv`` (random baselines, percent) and
``eval_data/<dataset_uri>`` JSONL files. Every example becomes one or more prompts; the model's cross-entropy on the
continuation tokens decides multiple-choice and schema tasks, an exact greedy match decides language-modelling
tasks. Accuracy is centred on the random baseline and CORE is the mean of the centred scores.
"""
from __future__ import annotations

import csv
import json
import random
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import filelock
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanolit.common import NanolitError, atomic_write, download_file

# nanochat d575940 nanochat/core_eval.py: about 162 MB; unzips to a folder named eval_bundle/.
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# nanochat d575940 nanochat/core_eval.py: the JSONL fields each task type reads.
REQUIRED_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


@dataclass(frozen=True)
class TaskSpec:
    """One CORE task as ``core.yaml`` and ``eval_meta_data.csv`` describe it (nanochat d575940
    nanochat/core_eval.py)."""

    label: str
    dataset_uri: str  # relative to <bundle>/eval_data/
    task_type: str  # one of TASK_TYPES
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent


# -----------------------------------------------------------------------------
# Bundle and task data

def load_bundle(
    bundle_dir: str | Path, skip_missing: bool = False, tasks: Sequence[str] | None = None
) -> list[TaskSpec]:
    """The tasks of ``<bundle_dir>/core.yaml`` in file order, with their random baselines.

    ``tasks``: keep only these labels (still in file order). A task whose JSONL file is absent raises, unless
    ``skip_missing`` is set: then it is left out with a warning (a CORE mean over fewer tasks is not comparable
    with a full one).
    """
    bundle_dir = Path(bundle_dir)
    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.exists():
            raise NanolitError(f"CORE bundle file {path} not found; fetch the bundle with `nanolit eval "
                               "download-core` or point at an eval_bundle folder (--bundle)")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise NanolitError(f"{config_path} has no 'icl_tasks' list; use the core.yaml of nanochat's eval bundle")
    baselines = _read_baselines(meta_path)
    specs = [_task_spec(task, baselines, config_path, meta_path) for task in config["icl_tasks"]]
    if tasks is not None:
        unknown = sorted(set(tasks) - {s.label for s in specs})
        if unknown:
            raise NanolitError(f"unknown CORE task(s) {unknown}; choose from {[s.label for s in specs]}")
        specs = [s for s in specs if s.label in set(tasks)]
    missing = [s for s in specs if not (bundle_dir / "eval_data" / s.dataset_uri).exists()]
    if missing:
        names = ", ".join(f"{s.label} (eval_data/{s.dataset_uri})" for s in missing)
        if not skip_missing:
            raise NanolitError(f"CORE task data missing in {bundle_dir}: {names}; add the files, or leave those "
                               "tasks out with --skip_missing (a CORE mean over fewer tasks)")
        warnings.warn(f"CORE: skipping {len(missing)} task(s) whose data is missing: {names}; "
                      f"the CORE mean is over {len(specs) - len(missing)} tasks", stacklevel=2)
    return [s for s in specs if s not in missing]


def _read_baselines(meta_path: Path) -> dict[str, float]:
    """``Eval Task`` -> ``Random baseline`` (percent) from eval_meta_data.csv."""
    with open(meta_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"Eval Task", "Random baseline"} <= set(reader.fieldnames or ()):
            raise NanolitError(f"{meta_path} needs the columns 'Eval Task' and 'Random baseline'; "
                               "use the eval_meta_data.csv of nanochat's eval bundle")
        try:
            return {row["Eval Task"]: float(row["Random baseline"]) for row in reader}
        except ValueError as e:
            raise NanolitError(f"{meta_path}:{reader.line_num}: bad 'Random baseline' ({e}); use a number") from None


def _task_spec(task: dict, baselines: dict[str, float], config_path: Path, meta_path: Path) -> TaskSpec:
    """Build one TaskSpec from a core.yaml entry (nanochat d575940 nanochat/core_eval.py: num_fewshot[0], delimiter
    default ' ')."""
    try:
        label, uri, task_type = task["label"], task["dataset_uri"], task["icl_task_type"]
        num_fewshot = int(task["num_fewshot"][0])
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise NanolitError(f"{config_path}: malformed icl_tasks entry {task!r} ({e!r}); each needs label, "
                           "dataset_uri, num_fewshot (a list) and icl_task_type") from None
    if task_type not in TASK_TYPES:
        raise NanolitError(f"{config_path}: task {label} has icl_task_type {task_type!r}; use one of {TASK_TYPES}")
    if label not in baselines:
        raise NanolitError(f"{meta_path} has no 'Random baseline' row for task {label}; add one")
    return TaskSpec(label=label, dataset_uri=uri, task_type=task_type, num_fewshot=num_fewshot,
                    continuation_delimiter=task.get("continuation_delimiter", " "),
                    random_baseline=baselines[label])


def load_task_data(bundle_dir: str | Path, spec: TaskSpec) -> list[dict]:
    """The examples of one task, in file order (one JSON object per line, with the fields its type needs)."""
    path = Path(bundle_dir) / "eval_data" / spec.dataset_uri
    if not path.exists():
        raise NanolitError(f"CORE task {spec.label}: data file {path} not found; add it to the bundle")
    data = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanolitError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or replace the file") from None
            if not isinstance(item, dict) or any(k not in item for k in REQUIRED_FIELDS[spec.task_type]):
                raise NanolitError(f"{path}:{lineno}: a {spec.task_type} example needs the fields "
                                   f"{', '.join(REQUIRED_FIELDS[spec.task_type])}; fix or replace the file")
            data.append(item)
    return data


# -----------------------------------------------------------------------------
# Prompt rendering (nanochat d575940 nanochat/core_eval.py). Every few-shot demo is followed by a blank line.

def render_prompts_mc(item: dict, delimiter: str, fewshot_examples: Sequence[dict] = ()) -> list[str]:
    """One prompt per choice: ``demos + query + delimiter + choice``."""
    demos = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot_examples)
    return [f"{demos}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot_examples: Sequence[dict] = ()) -> list[str]:
    """One prompt per context option: ``demos + option + delimiter + continuation``."""
    demos = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n"
                    for ex in fewshot_examples)
    return [f"{demos}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot_examples: Sequence[dict] = ()) -> list[str]:
    """``[without, with]`` the continuation; contexts are trimmed and ``without`` is stripped.

    Stripping drops e.g. the delimiter's trailing space, which the continuation's first token usually carries.
    """
    demos = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot_examples)
    prompt = f"{demos}{str(item['context']).strip()}{delimiter}"
    return [prompt.strip(), prompt + str(item["continuation"])]


RENDERERS: dict[str, Callable[..., list[str]]] = {
    "multiple_choice": render_prompts_mc,
    "schema": render_prompts_schema,
    "language_modeling": render_prompts_lm,
}


def sample_fewshot(data: Sequence[dict], idx: int, num_fewshot: int) -> list[dict]:
    """The demos for example ``idx``: ``Random(1234 + idx).sample`` over every other index (nanochat d575940
    nanochat/core_eval.py).

    ``data`` is the already shuffled and cropped list, so ``max_per_task`` changes the pool, as in nanochat.
    """
    if num_fewshot <= 0:
        return []
    rng = random.Random(1234 + idx)
    available = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in rng.sample(available, num_fewshot)]


# -----------------------------------------------------------------------------
# Tokenisation: rows of token ids and the [start, end) span of the scored continuation in each row

def find_common_length(rows: Sequence[Sequence[int]], direction: str = "left") -> int:
    """Length of the token prefix (``left``) or suffix (``right``) that every row shares."""
    min_len = min(len(row) for row in rows)
    positions = range(min_len) if direction == "left" else range(-1, -min_len - 1, -1)
    for n, pos in enumerate(positions):
        if any(row[pos] != rows[0][pos] for row in rows):
            return n
    return min_len


def batch_sequences(tokenizer, prompts: list[str], task_type: str) -> tuple[list[list[int]], list[int], list[int]]:
    """Tokenise ``prompts`` with ``<|bos|>`` prepended; return ``(rows, starts, ends)`` (nanochat d575940
    nanochat/core_eval.py)."""
    rows = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    if task_type == "multiple_choice":
        # The choices differ only after the shared query, so they are scored from the first differing token.
        start = find_common_length(rows, "left")
        return rows, [start] * len(rows), [len(row) for row in rows]
    if task_type == "schema":
        # The options differ only before the shared continuation, which is what gets scored.
        suffix = find_common_length(rows, "right")
        return rows, [len(row) - suffix for row in rows], [len(row) for row in rows]
    without, with_continuation = rows
    start, end = len(without), len(with_continuation)
    if not (start < end and with_continuation[:start] == without):
        raise NanolitError(f"LM prompt {prompts[0][-60:]!r}: its tokens are not a strict prefix of the tokens "
                           "with the continuation; this tokenizer merges across the delimiter")
    return [with_continuation], [start], [end]


def crop_to_max_len(rows: list[list[int]], starts: list[int], ends: list[int], max_len: int):
    """Drop tokens from the left of rows longer than ``max_len`` (nanochat d575940 nanochat/core_eval.py; only for
    models with ``max_seq_len``)."""
    new_rows, new_starts, new_ends = [], [], []
    for row, start, end in zip(rows, starts, ends):
        crop = max(0, len(row) - max_len)
        if start - crop < 1:
            raise NanolitError(f"a CORE continuation is longer than the model's max_seq_len ({max_len}); "
                               "use a model with a longer context")
        new_rows.append(row[crop:])
        new_starts.append(start - crop)
        new_ends.append(end - crop)
    return new_rows, new_starts, new_ends


def stack_sequences(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad ``rows`` with ``pad_id`` (the BOS id) into a [rows, max_len] int64 tensor."""
    max_len = max(len(row) for row in rows)
    out = torch.full((len(rows), max_len), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# -----------------------------------------------------------------------------
# Forward and scoring

def forward_model(
    model: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE against the next token (last column NaN: it has none) and the argmax predictions."""
    logits = model(input_ids)
    rows, seq_len = input_ids.shape
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.reshape(rows * seq_len, -1).float(), targets.reshape(-1), reduction="none")
    losses = losses.view(rows, seq_len)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1)


@torch.no_grad()
def evaluate_example(
    idx: int, model, tokenizer, data: Sequence[dict], device: torch.device | str, task_meta: TaskSpec
) -> bool:
    """Whether the model gets example ``idx`` of ``data`` right (nanochat d575940 nanochat/core_eval.py)."""
    item = data[idx]
    fewshot = sample_fewshot(data, idx, task_meta.num_fewshot)
    prompts = RENDERERS[task_meta.task_type](item, task_meta.continuation_delimiter, fewshot)
    rows, starts, ends = batch_sequences(tokenizer, prompts, task_meta.task_type)
    # Only models that declare a context limit are cropped (nanochat: the HF GPT-2 wrapper); nanolit's GPT
    # extends its rotary table instead, so long few-shot prompts are scored whole.
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None:
        rows, starts, ends = crop_to_max_len(rows, starts, ends, max_len)
    input_ids = stack_sequences(rows, tokenizer.get_bos_token_id()).to(device)
    losses, predictions = forward_model(model, input_ids)
    if task_meta.task_type == "language_modeling":
        # Exact greedy match: every continuation token must be the argmax of the position before it.
        start, end = starts[0], ends[0]
        return bool(torch.all(predictions[0, start - 1 : end - 1] == input_ids[0, start:end]).item())
    # Multiple choice and schema: lowest mean CE over the continuation wins (nanochat d575940 nanochat/core_eval.py: the
    # mean, not the sum, so long choices are not penalised).
    mean_losses = [losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_task(model, tokenizer, data: Sequence[dict], device: torch.device | str, task_meta: TaskSpec) -> float:
    """Accuracy over ``data``; rank r takes examples r, r+W, ... and the results are summed across ranks."""
    if len(data) <= task_meta.num_fewshot:
        # Each example draws its demos from the others (nanochat d575940 nanochat/core_eval.py), so there must be more
        # than num_fewshot.
        raise NanolitError(f"CORE task {task_meta.label} has {len(data)} examples but needs more than its "
                           f"{task_meta.num_fewshot} few-shot demos; raise max_per_task above {task_meta.num_fewshot}")
    rank, world = _rank_and_world()
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world):
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, device, task_meta))
    if world > 1:
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Map the random baseline (percent) to 0 and a perfect score to 1 (nanochat d575940 nanochat/core_eval.py)."""
    return (accuracy - 0.01 * random_baseline) / (1.0 - 0.01 * random_baseline)


def evaluate_core(
    model,
    tokenizer,
    device: torch.device | str,
    bundle_dir: str | Path,
    max_per_task: int = -1,
    tasks: Sequence[str] | None = None,
    skip_missing: bool = False,
    verbose: bool = True,
) -> dict:
    """Evaluate every task of the bundle (or the labels in ``tasks``, kept in core.yaml order) (nanochat d575940
    nanochat/core_eval.py).

    Each task's data is shuffled with ``Random(1337)`` and cropped to ``max_per_task`` (-1: all) before few-shot
    demos are drawn. Returns ``{"results": {label: acc}, "centered_results": {label: centered},
    "core_metric": mean centered}``. ``verbose`` prints one line per task on rank 0, like nanochat.
    """
    specs = load_bundle(bundle_dir, skip_missing=skip_missing, tasks=tasks)
    if not specs:
        raise NanolitError(f"no CORE tasks to evaluate in {bundle_dir}; check core.yaml and the tasks argument")
    rank, _ = _rank_and_world()
    results, centered_results = {}, {}
    for spec in specs:
        t0 = time.time()
        data = load_task_data(bundle_dir, spec)
        random.Random(1337).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        results[spec.label] = evaluate_task(model, tokenizer, data, device, spec)
        centered_results[spec.label] = centered_accuracy(results[spec.label], spec.random_baseline)
        if verbose and rank == 0:
            print(f"Evaluating: {spec.label} ({spec.num_fewshot}-shot, type: {spec.task_type})... "
                  f"accuracy: {results[spec.label]:.4f} | centered: {centered_results[spec.label]:.4f} | "
                  f"time: {time.time() - t0:.2f}s", flush=True)
    core_metric = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric}


def write_core_csv(path: str | Path, results: dict) -> None:
    """Write ``evaluate_core``'s output as base_eval's CSV: Task, Accuracy, Centered, then a CORE row (nanochat d575940
    scripts/base_eval.py)."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
        for label, acc in results["results"].items():
            f.write(f"{label:<35}, {acc:<10.6f}, {results['centered_results'][label]:<10.6f}\n")
        f.write(f"{'CORE':<35}, {'':<10}, {results['core_metric']:<10.6f}\n")


# -----------------------------------------------------------------------------
# Download (nanochat d575940 nanochat/core_eval.py)

def download_core_bundle(base_dir: str | Path, url: str = EVAL_BUNDLE_URL) -> Path:
    """Make sure ``<base_dir>/eval_bundle/`` exists, downloading and unzipping ``url`` if it does not.

    A file lock lets only one process (e.g. one rank) download; the others wait and then find the folder. The
    zip is kept as ``<base_dir>/eval_bundle.zip``, as nanochat keeps it.
    """
    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    bundle_dir, zip_path = base_dir / "eval_bundle", base_dir / "eval_bundle.zip"
    if bundle_dir.exists():
        return bundle_dir
    with filelock.FileLock(str(base_dir / "eval_bundle.lock")):
        if bundle_dir.exists():  # another process finished while we waited for the lock
            return bundle_dir
        if not zip_path.exists():
            download_file(url, zip_path)
        # Unzip next to the destination, then rename: readers never see a half-extracted bundle.
        with tempfile.TemporaryDirectory(dir=base_dir, prefix=".eval_bundle.") as tmp:
            try:
                with zipfile.ZipFile(zip_path) as zf:
                    zf.extractall(tmp)
            except zipfile.BadZipFile:
                zip_path.unlink()
                raise NanolitError(f"{zip_path} from {url} is not a zip file; it was removed, run again") from None
            extracted = Path(tmp) / "eval_bundle"
            if not extracted.is_dir():
                zip_path.unlink()
                raise NanolitError(f"{zip_path} from {url} has no eval_bundle/ folder; it was removed, "
                                   "check the url")
            extracted.rename(bundle_dir)
    return bundle_dir

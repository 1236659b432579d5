"""Chat tasks: conversations built from each source's real schema, and nanochat's mid-training mixture (nanochat d575940
scripts/mid_train.py).

The same tasks feed mid-training, SFT (:mod:`nanolit.data.sft`) and the chat evaluation (:mod:`nanolit.eval.chat`).

Every task is a sliceable list of conversations ``{"messages": [...]}`` (see :mod:`nanolit.data.chat`).
The three Hugging Face datasets are read from local files first; the layout under ``<base>/mid_data/`` mirrors
each hub repository, so ``huggingface-cli download <repo> --repo-type dataset --local-dir <base>/mid_data/<name>``
puts the files where they are looked for:

=========  ==========================================  ======================================================
task       folder (under ``<base>/mid_data/``)          hub repository and row schema
=========  ==========================================  ======================================================
SmolTalk   ``smoltalk/data/``                          HuggingFaceTB/smol-smoltalk: ``messages`` [{role, content}]
MMLU       ``mmlu/auxiliary_train/``, ``mmlu/all/``    cais/mmlu: question, subject, choices[4], answer (0-3);
                                                       auxiliary_train rows are wrapped in a ``train`` struct
GSM8K      ``gsm8k/main/``                             openai/gsm8k: question, answer (``<<expr=result>>`` spans)
ARC        ``arc/ARC-Easy/``, ``arc/ARC-Challenge/``   allenai/ai2_arc: question, choices {text[], label[]},
                                                       answerKey (one of the labels)
HumanEval  ``humaneval/openai_humaneval/``             openai/openai_humaneval: task_id, prompt,
                                                       canonical_solution, test, entry_point (test split only)
=========  ==========================================  ======================================================

In a folder, a split is ``<split>.jsonl`` (one row object per line), ``<split>.parquet``, or the hub's shards
``<split>-*.parquet`` (read in name order). A missing split is loaded from the hub when the optional ``datasets``
package is installed (``pip install nanolit[hf]``). nanochat's two local files sit in ``<base>/`` itself:
``identity_conversations.jsonl`` and ``words_alpha.txt``.

Shuffling: the hub tasks apply the permutation that ``datasets.Dataset.shuffle(seed=42)`` draws (numpy
``default_rng(42).permutation(n)``), computed here locally, so with the same rows in the same order the sequence is
nanochat's. Rows are held in memory (pyarrow tables or raw JSONL lines), about the size of the uncompressed text.
"""
from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import re
import string
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from nanolit.common import NanolitError

# nanochat d575940 scripts/mid_train.py: hub datasets .shuffle(seed=42); TaskMixture and SimpleSpelling use
# random.Random(42)
SHUFFLE_SEED = 42
# nanochat d575940 scripts/mid_train.py: the spelling tasks' test examples draw from Random(index + this)
TEST_SEED_OFFSET = 10_000_000
MID_DATA_DIR = "mid_data"
IDENTITY_FILE = "identity_conversations.jsonl"
IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
WORDS_FILE = "words_alpha.txt"
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"

PathLike = str | os.PathLike

# Each hub dataset's local folder under <base>/mid_data/ (the table above).
TASK_FOLDERS = {
    "smoltalk": "smoltalk/data",
    "mmlu-auxiliary_train": "mmlu/auxiliary_train",
    "mmlu-all": "mmlu/all",
    "gsm8k-main": "gsm8k/main",
    "ARC-Easy": "arc/ARC-Easy",
    "ARC-Challenge": "arc/ARC-Challenge",
    "humaneval": "humaneval/openai_humaneval",
}


def task_folder(base_dir: PathLike, name: str) -> Path:
    """Where the local files of dataset ``name`` (a key of ``TASK_FOLDERS``) are looked for."""
    return Path(base_dir) / MID_DATA_DIR / TASK_FOLDERS[name]


class Task(ABC):
    """A list of conversations with a ``start:stop:step`` view over the underlying examples (nanochat's Task)."""

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise NanolitError(f"bad task slice start={start} stop={stop} step={step}; need 0<=start<=stop, step>=1")
        self.start, self.stop, self.step = start, stop, step

    @abstractmethod
    def num_examples(self) -> int:
        """Examples before slicing."""

    @abstractmethod
    def get_example(self, index: int) -> dict:
        """The conversation at physical (unsliced) ``index``."""

    @abstractmethod
    def source_of(self, index: int) -> str:
        """Where the example at physical ``index`` comes from, for error messages (file and line or row)."""

    def __len__(self) -> int:
        total = self.num_examples()
        # A stop past the end is capped, as nanochat does (e.g. MMLU val stop=5200 on a smaller file).
        stop = total if self.stop is None else min(self.stop, total)
        if self.start > stop:
            raise NanolitError(f"{type(self).__name__} start={self.start} is past its {total} examples; lower start")
        return (stop - self.start + self.step - 1) // self.step

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range for {len(self)} examples")
        return self.get_example(self.start + index * self.step)

    def where(self, index: int) -> str:
        """Where the conversation at (sliced) ``index`` comes from."""
        return self.source_of(self.start + index * self.step)


class TaskMixture(Task):
    """All conversations of ``tasks`` in one deterministic order: the (task, local index) map shuffled with
    ``random.Random(42)`` (nanochat d575940 scripts/mid_train.py). Passing a task twice takes it twice (identity
    conversations in mid_train)."""

    def __init__(self, tasks: Sequence[Task], start: int = 0, stop: int | None = None, step: int = 1):
        super().__init__(start, stop, step)
        self.tasks = list(tasks)
        self.ends = list(itertools.accumulate(len(task) for task in self.tasks))
        # Random.shuffle's swaps depend only on the list length, so shuffling global indices gives the same order
        # as nanochat shuffling its list of (task_idx, local_idx) pairs built task by task.
        self.order = list(range(self.ends[-1] if self.ends else 0))
        random.Random(SHUFFLE_SEED).shuffle(self.order)

    def num_examples(self) -> int:
        return len(self.order)

    def locate(self, index: int) -> tuple[int, int]:
        """(task index, index within that task) of the mixture's physical ``index``."""
        flat = self.order[index]
        task_idx = bisect.bisect_right(self.ends, flat)
        return task_idx, flat - (self.ends[task_idx - 1] if task_idx else 0)

    def get_example(self, index: int) -> dict:
        task_idx, local = self.locate(index)
        return self.tasks[task_idx][local]

    def source_of(self, index: int) -> str:
        task_idx, local = self.locate(index)
        return self.tasks[task_idx].where(local)


# ----------------------------------------------------------------------------------------------------------------
# Row sources: JSONL, parquet, or the hub. Each has len, [i] -> dict, and where(i) naming the record.


class _JsonlRows:
    """A JSONL file's rows, kept as raw lines and parsed on access (lighter than holding every row as dicts)."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []
        self.line_numbers: list[int] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    self.lines.append(line)
                    self.line_numbers.append(number)

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int):
        try:
            return json.loads(self.lines[i])
        except json.JSONDecodeError as e:
            raise NanolitError(f"{self.where(i)}: not valid JSON ({e}); fix or delete that line") from None

    def where(self, i: int) -> str:
        return f"{self.path}:{self.line_numbers[i]}"


class _ParquetRows:
    """Rows of parquet shards read in order (the hub's ``<split>-0000k-of-0000n.parquet`` files)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.tables = []
        for path in paths:
            try:
                self.tables.append(pq.read_table(path))
            except Exception as e:  # pyarrow raises several types for truncated or non-parquet files
                raise NanolitError(f"cannot read {path} as parquet ({e}); download it again") from None
        self.ends = list(itertools.accumulate(table.num_rows for table in self.tables))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def _locate(self, i: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.ends, i)
        return shard, i - (self.ends[shard - 1] if shard else 0)

    def __getitem__(self, i: int) -> dict:
        shard, row = self._locate(i)
        return self.tables[shard].slice(row, 1).to_pylist()[0]

    def where(self, i: int) -> str:
        shard, row = self._locate(i)
        return f"{self.paths[shard]} row {row}"


class _HubRows:
    """A split loaded with ``datasets.load_dataset`` (the optional ``nanolit[hf]`` extra)."""

    def __init__(self, repo: str, config: str | None, split: str, expected: PathLike | None):
        files = f"the hub's {split}-*.parquet files or a {split}.jsonl"
        if expected is None:
            local, fix = f"no local {repo} '{split}' split given", f"pass path=<a folder with {files}>"
        else:
            local, fix = f"no local {repo} '{split}' split in {expected}", f"put {files} there"
        try:
            import datasets  # optional extra: imported only when a split must come from the hub
        except ImportError:
            raise NanolitError(
                f"{local}: {fix}, or `pip install nanolit[hf]` to load it from the Hugging Face hub"
            ) from None
        try:
            self.ds = datasets.load_dataset(repo, config, split=split)
        except Exception as e:  # network, auth and cache errors all mean "use local files instead"
            raise NanolitError(f"{local}, and loading it from the Hugging Face hub failed ({e}): {fix}") from None
        self.name = f"{repo}:{config or 'default'}:{split}"

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[i]

    def where(self, i: int) -> str:
        return f"{self.name} row {i}"


def split_files(path: PathLike, split: str) -> list[Path]:
    """The files of ``split``: ``path`` itself if it is a file; in a folder ``<split>.jsonl``, ``<split>.parquet``
    or the shards ``<split>-*.parquet`` (first pattern that matches); [] if none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        for pattern in (f"{split}.jsonl", f"{split}.parquet", f"{split}-*.parquet"):
            files = sorted(path.glob(pattern))
            if files:
                return files
    return []


def _open_rows(path: PathLike | None, split: str, repo: str, config: str | None):
    """Local rows of ``split`` under ``path`` when present, else the hub split."""
    files = split_files(path, split) if path is not None else []
    if not files:
        return _HubRows(repo, config, split, path)
    if files[0].suffix == ".jsonl" and len(files) == 1:
        return _JsonlRows(files[0])
    if all(f.suffix == ".parquet" for f in files):
        return _ParquetRows(files)
    raise NanolitError(f"{files[0]} is neither .jsonl nor .parquet; convert the {repo} '{split}' split to one of them")


def _hf_permutation(n: int) -> list[int]:
    """The order ``datasets.Dataset.shuffle(seed=42)`` gives n rows: numpy ``default_rng(42).permutation(n)``."""
    return np.random.default_rng(SHUFFLE_SEED).permutation(n).tolist()


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise NanolitError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def _field(row, name: str, where: str):
    if not isinstance(row, dict) or name not in row:
        raise NanolitError(f"{where}: row has no {name!r} field; is this the right dataset and split?")
    return row[name]


class _HubTask(Task):
    """A task over one hub dataset's rows, shuffled at load like ``.shuffle(seed=42)``."""

    repo: str

    def __init__(self, rows, start: int, stop: int | None, step: int):
        super().__init__(start, stop, step)
        self.rows = rows
        self.order = _hf_permutation(len(rows))

    def num_examples(self) -> int:
        return len(self.rows)

    def row(self, index: int) -> dict:
        return self.rows[self.order[index]]

    def source_of(self, index: int) -> str:
        return f"{type(self).__name__} {self.rows.where(self.order[index])}"


class _SubsetTask(_HubTask):
    """A hub dataset with named subsets (its configs) and splits, both checked at construction."""

    subsets: tuple[str, ...]
    splits: tuple[str, ...]

    def __init__(
        self,
        subset: str,
        split: str,
        path: PathLike | None = None,
        start: int = 0,
        stop: int | None = None,
        step: int = 1,
    ):
        name = type(self).__name__
        _check_choice(f"{name} subset", subset, self.subsets)
        _check_choice(f"{name} split", split, self.splits)
        self.check_pair(subset, split)
        super().__init__(_open_rows(path, split, self.repo, subset), start, stop, step)

    def check_pair(self, subset: str, split: str) -> None:
        """Refuse a subset and split that exist but not together (none by default)."""


class SmolTalk(_HubTask):
    """HuggingFaceTB/smol-smoltalk conversations (nanochat d575940 scripts/mid_train.py; about 460K train, 24K test),
    used as they are."""

    repo = "HuggingFaceTB/smol-smoltalk"

    def __init__(
        self, split: str, path: PathLike | None = None, start: int = 0, stop: int | None = None, step: int = 1
    ):
        _check_choice("SmolTalk split", split, ("train", "test"))
        super().__init__(_open_rows(path, split, self.repo, None), start, stop, step)

    def get_example(self, index: int) -> dict:
        messages = _field(self.row(index), "messages", self.source_of(index))
        if not isinstance(messages, list):
            raise NanolitError(f"{self.source_of(index)}: 'messages' is not a list of {{role, content}} objects")
        return {"messages": messages}


def render_multiple_choice(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """nanochat d575940 scripts/mid_train.py's MC prompt. The letter follows its choice after ``=`` with no space, so it
    is the same token as the assistant's one-letter answer."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


class MMLU(_SubsetTask):
    """cais/mmlu as multiple choice chat: auxiliary_train (about 100K ARC/MC_TEST/OBQA/RACE questions) or "all"."""

    repo = "cais/mmlu"
    letters = ("A", "B", "C", "D")
    subsets = ("all", "auxiliary_train")
    splits = ("train", "validation", "dev", "test")

    def check_pair(self, subset: str, split: str) -> None:
        if subset == "auxiliary_train" and split != "train":
            raise NanolitError(f"MMLU auxiliary_train has only a 'train' split, not {split!r}")

    def get_example(self, index: int) -> dict:
        where = self.source_of(index)
        row = self.row(index)
        # cais/mmlu wraps every auxiliary_train row in a "train" struct (nanochat unwraps it with .map).
        if isinstance(row, dict) and isinstance(row.get("train"), dict):
            row = row["train"]
        question, choices, answer = (_field(row, name, where) for name in ("question", "choices", "answer"))
        if not isinstance(choices, list) or len(choices) != len(self.letters):
            raise NanolitError(f"{where}: MMLU rows need {len(self.letters)} choices; fix the row")
        if not isinstance(answer, int) or not 0 <= answer < len(self.letters):
            raise NanolitError(f"{where}: MMLU answer {answer!r} is not a choice index 0-3; fix the row")
        messages = [
            {"role": "user", "content": render_multiple_choice(question, self.letters, choices)},
            {"role": "assistant", "content": self.letters[answer]},
        ]
        return {"messages": messages, "subject": row.get("subject"), "letters": self.letters}


# A calculator call in a GSM8K answer: <<48/2=24>> (nanochat splits on non-empty spans).
_CALCULATOR_SPAN = re.compile(r"(<<[^>]+>>)")


def gsm8k_parts(answer: str) -> list[dict]:
    """nanochat d575940 scripts/mid_train.py: an answer as assistant parts. Text between ``<<...>>`` spans is "text"; in
    a span, what precedes the last ``=`` is a "python" part and what follows it the "python_output" part (no ``=``:
    empty output)."""
    parts = []
    # re.split with one capture group alternates text, span, text, ..., text.
    for i, piece in enumerate(_CALCULATOR_SPAN.split(answer)):
        if i % 2 == 0:
            parts.append({"type": "text", "text": piece})
            continue
        expr, equals, result = piece[2:-2].rpartition("=")
        if not equals:
            expr, result = result, ""
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
    return parts


class GSM8K(_SubsetTask):
    """openai/gsm8k grade-school math (about 7.5K train, 1.3K test) with calculator tool calls."""

    repo = "openai/gsm8k"
    subsets = ("main", "socratic")
    splits = ("train", "test")

    def get_example(self, index: int) -> dict:
        where = self.source_of(index)
        row = self.row(index)
        question, answer = _field(row, "question", where), _field(row, "answer", where)
        if not isinstance(answer, str):
            raise NanolitError(f"{where}: GSM8K answer is not a string; fix the row")
        reply = gsm8k_parts(answer)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


class ARC(_SubsetTask):
    """allenai/ai2_arc grade-school science questions as multiple choice chat (ARC-Easy about 2.3K train and 2.4K
    test rows, ARC-Challenge 1.1K and 1.2K). The choices keep their own labels (a few rows use 1-4 or A-E)."""

    repo = "allenai/ai2_arc"
    subsets = ("ARC-Easy", "ARC-Challenge")
    splits = ("train", "validation", "test")

    def get_example(self, index: int) -> dict:
        where = self.source_of(index)
        row = self.row(index)
        question, choices, answer = (_field(row, name, where) for name in ("question", "choices", "answerKey"))
        letters, texts = _field(choices, "label", where), _field(choices, "text", where)
        if not isinstance(letters, list) or not isinstance(texts, list) or len(letters) != len(texts):
            raise NanolitError(f"{where}: ARC choices need equally long 'label' and 'text' lists; fix the row")
        if answer not in letters:
            raise NanolitError(f"{where}: ARC answerKey {answer!r} is not one of the labels {letters}; fix the row")
        messages = [
            {"role": "user", "content": render_multiple_choice(question, letters, texts)},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": tuple(letters)}


class HumanEval(_HubTask):
    """openai/openai_humaneval: 164 Python functions to complete. The user gives the prompt (signature and
    docstring), the assistant the prompt followed by the canonical body; ``test`` and ``entry_point`` are kept to
    check a completion (:mod:`nanolit.eval.chat`)."""

    repo = "openai/openai_humaneval"

    def __init__(self, path: PathLike | None = None, start: int = 0, stop: int | None = None, step: int = 1):
        super().__init__(_open_rows(path, "test", self.repo, None), start, stop, step)

    def get_example(self, index: int) -> dict:
        where = self.source_of(index)
        row = self.row(index)
        prompt, solution, test, entry_point = (
            _field(row, name, where) for name in ("prompt", "canonical_solution", "test", "entry_point"))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{prompt}\n{solution}"}]
        return {"messages": messages, "test": test, "entry_point": entry_point}


class CustomJSON(Task):
    """Conversations from a JSONL file whose every line is a JSON list of messages alternating user, assistant
    (nanochat's identity_conversations.jsonl). Checked at load; kept in file order (nanochat does not shuffle it)."""

    def __init__(self, path: PathLike, start: int = 0, stop: int | None = None, step: int = 1):
        super().__init__(start, stop, step)
        self.path = Path(path)
        if not self.path.is_file():
            raise NanolitError(f"{self.path} not found; write one JSON list of messages per line there")
        self.rows = _JsonlRows(self.path)
        self.conversations = [self._checked(i) for i in range(len(self.rows))]

    def _checked(self, i: int) -> list[dict]:
        messages = self.rows[i]
        if not isinstance(messages, list) or len(messages) < 2:
            raise NanolitError(f"{self.rows.where(i)}: expected a JSON list of at least 2 messages")
        for k, message in enumerate(messages):
            role = "user" if k % 2 == 0 else "assistant"
            ok = isinstance(message, dict) and message.get("role") == role and isinstance(message.get("content"), str)
            if not ok:
                raise NanolitError(
                    f"{self.rows.where(i)}: message {k} must be {{\"role\": \"{role}\", \"content\": <string>}} "
                    "(messages alternate user, assistant)"
                )
        return messages

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]}

    def source_of(self, index: int) -> str:
        return f"CustomJSON {self.rows.where(index)}"


def load_words(path: PathLike) -> list[str]:
    """One word per line (dwyl ``words_alpha.txt``; its CRLF endings are stripped), blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise NanolitError(f"word list {path} not found; download it: curl -L -o {path} {WORDS_URL}")
    with open(path, encoding="utf-8") as f:
        words = [word for word in (line.strip() for line in f) if word]
    if not words:
        raise NanolitError(f"word list {path} has no words; download it again from {WORDS_URL}")
    return words


class _SpellingTask(Task):
    """``size`` generated examples; example i draws from its own ``Random(i)`` (test split: i + 10,000,000)."""

    shuffle_words = False

    def __init__(
        self,
        words_file: PathLike,
        size: int = 1000,
        split: str = "train",
        start: int = 0,
        stop: int | None = None,
        step: int = 1,
    ):
        super().__init__(start, stop, step)
        _check_choice(f"{type(self).__name__} split", split, ("train", "test"))
        if size < 0:
            raise NanolitError(f"{type(self).__name__} size {size} is negative; pass the number of examples wanted")
        self.words_file, self.size, self.split = Path(words_file), size, split
        self.words = load_words(words_file)
        if self.shuffle_words:
            random.Random(SHUFFLE_SEED).shuffle(self.words)

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)

    def source_of(self, index: int) -> str:
        return f"{type(self).__name__}({self.split}) example {index} from {self.words_file}"


class SimpleSpelling(_SpellingTask):
    """"Spell the word: {word}" -> "{word}:{w,o,r,d}" (nanochat d575940 scripts/mid_train.py), words in
    Random(42)-shuffled order, as nanochat."""

    # nanochat shuffles this task's word list so it draws different words than SpellingBee for the same index.
    shuffle_words = True

    def get_example(self, index: int) -> dict:
        word = self.rng(index).choice(self.words)
        return {
            "messages": [
                {"role": "user", "content": f"Spell the word: {word}"},
                {"role": "assistant", "content": f"{word}:{','.join(word)}"},
            ]
        }


# SpellingBee questions in several languages. nanochat's exact template list is not part of the spec; these are
# nanolit's own wording, so SpellingBee conversations differ in text from nanochat's (nanochat d575940
# scripts/mid_train.py; same structure).
SPELLING_BEE_TEMPLATES = (
    "How many {letter} are there in {word}",
    "How many times does the letter {letter} occur in {word}",
    "Count the letter {letter} in the word {word}",
    "What is the number of {letter} in {word}",
    "How often does {letter} show up in {word}",
    "Tell me how many {letter} the word {word} has",
    "In {word}, how many times do you see {letter}",
    "Could you count every {letter} in {word}",
    "How many {letter} letters does {word} contain",
    "Give me the count of {letter} for the word {word}",
    "Cuántas veces aparece la letra {letter} en {word}",
    "Cuenta cuántas {letter} tiene la palabra {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    "Compte le nombre de {letter} dans le mot {word}",
    "Wie viele {letter} enthält das Wort {word}",
    "Zähl bitte die {letter} im Wort {word}",
    "Quante volte compare la lettera {letter} in {word}",
    "Quantas vezes a letra {letter} aparece em {word}",
    "Hoe vaak komt de letter {letter} voor in {word}",
    "Сколько раз буква {letter} встречается в слове {word}",
    "{word}这个单词里有几个字母{letter}",
    "{word}という単語に{letter}はいくつありますか",
    "{word}에는 {letter}가 몇 번 들어 있나요",
)


class SpellingBee(_SpellingTask):
    """"How many {letter} in {word}" questions answered by a manual count, then a python check (nanochat d575940
    scripts/mid_train.py).

    The assistant spells the word, counts hit by hit in text, calls ``'{word}'.count('{letter}')``, gets its
    output, and ends with ``#### {count}``. Words are used in file order. The wording is nanolit's own.
    """

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        # Mostly a letter of the word; sometimes any letter, so that zero is a possible answer.
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        question = rng.choice(SPELLING_BEE_TEMPLATES)
        if rng.random() < 0.3:
            question = question.lower()
        letter_quote, word_quote = rng.choice(("", "'", '"')), rng.choice(("", "'", '"'))
        question = question.format(
            letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}"
        )
        if rng.random() < 0.5:
            question += "?"
        reply = _bee_answer(word, letter)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


def _bee_answer(word: str, letter: str) -> list[dict]:
    lines = [
        f"I need to count how many times '{letter}' appears in '{word}'. I will do it by hand first.\n\n",
        f"Spelled out:\n{word}:{','.join(word)}\n\nGoing through the letters one by one:\n",
    ]
    hits = 0
    for position, char in enumerate(word, 1):
        # No space between position and letter: " a" and "a" are different tokens.
        if char == letter:
            hits += 1
            lines.append(f"{position}:{char} yes, count={hits}\n")
        else:
            lines.append(f"{position}:{char}\n")
    lines.append(f"\nBy hand I get {hits}.")
    count = word.count(letter)
    return [
        {"type": "text", "text": "".join(lines)},
        {"type": "text", "text": "\n\nLet me verify it with Python:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython agrees: {count}.\n\n#### {count}"},
    ]


def _require(path: Path, url: str) -> Path:
    if not path.is_file():
        raise NanolitError(f"{path} not found; download it: curl -L -o {path} {url}")
    return path


def build_mid_mixture(base_dir: PathLike, split: str) -> TaskMixture:
    """nanochat's mid_train mixture (nanochat d575940 scripts/mid_train.py) from ``<base_dir>`` (layout in this module's
    docstring).

    train: SmolTalk train, MMLU auxiliary_train, GSM8K main train, identity conversations twice,
    SimpleSpelling 200,000 and SpellingBee 80,000. val: SmolTalk test, MMLU all test[:5200], GSM8K main test[:420].
    """
    try:
        return _mid_mixture(Path(base_dir), split)
    except NanolitError as e:
        raise NanolitError(f"mid-training data is missing: {e}") from None


def _mid_mixture(base: Path, split: str) -> TaskMixture:
    if split == "train":
        identity = _require(base / IDENTITY_FILE, IDENTITY_URL)
        words = _require(base / WORDS_FILE, WORDS_URL)
        tasks = [
            SmolTalk("train", task_folder(base, "smoltalk")),
            MMLU("auxiliary_train", "train", task_folder(base, "mmlu-auxiliary_train")),
            GSM8K("main", "train", task_folder(base, "gsm8k-main")),
            CustomJSON(identity),
            CustomJSON(identity),
            SimpleSpelling(words, size=200_000, split="train"),
            SpellingBee(words, size=80_000, split="train"),
        ]
    elif split == "val":
        tasks = [
            SmolTalk("test", task_folder(base, "smoltalk")),
            MMLU("all", "test", task_folder(base, "mmlu-all"), stop=5200),
            GSM8K("main", "test", task_folder(base, "gsm8k-main"), stop=420),
        ]
    else:
        raise NanolitError(f"mid split {split!r} is not 'train' or 'val'")
    return TaskMixture(tasks)

"""A small chat dataset in the real mid-training formats, built offline from what ships with Python.

``nanolit quickstart`` continues into mid-training on a machine with no internet, so it writes, under a base dir,
every file nanochat's mid mixture reads (the layout of :mod:`nanolit.data.tasks`), each in its dataset's schema:

* SmolTalk (``messages``): "What does ``json.dumps`` do?" answered with the first paragraph of its docstring;
* MMLU (question, subject, choices, answer): which stdlib module defines a function, among four;
* GSM8K (question, answer with ``<<expr=result>>`` calculator spans and ``#### result``): small arithmetic stories;
* the identity conversations: who the model is;
* a word list for the spelling tasks: the words of those docstrings;
* ARC (question, choices {text, label}, answerKey), for SFT and chat evaluation: ARC-Easy asks what a function does
  (its docstring among four), ARC-Challenge which function a docstring describes.

Docstrings are read from the stdlib's sources with ``ast`` (nothing is imported or run), and every random choice
uses a seeded ``random.Random``, so the same Python gives the same files.
"""
from __future__ import annotations

import ast
import json
import random
import re
from pathlib import Path

from nanolit.common import NanolitError, atomic_write
from nanolit.data.corpus import stdlib_trees
from nanolit.data.tasks import IDENTITY_FILE, WORDS_FILE, task_folder

SEED = 1234
TEST_FRACTION = 0.1


def stdlib_functions(stdlib: Path | None = None) -> list[tuple[str, str, str]]:
    """``(module, function, first docstring paragraph)`` of the stdlib's public top-level functions."""
    found = []
    for path, tree in stdlib_trees("*.py", stdlib):  # top-level modules: short, well-known names
        if path.stem.startswith("_") or path.stem in ("this", "antigravity"):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                first = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip() if doc else ""
                if 20 <= len(first) <= 400:
                    found.append((path.stem, node.name, first))
    return found


def smoltalk_rows(functions: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    asks = ["What does `{m}.{f}` do?", "Explain the function {f} from the {m} module.",
            "In Python, what is `{m}.{f}` for?", "Can you tell me what {m}.{f}() does?"]
    rows = []
    for module, name, doc in functions:
        question = rng.choice(asks).format(m=module, f=name)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": f"`{module}.{name}`: {doc}"}]})
    return rows


def mmlu_rows(functions: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    modules = sorted({m for m, _, _ in functions})
    rows = []
    for module, name, _ in functions:
        others = rng.sample([m for m in modules if m != module], 3)
        choices = others + [module]
        rng.shuffle(choices)
        rows.append({"question": f"Which module of the Python standard library defines the function `{name}`?",
                     "subject": "computer_science", "choices": choices, "answer": choices.index(module)})
    return rows


def arc_rows(functions: list[tuple[str, str, str]], rng: random.Random, challenge: bool) -> list[dict]:
    """Four-way questions in allenai/ai2_arc's schema; the three wrong choices are other functions'."""
    rows = []
    for i, (module, name, doc) in enumerate(functions):
        others = rng.sample([f for f in functions if f[1] != name], 3)
        options = others + [(module, name, doc)]
        rng.shuffle(options)
        if challenge:
            question = f"Which Python function is described as follows: {doc}"
            texts = [f"{m}.{f}" for m, f, _ in options]
        else:
            question = f"What does the Python function `{module}.{name}` do?"
            texts = [d for _, _, d in options]
        labels = ["A", "B", "C", "D"]
        rows.append({"id": f"{'challenge' if challenge else 'easy'}-{i}", "question": question,
                     "choices": {"text": texts, "label": labels},
                     "answerKey": labels[[f for _, f, _ in options].index(name)]})
    return rows


def gsm8k_row(rng: random.Random) -> dict:
    """A two-step arithmetic story, worked with nanochat's ``<<expr=result>>`` calculator spans."""
    who = rng.choice(["Ada", "Guido", "Grace", "Linus", "Barbara", "Ken"])
    thing = rng.choice(["apples", "books", "coins", "stamps", "marbles", "cards"])
    a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(1, 30)
    total = a * b
    left = total - c if total > c else total + c
    verb, op = ("gives away", "-") if total > c else ("finds", "+")
    question = (f"{who} buys {a} boxes of {thing} with {b} {thing} in each box. Then {who} {verb} {c} {thing}. "
                f"How many {thing} does {who} have now?")
    answer = (f"{who} buys {a} * {b} = <<{a}*{b}={total}>>{total} {thing}.\n"
              f"After that {who} has {total} {op} {c} = <<{total}{op}{c}={left}>>{left} {thing}.\n#### {left}")
    return {"question": question, "answer": answer}


IDENTITY = [
    ("Who are you?", "I am a small language model trained with nanolit, a PyTorch Lightning version of nanochat."),
    ("What is your name?", "I am a nanolit model: a small GPT trained on Python's own documentation."),
    ("Who made you?", "I was trained by someone running `nanolit quickstart` on their own computer."),
    ("What can you do?", "I know a little about the Python standard library, spelling and simple arithmetic."),
]


def words(functions: list[tuple[str, str, str]]) -> list[str]:
    found = {w.lower() for _, _, doc in functions for w in re.findall(r"[A-Za-z]{3,12}", doc)}
    return sorted(found)


def _write_jsonl(path: Path, rows: list) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def write_offline_chat_data(base_dir: str | Path, gsm8k_examples: int = 2000) -> dict[str, int]:
    """Write the mid-training files under ``base_dir``; returns how many rows each got."""
    base = Path(base_dir)
    functions = stdlib_functions()
    if len(functions) < 100:
        raise NanolitError("this Python installation has too few stdlib sources to build the offline chat data "
                           "from; download the real mid-training data instead (see the README)")
    rng = random.Random(SEED)
    rng.shuffle(functions)
    cut = int(len(functions) * (1 - TEST_FRACTION))
    train, test = functions[:cut], functions[cut:]
    smol_train, smol_test = smoltalk_rows(train, rng), smoltalk_rows(test, rng)
    _write_jsonl(task_folder(base, "smoltalk") / "train.jsonl", smol_train)
    _write_jsonl(task_folder(base, "smoltalk") / "test.jsonl", smol_test)
    # cais/mmlu: auxiliary_train rows sit in a "train" struct, the test rows are flat
    _write_jsonl(task_folder(base, "mmlu-auxiliary_train") / "train.jsonl",
                 [{"train": row} for row in mmlu_rows(train, rng)])
    _write_jsonl(task_folder(base, "mmlu-all") / "test.jsonl", mmlu_rows(test, rng))
    gsm = [gsm8k_row(rng) for _ in range(gsm8k_examples)]
    cut = int(gsm8k_examples * (1 - TEST_FRACTION))
    _write_jsonl(task_folder(base, "gsm8k-main") / "train.jsonl", gsm[:cut])
    _write_jsonl(task_folder(base, "gsm8k-main") / "test.jsonl", gsm[cut:])
    _write_jsonl(base / IDENTITY_FILE, [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                                       for q, a in IDENTITY])
    vocabulary = words(functions)
    with atomic_write(base / WORDS_FILE) as tmp:
        tmp.write_text("".join(w + "\r\n" for w in vocabulary), encoding="utf-8")  # dwyl's file has CRLF endings
    # ARC takes its random draws last, so every file above is the same with or without it
    for subset, challenge in (("ARC-Easy", False), ("ARC-Challenge", True)):
        _write_jsonl(task_folder(base, subset) / "train.jsonl", arc_rows(train, rng, challenge))
        _write_jsonl(task_folder(base, subset) / "test.jsonl", arc_rows(test, rng, challenge))
    return {"smoltalk": len(smol_train) + len(smol_test), "mmlu": len(functions), "gsm8k": gsm8k_examples,
            "identity": len(IDENTITY), "words": len(vocabulary), "arc": 2 * len(functions)}


__all__ = ["write_offline_chat_data"]

"""The embedded default corpus: English documentation that ships with every Python installation.

Used by ``nanolit quickstart`` so a fresh machine with no internet can train on real text: the stdlib's
docstrings (read from source with ``ast``, so no module is imported or run) and the ``pydoc_data`` topics
(the language reference sections behind ``help()``): about 2.3 MB of text in ~560 documents on CPython 3.11.
"""
from __future__ import annotations

import ast
import json
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

from nanolit.common import NanolitError, atomic_write

MIN_DOC_CHARS = 200  # one-line docstrings carry little text and mostly teach the model "Return x."


def pydoc_topics() -> Iterator[str]:
    """The language-reference topics of ``help()``, one document each."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for name in sorted(topics):
        yield topics[name].strip()


def stdlib_trees(pattern: str = "**/*.py", stdlib: Path | None = None) -> Iterator[tuple[Path, ast.Module]]:
    """``(path, syntax tree)`` of the stdlib's sources matching ``pattern``, read with ``ast`` (nothing is imported or
    run); tests, site-packages and files that do not parse are skipped."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob(pattern)):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old sources
                yield path, ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue


def stdlib_docstrings(stdlib: Path | None = None) -> Iterator[str]:
    """One document per stdlib source file: its module, class and function docstrings joined by blank lines."""
    for _, tree in stdlib_trees(stdlib=stdlib):
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        docs = [d.strip() for n in nodes if (d := ast.get_docstring(n))]
        text = "\n\n".join(docs)
        if len(text) >= MIN_DOC_CHARS:
            yield text


def write_default_corpus(path: str | Path) -> Path:
    """Write the embedded corpus as JSONL (``{"text": ...}`` per line) to ``path``, atomically."""
    path = Path(path)
    count = 0
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in list(pydoc_topics()) + list(stdlib_docstrings()):
            f.write(json.dumps({"text": doc}) + "\n")
            count += 1
    if count < 2:
        raise NanolitError("this Python installation has no stdlib sources or pydoc topics to build the "
                           "default corpus from; pass your own text with `nanolit data from-text FILES`")
    return path

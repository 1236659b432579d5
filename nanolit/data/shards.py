"""Pretraining shards on disk: nanochat's parquet layout, downloading it, building it from local text (nanochat d575940
nanochat/dataset.py).

A shard is a parquet file with one string column ``text`` (one document per row), row groups of 1024 documents,
zstd. Files sort by name; the last one is the validation split, every other one is training data.
"""
from __future__ import annotations

import itertools
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanolit.common import NanolitError, atomic_write, download_file

# nanochat d575940 nanochat/dataset.py: karpathy/fineweb-edu-100b-shuffle on the Hugging Face hub, shards 0..1822.
DATA_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822
DATA_DIR = "base_data"
# The 2026 recipe's corpus (nanochat 92d63d4 nanochat/dataset.py): ClimbMix-400B, shards 0..6542, in its own folder.
CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_MAX_SHARD = 6542
CLIMBMIX_DIR = "base_data_climbmix"
TEXT_FORMATS = (".txt", ".jsonl", ".parquet")


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard_00042.parquet``."""
    return f"shard_{index:05d}.parquet"


def list_parquet_files(data_dir: str | os.PathLike) -> list[Path]:
    """Every ``*.parquet`` in ``data_dir`` sorted by name (nanochat's order); [] if the folder is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))


def data_dir_2026(base_dir: str | os.PathLike) -> Path:
    """The 2026 recipe's shard folder: ``<base>/base_data_climbmix``, else the FineWeb-Edu ``<base>/base_data``
    (nanochat 92d63d4 falls back the same way, with a warning to download ClimbMix and retrain the tokenizer)."""
    base = Path(base_dir)
    return base / CLIMBMIX_DIR if (base / CLIMBMIX_DIR).is_dir() else base / DATA_DIR


def train_val_split(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train files, [val file]): the last file is the validation shard, all the others train (nanochat d575940
    nanochat/dataset.py)."""
    if len(files) < 2:
        where = f" in {files[0].parent}" if files else ""
        raise NanolitError(
            f"found {len(files)} parquet shard(s){where} but need at least 2 (the last one is the val shard); "
            "run `nanolit data download -n 2` or `nanolit data from-text`"
        )
    return list(files[:-1]), [files[-1]]


# ------------------------------------------------------------------------------------------------------------------
# Reading


def _open_text_parquet(path: Path) -> pq.ParquetFile:
    """Open a parquet file that must have a ``text`` column."""
    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise NanolitError(f"{path} is not a readable parquet file ({e}); delete or replace it") from None
    if "text" not in file.schema_arrow.names:
        raise NanolitError(f"{path} has no 'text' column; it needs one string column 'text' holding the documents")
    kind = file.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise NanolitError(f"{path}'s text column holds {kind}, not strings; write the shards from text with "
                           "`nanolit data from-text`")
    return file


def check_shards_have_text(files: list[Path]) -> None:
    """One line for shards whose documents are all empty: a run would train on nothing but ``<|bos|>``.

    Looks at the first row group of the first train shard and of the val shard (a broken conversion empties them
    all; reading every shard would cost a pass over the data).
    """
    for path in {files[0], files[-1]}:
        if not any(read_texts(path, 0)):
            raise NanolitError(f"{path} holds no text (its first documents are all empty), so there is nothing to "
                               "train or evaluate on; rebuild the shards from real text")


def read_texts(path: str | os.PathLike, row_group: int) -> list[str]:
    """The documents of one row group of a shard."""
    return _open_text_parquet(Path(path)).read_row_group(row_group, columns=["text"]).column("text").to_pylist()


def iter_row_groups(
    files: list[Path], start: tuple[int, int] = (0, 0), rank: int = 0, world_size: int = 1
) -> Iterator[tuple[int, int, list[str]]]:
    """One pass over this rank's row groups, from ``start = (pq_idx, rg_idx)``: yields ``(pq_idx, rg_idx, texts)``.

    Ranks stride the row groups of every file, ``rg = rank, rank + W, ...`` (nanochat d575940 nanochat/dataloader.py);
    ``start``'s ``rg_idx`` must be one
    of this rank's. A start past a file's last row group just moves on to the next file.
    """
    pq_start, rg_start = start
    if rg_start % world_size != rank:
        raise ValueError(f"row group {rg_start} does not belong to rank {rank} of {world_size}")
    for pq_idx in range(pq_start, len(files)):
        first = rg_start if pq_idx == pq_start else rank
        shard = _open_text_parquet(files[pq_idx])
        for rg_idx in range(first, shard.num_row_groups, world_size):
            yield pq_idx, rg_idx, shard.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()


# ------------------------------------------------------------------------------------------------------------------
# Downloading


def download_shards(
    num_shards: int,
    data_dir: str | os.PathLike,
    workers: int = 4,
    base_url: str = DATA_URL,
    attempts: int = 5,
    backoff: float = 1.0,
    on_done: Callable[[Path], None] | None = None,
    max_shard: int = MAX_SHARD,
) -> list[Path]:
    """Download shards ``0..num_shards-1`` (``-1``: all ``max_shard + 1``) into ``data_dir`` in parallel; returns their
    paths. ClimbMix (the 2026 corpus): ``base_url=CLIMBMIX_URL, max_shard=CLIMBMIX_MAX_SHARD``.

    Like ``nanochat.dataset`` (nanochat d575940 nanochat/dataset.py): files already present are skipped, each download
    goes to a temporary file renamed on success, and a failed one is retried up to ``attempts`` times, waiting
    ``backoff * 2**attempt`` s between tries. ``on_done(path)`` is called as each shard becomes available (for
    progress display).
    """
    if num_shards == -1:
        num_shards = max_shard + 1
    if num_shards < 1:
        raise NanolitError(f"-n {num_shards} asks for no shards; pass a count >= 1 (2 or more to train), or -1 for all")
    num_shards = min(num_shards, max_shard + 1)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)

    def fetch(index: int) -> Path:
        path = data_dir / shard_name(index)
        _download(f"{base_url.rstrip('/')}/{shard_name(index)}", path, attempts, backoff)
        if on_done is not None:
            on_done(path)
        return path

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fetch, i) for i in range(num_shards)]
    failed = [(shard_name(i), f.exception()) for i, f in enumerate(futures) if f.exception() is not None]
    if failed:
        names = ", ".join(name for name, _ in failed[:5]) + (", ..." if len(failed) > 5 else "")
        raise NanolitError(
            f"{len(failed)} of {num_shards} shards failed to download ({names}); first error: {failed[0][1]}; "
            "run the command again to fetch the missing ones"
        )
    return [f.result() for f in futures]


def _download(url: str, path: Path, attempts: int, backoff: float) -> None:
    """Fetch ``url`` to ``path`` atomically unless a finished file is already there."""
    if path.is_file() and path.stat().st_size > 0:
        return
    download_file(url, path, attempts, backoff)


# ------------------------------------------------------------------------------------------------------------------
# Building shards from local text


def write_shards_from_text(
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    chars_per_shard: int = 250_000_000,
    row_group_size: int = 1024,
    val_fraction: float = 0.01,
    txt_doc_chars: int = 20_000,
) -> list[Path]:
    """Turn local text into nanochat-layout shards in ``out_dir`` (which must hold no shards yet); returns them.

    Inputs are files or folders (searched recursively) of:
      * ``.txt``: one document per file; a file longer than ``txt_doc_chars`` is cut into documents at the first
        blank line after every ``txt_doc_chars`` characters (at any line break past twice that);
      * ``.jsonl``: one JSON object per line, its string field ``text`` is a document;
      * ``.parquet``: its string column ``text``, one document per row.
    Empty or whitespace-only documents are dropped. Documents keep their input order.

    Split rule: the validation shard (the last file) gets the corpus's final documents, as many as it takes to reach
    ``val_fraction`` of all characters, capped at ``chars_per_shard``, and at least one document. The documents
    before them fill training shards, each closed once it holds ``chars_per_shard`` characters and a multiple of
    ``row_group_size`` documents (nanochat d575940 nanochat/dataset.py; nanochat's rule); the last training shard takes
    the remainder. So any corpus
    of 2 or more documents gives at least one training shard and the validation shard.
    Parquet settings are nanochat's: single column ``text``, zstd level 3, no dictionary, no statistics.
    """
    if row_group_size < 1 or chars_per_shard < 1 or not 0 <= val_fraction < 1:
        raise NanolitError(
            f"bad shard settings (row_group_size={row_group_size}, chars_per_shard={chars_per_shard}, "
            f"val_fraction={val_fraction}); sizes must be >= 1 and val_fraction in [0, 1)"
        )
    files = _expand_inputs(inputs)
    out_dir = Path(out_dir)
    if list_parquet_files(out_dir):
        raise NanolitError(f"{out_dir} already holds parquet shards; pick an empty folder or delete them first")
    num_docs, num_val = _count_val_docs(files, chars_per_shard, val_fraction, txt_doc_chars)
    docs = _iter_documents(files, txt_doc_chars)
    numbered = _number_shards(docs, num_docs - num_val, chars_per_shard, row_group_size)
    paths = []
    for index, group in itertools.groupby(numbered, key=lambda item: item[0]):
        paths.append(out_dir / shard_name(index))
        _write_shard(paths[-1], (doc for _, doc in group), row_group_size)
    return paths


def _number_shards(
    docs: Iterator[str], num_train: int, chars_per_shard: int, row_group_size: int
) -> Iterator[tuple[int, str]]:
    """``(shard index, doc)`` for every document: train shards close by nanochat's rule, the rest is the val shard."""
    shard = chars = count = 0
    for i, doc in enumerate(docs):
        close = count > 0 and chars >= chars_per_shard and count % row_group_size == 0
        if i == num_train or (i < num_train and close):
            shard, chars, count = shard + 1, 0, 0
        yield shard, doc
        chars += len(doc)
        count += 1


def _write_shard(path: Path, docs: Iterator[str], row_group_size: int) -> None:
    """One parquet shard with nanochat's settings (nanochat d575940 nanochat/dataset.py), written atomically."""
    with atomic_write(path) as tmp, pq.ParquetWriter(
        tmp, pa.schema([("text", pa.string())]),
        compression="zstd", compression_level=3, use_dictionary=False, write_statistics=False,
    ) as writer:
        rows: list[str] = []
        for doc in docs:
            rows.append(doc)
            if len(rows) == row_group_size:
                writer.write_table(pa.table({"text": rows}), row_group_size=row_group_size)
                rows = []
        if rows:
            writer.write_table(pa.table({"text": rows}), row_group_size=row_group_size)


def _expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Input paths with folders replaced by their supported files (sorted); NanolitError for anything unusable."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_FORMATS)
        elif not path.exists():
            raise NanolitError(f"input {path} does not exist")
        elif path.suffix not in TEXT_FORMATS:
            raise NanolitError(f"input {path} is not a {', '.join(TEXT_FORMATS)} file; convert it to one of those")
        else:
            files.append(path)
    if not files:
        raise NanolitError(f"no {', '.join(TEXT_FORMATS)} files in the inputs; pass text files or folders holding them")
    return files


def _count_val_docs(
    files: list[Path], chars_per_shard: int, val_fraction: float, txt_doc_chars: int
) -> tuple[int, int]:
    """(number of documents, number of them at the end that form the validation shard): a first pass over inputs."""
    num_docs = total_chars = 0
    tail: deque[int] = deque()  # lengths of the last documents, just enough to cover chars_per_shard
    tail_chars = 0
    for doc in _iter_documents(files, txt_doc_chars):
        num_docs += 1
        total_chars += len(doc)
        tail.append(len(doc))
        tail_chars += len(doc)
        while tail_chars - tail[0] >= chars_per_shard:
            tail_chars -= tail.popleft()
    if num_docs < 2:
        raise NanolitError(
            f"the inputs hold {num_docs} non-empty document(s); need at least 2 (one to train on, one for validation)"
        )
    target = min(chars_per_shard, max(1, val_fraction * total_chars))
    num_val = val_chars = 0
    while val_chars < target and num_val < num_docs - 1:
        num_val += 1
        val_chars += tail[-num_val]
    return num_docs, num_val


def _iter_documents(files: list[Path], txt_doc_chars: int) -> Iterator[str]:
    """Non-empty documents of every input file, in order."""
    readers = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    for path in files:
        reader = readers[path.suffix]
        for doc in reader(path, txt_doc_chars) if path.suffix == ".txt" else reader(path):
            if doc.strip():
                yield doc


def _txt_documents(path: Path, txt_doc_chars: int) -> Iterator[str]:
    """A .txt file as documents of about ``txt_doc_chars`` characters cut at paragraph breaks (one if it is short)."""
    lines: list[str] = []
    size = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                lines.append(line)
                size += len(line)
                if size >= txt_doc_chars and (not line.strip() or size >= 2 * txt_doc_chars):
                    yield "".join(lines)
                    lines, size = [], 0
    except UnicodeDecodeError as e:
        raise NanolitError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8") from None
    if lines:
        yield "".join(lines)


def _jsonl_documents(path: Path) -> Iterator[str]:
    """The ``text`` field of every line of a .jsonl file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanolitError(f"{path}:{lineno} is not valid JSON ({e}); fix or remove that line") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise NanolitError(f"{path}:{lineno} has no string field 'text'; every line needs {{\"text\": ...}}")
            yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    """The ``text`` column of a parquet file, in row order."""
    for batch in _open_text_parquet(path).iter_batches(columns=["text"]):
        for text in batch.column("text").to_pylist():
            if not isinstance(text, str):
                raise NanolitError(f"{path} has a non-string 'text' value ({text!r}); the column must hold strings")
            yield text

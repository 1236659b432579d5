"""Shards on disk: listing and splitting, downloading from a local HTTP server, building from local text (nanochat
d575940 nanochat/dataset.py)."""
from __future__ import annotations

import http.server
import json
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanolit.common import NanolitError
from nanolit.data.shards import (
    DATA_URL,
    MAX_SHARD,
    download_shards,
    iter_row_groups,
    list_parquet_files,
    read_texts,
    shard_name,
    train_val_split,
    write_shards_from_text,
)


def test_constants_match_nanochat():
    assert shard_name(7) == "shard_00007.parquet"
    assert MAX_SHARD == 1822
    assert f"{DATA_URL}/{shard_name(MAX_SHARD)}" == (
        "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_01822.parquet"
    )


def test_list_and_split(tmp_path):
    assert list_parquet_files(tmp_path / "missing") == []
    for name in ["shard_00002.parquet", "shard_00000.parquet", "notes.txt", ".shard_00003.parquet.x1.tmp"]:
        (tmp_path / name).write_bytes(b"x")
    files = list_parquet_files(tmp_path)
    assert [f.name for f in files] == ["shard_00000.parquet", "shard_00002.parquet"]
    train, val = train_val_split(files)
    assert train == files[:1] and val == files[1:]
    with pytest.raises(NanolitError, match=r"need at least 2.*nanolit data download -n 2"):
        train_val_split(files[:1])


# ------------------------------------------------------------------------------------------------------------------
# Building shards from text


def _read_shards(paths: list[Path]) -> list[list[str]]:
    return [pq.read_table(p).column("text").to_pylist() for p in paths]


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def test_from_text_layout_follows_nanochat_rule(tmp_path):
    docs = [f"document {i} " + "word " * (i % 7 + 1) for i in range(100)]
    out = tmp_path / "out"
    paths = write_shards_from_text([_jsonl(tmp_path / "a.jsonl", docs)], out, chars_per_shard=300, row_group_size=4,
                                   val_fraction=0.05)
    assert paths == list_parquet_files(out) and [p.name for p in paths] == [shard_name(i) for i in range(len(paths))]
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in paths]  # no temp files left
    shards = _read_shards(paths)
    assert [d for shard in shards for d in shard] == docs
    # Every training shard but the last closes at the first multiple of 4 docs with >= 300 chars.
    for shard in shards[:-2]:
        assert len(shard) % 4 == 0 and sum(map(len, shard)) >= 300
        assert sum(map(len, shard[:-4])) < 300
    # Val = the fewest final docs reaching 5% of all characters.
    total = sum(map(len, docs))
    val = shards[-1]
    assert sum(map(len, val)) >= 0.05 * total > sum(map(len, val[1:]))
    meta = pq.ParquetFile(paths[0]).metadata
    assert meta.schema.to_arrow_schema().names == ["text"]
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4] * (len(shards[0]) // 4)
    column = meta.row_group(0).column(0)
    assert column.compression == "ZSTD" and not column.is_stats_set


def test_from_text_caps_val_at_one_shard(tmp_path):
    docs = [f"doc {i} " * 5 for i in range(40)]
    paths = write_shards_from_text([_jsonl(tmp_path / "a.jsonl", docs)], tmp_path / "out", chars_per_shard=100,
                                   row_group_size=2, val_fraction=0.5)
    val = _read_shards(paths)[-1]
    assert sum(map(len, val)) >= 100 > sum(map(len, val[1:]))


def test_from_text_small_corpus_gets_two_shards(tmp_path):
    paths = write_shards_from_text([_jsonl(tmp_path / "a.jsonl", ["one", "two"])], tmp_path / "out")
    assert _read_shards(paths) == [["one"], ["two"]]
    with pytest.raises(NanolitError, match="1 non-empty document"):
        write_shards_from_text([_jsonl(tmp_path / "b.jsonl", ["one", "  "])], tmp_path / "out2")


def test_from_text_txt_parquet_and_folders(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a_short.txt").write_text("A short file is one document.\n\nEven with paragraphs.\n")
    paragraphs = [f"paragraph {i} " + "x" * 30 + "\n" for i in range(6)]
    (src / "b_long.txt").write_text("\n".join(paragraphs))
    (src / "c_noblank.txt").write_text("".join(f"line {i} " + "y" * 40 + "\n" for i in range(6)))
    pq.write_table(pa.table({"id": [1, 2], "text": ["from parquet 1", "from parquet 2"]}), src / "sub" / "d.parquet")
    (src / "ignored.csv").write_text("text\nnot read\n")
    paths = write_shards_from_text([src], tmp_path / "out", txt_doc_chars=100, val_fraction=0.0)
    docs = [d for shard in _read_shards(paths) for d in shard]
    assert docs[0] == (src / "a_short.txt").read_text()
    # b_long: paragraphs of 44-45 chars; a document ends at the first blank line once it has >= 100 chars.
    long_docs = docs[1:3]
    assert "".join(long_docs) == (src / "b_long.txt").read_text()
    assert long_docs[0] == "\n".join(paragraphs[:3]) + "\n"
    # c_noblank: no blank lines, so documents are cut at a line break once they reach 2 * 100 chars.
    lines = (src / "c_noblank.txt").read_text().splitlines(keepends=True)
    assert docs[3:5] == ["".join(lines[:5]), "".join(lines[5:])]
    assert docs[5:] == ["from parquet 1", "from parquet 2"]
    assert len(_read_shards(paths)[-1]) == 1  # val_fraction 0 still gives one val document


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n\n{"title": "no text"}\n', r"bad\.jsonl:3 has no string field 'text'"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": nope}\n', r"bad\.jsonl:2 is not valid JSON"),
        ("bad.jsonl", '{"text": 5}\n', r"bad\.jsonl:1 has no string field 'text'"),
        ("bad.csv", "text\nhello\n", r"bad\.csv is not a \.txt, \.jsonl, \.parquet file"),
        ("bad.txt", b"\xff\xfe caf\xe9", r"bad\.txt is not UTF-8"),
    ],
)
def test_from_text_bad_input(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    good = _jsonl(tmp_path / "good.jsonl", ["a", "b", "c"])
    with pytest.raises(NanolitError, match=message):
        write_shards_from_text([good, path], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_from_text_bad_paths(tmp_path):
    with pytest.raises(NanolitError, match=r"missing\.txt does not exist"):
        write_shards_from_text([tmp_path / "missing.txt"], tmp_path / "out")
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "nocol.parquet")
    with pytest.raises(NanolitError, match=r"nocol\.parquet has no 'text' column"):
        write_shards_from_text([tmp_path / "nocol.parquet"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanolitError, match="no .txt, .jsonl, .parquet files"):
        write_shards_from_text([tmp_path / "empty"], tmp_path / "out")
    good = _jsonl(tmp_path / "good.jsonl", ["a", "b"])
    write_shards_from_text([good], tmp_path / "out")
    with pytest.raises(NanolitError, match="already holds parquet shards"):
        write_shards_from_text([good], tmp_path / "out")


def test_iter_row_groups_strides_by_rank(tmp_path):
    docs = [f"d{i}" for i in range(40)]
    files = write_shards_from_text([_jsonl(tmp_path / "a.jsonl", docs)], tmp_path / "out", chars_per_shard=30,
                                   row_group_size=4, val_fraction=0.0)[:-1]
    num_rgs = [pq.ParquetFile(f).num_row_groups for f in files]
    assert len(files) >= 2 and max(num_rgs) >= 3
    seen = {rank: [(p, r) for p, r, _ in iter_row_groups(files, (0, rank), rank, 2)] for rank in (0, 1)}
    everything = [(p, r) for p, n in enumerate(num_rgs) for r in range(n)]
    assert sorted(seen[0] + seen[1]) == everything
    assert all(r % 2 == rank for rank in (0, 1) for _, r in seen[rank])
    texts = [t for _, _, ts in iter_row_groups(files, (0, 0), 0, 1) for t in ts]
    assert texts == docs[: len(texts)]
    assert read_texts(files[1], 1) == pq.ParquetFile(files[1]).read_row_group(1).column("text").to_pylist()
    assert list(iter_row_groups(files, (1, 2), 0, 2))[0][:2] == (1, 2)
    with pytest.raises(ValueError, match="does not belong to rank 0"):
        next(iter_row_groups(files, (0, 1), 0, 2))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(NanolitError, match=r"broken\.parquet is not a readable parquet file"):
        next(iter_row_groups([tmp_path / "broken.parquet"]))


# ------------------------------------------------------------------------------------------------------------------
# Downloading (against a local server)


class _ShardServer:
    """http.server on 127.0.0.1 serving ``files``; ``fail_first`` names answer 500 once, ``always_fail`` always."""

    def __init__(self, files: dict[str, bytes], fail_first=(), always_fail=()):
        self.requests: Counter = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                if name in always_fail or (name in fail_first and server.requests[name] == 1):
                    self.send_error(500)
                elif name not in files:
                    self.send_error(404)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(files[name])))
                    self.end_headers()
                    self.wfile.write(files[name])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _parquet_bytes(tmp_path: Path, i: int) -> bytes:
    path = tmp_path / f"src{i}.parquet"
    pq.write_table(pa.table({"text": [f"shard {i} doc {j}" for j in range(5)]}), path)
    return path.read_bytes()


def test_download_retries_and_skips_complete_files(tmp_path):
    files = {shard_name(i): _parquet_bytes(tmp_path, i) for i in range(3)}
    data = tmp_path / "base_data"
    done = []
    with _ShardServer(files, fail_first={shard_name(1)}) as server:
        paths = download_shards(3, data, workers=2, base_url=server.url, backoff=0.0, on_done=done.append)
        assert paths == [data / name for name in files]
        assert all(p.read_bytes() == files[p.name] for p in paths)
        assert sorted(done) == paths
        assert server.requests == Counter({shard_name(0): 1, shard_name(1): 2, shard_name(2): 1})
        assert list_parquet_files(data) == paths and len(list(data.iterdir())) == 3
        download_shards(3, data, base_url=server.url, backoff=0.0)
        assert sum(server.requests.values()) == 4  # nothing fetched again
        (data / shard_name(2)).write_bytes(b"")  # an empty file is not complete
        download_shards(3, data, base_url=server.url, backoff=0.0)
        assert server.requests[shard_name(2)] == 2 and (data / shard_name(2)).read_bytes() == files[shard_name(2)]


def test_download_failure_names_shard_and_leaves_no_temp(tmp_path):
    files = {shard_name(i): _parquet_bytes(tmp_path, i) for i in range(3)}
    data = tmp_path / "base_data"
    with _ShardServer(files, always_fail={shard_name(2)}) as server:
        with pytest.raises(NanolitError, match=r"1 of 3 shards failed.*shard_00002\.parquet.*after 3 attempt\(s\)"):
            download_shards(3, data, base_url=server.url, attempts=3, backoff=0.0)
        assert server.requests[shard_name(2)] == 3
        assert sorted(p.name for p in data.iterdir()) == [shard_name(0), shard_name(1)]
        with pytest.raises(NanolitError, match=r"2 of 4 shards failed .*shard_00002\.parquet, shard_00003\.parquet"):
            download_shards(4, data, base_url=server.url, attempts=3, backoff=0.0)
        assert server.requests[shard_name(3)] == 1  # a missing file (404) is not retried
    with pytest.raises(NanolitError, match="-n 0 asks for no shards"):
        download_shards(0, data)

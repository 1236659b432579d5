"""Tokenizer: nanochat's fixture tokenizer loads safely and encodes like nanochat; training and saving (nanochat d575940
nanochat/tokenizer.py)."""
from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanolit.common import NanolitError
from nanolit.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    _iter_training_text,
    evaluate_compression,
    get_tokenizer,
    train_tokenizer,
)

# A few KB of varied English: enough pairs for the ~40 merges a 300-token vocab needs.
TRAIN_TEXT = [
    f"Document {i}: the quick brown fox jumps over the lazy dog while {i * 7} hens sing. "
    f"Tokenizers learn merges of frequent byte pairs; they're trained on text like this, isn't it so? "
    f"Ünïcödé stays bytes: café, naïve, 東京 {i % 13}.\n"
    for i in range(40)
]
SAMPLE = "Hello world! It's 2025: héllo, 東京, emoji \U0001F600, numbers 12345 and\ttabs\n\nnewlines."


@pytest.fixture(scope="module")
def fixture_tok(nanochat_d2) -> Tokenizer:
    return Tokenizer.from_directory(nanochat_d2 / "tokenizer")


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(TRAIN_TEXT, vocab_size=300)


def test_split_pattern_and_specials_match_spec():
    assert SPLIT_PATTERN == (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
        r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
    )
    assert SPECIAL_TOKENS == ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                              "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                              "<|output_end|>"]


def test_fixture_tokenizer_encodes_like_nanochat(fixture_tok, expected_d2):
    assert fixture_tok.get_vocab_size() == 4096
    assert fixture_tok.get_bos_token_id() == 4087
    assert fixture_tok.get_special_tokens() == SPECIAL_TOKENS
    assert [fixture_tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(4087, 4096))
    bos = fixture_tok.get_bos_token_id()
    assert fixture_tok.encode(expected_d2["prompt"], prepend=bos) == expected_d2["prompt_ids"]
    assert fixture_tok.decode(fixture_tok.encode(SAMPLE)) == SAMPLE
    assert fixture_tok.id_to_token(bos) == "<|bos|>"


def test_fixture_token_bytes_used_as_saved(fixture_tok, nanochat_d2):
    saved = torch.load(nanochat_d2 / "tokenizer" / "token_bytes.pt", weights_only=True)
    tb = fixture_tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (4096,)
    assert torch.equal(tb, saved)
    # nanochat's str round trip counts the lone byte 0x80 (id 128) as U+FFFD = 3 bytes (nanochat d575940
    # scripts/tok_train.py; caveat): kept as is.
    assert tb[128].item() == 3


def test_special_strings_in_text_are_plain_text(fixture_tok):
    ids = fixture_tok.encode("<|bos|>")
    assert fixture_tok.get_bos_token_id() not in ids
    assert fixture_tok.decode(ids) == "<|bos|>"


def test_prepend_append_by_id_and_by_string(fixture_tok):
    body = fixture_tok.encode("hello there")
    bos, end = fixture_tok.get_bos_token_id(), fixture_tok.encode_special("<|assistant_end|>")
    assert fixture_tok.encode("hello there", prepend=bos, append=end) == [bos, *body, end]
    assert fixture_tok.encode("hello there", prepend="<|bos|>", append="<|assistant_end|>") == [bos, *body, end]
    assert fixture_tok.encode("hello there", append=7) == [*body, 7]


def test_batch_encode_equals_single_encodes(fixture_tok):
    texts = [SAMPLE, "", "second document", *TRAIN_TEXT[:5]]
    batch = fixture_tok.encode(texts, prepend="<|bos|>", num_threads=2)
    assert batch == [fixture_tok.encode(t, prepend="<|bos|>") for t in texts]


def test_bad_inputs_raise(fixture_tok, tmp_path):
    with pytest.raises(NanolitError, match="unknown special token"):
        fixture_tok.encode("x", prepend="<|eos|>")
    with pytest.raises(TypeError):
        fixture_tok.encode(b"bytes")
    with pytest.raises(NanolitError, match="nanolit tokenizer train"):
        Tokenizer.from_directory(tmp_path / "missing")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(NanolitError, match="system"):
        Tokenizer.from_directory(folder)
    assert not marker.exists()


def test_pickles_that_are_not_trained_encodings_are_refused(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    # Encoding pickled by registered name: tiktoken would look it up (and download it); nanochat never writes this.
    (folder / "tokenizer.pkl").write_bytes(b"ctiktoken.core\nEncoding\n)\x81Vcl100k_base\nb.")
    with pytest.raises(NanolitError, match="trained tiktoken Encoding"):
        Tokenizer.from_directory(folder)
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps({"name": "x"}))
    with pytest.raises(NanolitError, match="trained tiktoken Encoding"):
        Tokenizer.from_directory(folder)
    (folder / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(NanolitError, match="not a readable tokenizer pickle"):
        Tokenizer.from_directory(folder)


def test_trained_tokenizer_layout_and_true_token_bytes(tiny_tok):
    assert tiny_tok.get_vocab_size() == 300
    assert [tiny_tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(291, 300))
    assert tiny_tok.get_bos_token_id() == 291
    assert tiny_tok.enc.name == "rustbpe"
    enc = tiny_tok.enc
    true = [0 if i >= 291 else len(enc.decode_single_token_bytes(i)) for i in range(300)]
    assert tiny_tok.token_bytes().tolist() == true
    assert tiny_tok.token_bytes()[0x80].item() == 1  # a lone continuation byte is 1 byte, not 3
    assert max(true) > 1  # merges happened
    assert tiny_tok.decode(tiny_tok.encode(SAMPLE)) == SAMPLE


def test_save_load_round_trip(tiny_tok, tmp_path):
    tiny_tok.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]
    loaded = Tokenizer.from_directory(tmp_path / "tok")
    assert loaded.get_vocab_size() == 300
    assert torch.equal(loaded.token_bytes(), tiny_tok.token_bytes())
    ids = range(300)
    assert [loaded.enc.decode_single_token_bytes(i) for i in ids] == [
        tiny_tok.enc.decode_single_token_bytes(i) for i in ids
    ]
    assert loaded.encode(TRAIN_TEXT) == tiny_tok.encode(TRAIN_TEXT)


def test_folder_without_token_bytes_gets_true_lengths(fixture_tok, tmp_path):
    folder = tmp_path / "tok"
    fixture_tok.save(folder)
    (folder / "token_bytes.pt").unlink()
    tb = Tokenizer.from_directory(folder).token_bytes()
    assert tb[128].item() == 1 and tb[4087:].tolist() == [0] * 9


def test_saved_pickle_is_byte_identical_to_nanochats(fixture_tok, nanochat_d2, tmp_path):
    fixture_tok.save(tmp_path)
    assert (tmp_path / "tokenizer.pkl").read_bytes() == (nanochat_d2 / "tokenizer" / "tokenizer.pkl").read_bytes()


def test_training_refuses_impossible_vocab():
    with pytest.raises(NanolitError, match="too small"):
        Tokenizer.train_from_iterator(TRAIN_TEXT, vocab_size=200)
    with pytest.raises(NanolitError, match="smaller vocab_size"):
        Tokenizer.train_from_iterator(["ab ab ab"], vocab_size=400)


def _write_shard(path, docs):
    pq.write_table(pa.table({"text": docs}), path, row_group_size=4)


def test_training_text_uses_train_shards_crops_and_stops(tmp_path):
    data = tmp_path / "base_data"
    data.mkdir()
    _write_shard(data / "shard_00000.parquet", [f"a{i}" * 10 for i in range(6)])
    _write_shard(data / "shard_00001.parquet", ["b" * 50, "c" * 50])
    _write_shard(data / "shard_00002.parquet", ["VAL"] * 3)
    docs = list(_iter_training_text(data, max_chars=10**9, doc_cap=8))
    assert docs == [(f"a{i}" * 10)[:8] for i in range(6)] + ["b" * 8, "c" * 8]
    # 8 chars per doc: after the 3rd doc the total (24) exceeds 20, so the 3rd is the last one yielded.
    assert len(list(_iter_training_text(data, max_chars=20, doc_cap=8))) == 3


def test_train_tokenizer_saves_into_base_dir(tmp_path):
    data = tmp_path / "base_data"
    data.mkdir()
    _write_shard(data / "shard_00000.parquet", TRAIN_TEXT)
    _write_shard(data / "shard_00001.parquet", ["validation only"])
    tok = train_tokenizer(tmp_path, vocab_size=300)
    loaded = get_tokenizer(tmp_path)
    assert loaded.get_vocab_size() == 300
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanolitError, match="at least 2"):
        train_tokenizer(tmp_path / "empty", vocab_size=300)


def test_get_tokenizer_reads_base_dir(nanochat_d2, tmp_path):
    (tmp_path / "tokenizer").symlink_to(nanochat_d2 / "tokenizer")
    assert get_tokenizer(tmp_path).get_bos_token_id() == 4087


def test_evaluate_compression(fixture_tok):
    texts = [SAMPLE, "plain ascii text"]
    stats = evaluate_compression(fixture_tok, texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(fixture_tok.encode(t)) for t in texts)
    assert stats == {"bytes": n_bytes, "tokens": n_tokens, "ratio": n_bytes / n_tokens}
    with pytest.raises(NanolitError):
        evaluate_compression(fixture_tok, [""])


def test_token_bytes_rules_give_both_generations_tables(nanochat_d2, nanochat_2026):
    """The same tokenizer.pkl: nanochat d575940's saved table is the "str" rule, 92d63d4's the "raw" rule."""
    old = torch.load(nanochat_d2 / "tokenizer" / "token_bytes.pt", weights_only=True)
    new = torch.load(nanochat_2026 / "tokenizer" / "token_bytes.pt", weights_only=True)
    raw = Tokenizer.from_directory(nanochat_d2 / "tokenizer", token_bytes_rule="raw").token_bytes()
    via_str = Tokenizer.from_directory(nanochat_2026 / "tokenizer", token_bytes_rule="str").token_bytes()
    assert torch.equal(raw, new) and torch.equal(via_str, old)
    assert (raw != via_str).sum() == 132 and raw[128] == 1 and via_str[128] == 3
    assert torch.equal(Tokenizer.from_directory(nanochat_d2 / "tokenizer").token_bytes(), old)  # "saved" is as before
    with pytest.raises(NanolitError, match="token_bytes_rule"):
        Tokenizer.from_directory(nanochat_d2 / "tokenizer", token_bytes_rule="utf8")


def test_val_bytes_under_each_rule(nanochat_2026, expected_2026):
    """expected.json counts the target bytes of the 32 best-fit val batches under both rules."""
    from nanolit.data.bestfit import bestfit_val_batches

    batches = bestfit_val_batches([nanochat_2026 / "base_data" / "shard_00004.parquet"],
                                  Tokenizer.from_directory(nanochat_2026 / "tokenizer"), 4, 256, 32768)
    for rule, key in (("raw", "head_token_bytes"), ("str", "d575940_token_bytes")):
        table = Tokenizer.from_directory(nanochat_2026 / "tokenizer", token_bytes_rule=rule).token_bytes()
        assert sum(int(table[y].sum()) for _, y in batches) == expected_2026["val_bytes"][key]

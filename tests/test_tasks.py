"""Mid-training tasks (nanochat d575940 scripts/mid_train.py): each source's real schema from local files, rendering,
shuffles, the mixture."""
from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanolit.common import NanolitError
from nanolit.data.tasks import (
    GSM8K,
    MMLU,
    CustomJSON,
    SimpleSpelling,
    SmolTalk,
    SpellingBee,
    TaskMixture,
    build_mid_mixture,
    gsm8k_parts,
    load_words,
    render_multiple_choice,
)

# numpy.random.default_rng(42).permutation(n): the order datasets.Dataset.shuffle(seed=42) gives n rows.
HF_SHUFFLE_7 = [3, 2, 6, 4, 1, 5, 0]
HF_SHUFFLE_5 = [4, 2, 3, 1, 0]


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def smoltalk_row(i: int) -> dict:
    # HuggingFaceTB/smol-smoltalk: messages [{content, role}] plus a source column
    messages = [{"content": f"question {i}", "role": "user"}, {"content": f"answer {i}", "role": "assistant"}]
    if i % 3 == 0:
        messages.insert(0, {"content": "You are helpful.", "role": "system"})
    return {"messages": messages, "source": "smol-magpie-ultra"}


def mmlu_row(i: int) -> dict:
    return {"question": f"What is {i}?", "subject": "miscellaneous",
            "choices": [f"c{i}a", f"c{i}b", f"c{i}c", f"c{i}d"], "answer": i % 4}


def gsm8k_row(i: int) -> dict:
    return {"question": f"Tom has {i} apples and buys 3. How many?",
            "answer": f"He has {i}+3 = <<{i}+3={i + 3}>>{i + 3} apples.\n#### {i + 3}"}


WORDS = ["apple", "banana", "cherry", "kiwi", "strawberry", "a"]


def make_base(root: Path, smol_train=7, smol_test=4, aux=5, mmlu_test=6, gsm_train=3, gsm_test=5, identity=2) -> Path:
    """A base dir with every mid source in its real schema: parquet shards, JSONL splits and the two files."""
    data = root / "mid_data"
    rows = [smoltalk_row(i) for i in range(smol_train)]
    write_parquet(data / "smoltalk/data/train-00000-of-00002.parquet", rows[:3])
    write_parquet(data / "smoltalk/data/train-00001-of-00002.parquet", rows[3:])
    write_parquet(data / "smoltalk/data/test-00000-of-00001.parquet", [smoltalk_row(100 + i) for i in range(smol_test)])
    # cais/mmlu auxiliary_train wraps every row in a "train" struct
    write_parquet(data / "mmlu/auxiliary_train/train-00000-of-00001.parquet",
                  [{"train": mmlu_row(i)} for i in range(aux)])
    write_jsonl(data / "mmlu/all/test.jsonl", [mmlu_row(50 + i) for i in range(mmlu_test)])
    write_jsonl(data / "gsm8k/main/train.jsonl", [gsm8k_row(i) for i in range(gsm_train)])
    write_parquet(data / "gsm8k/main/test.parquet", [gsm8k_row(20 + i) for i in range(gsm_test)])
    write_jsonl(root / "identity_conversations.jsonl", [
        [{"role": "user", "content": f"who are you {i}"}, {"role": "assistant", "content": "I am nanochat."}]
        for i in range(identity)
    ])
    (root / "words_alpha.txt").write_bytes("".join(w + "\r\n" for w in WORDS).encode())
    return root


@pytest.fixture
def base(tmp_path) -> Path:
    return make_base(tmp_path)


@pytest.fixture
def no_hub(monkeypatch):
    """Make `import datasets` fail, as on an install without the [hf] extra."""
    monkeypatch.setitem(sys.modules, "datasets", None)


def test_smoltalk_reads_hub_shards_in_order_and_shuffles_like_hf(base):
    task = SmolTalk("train", base / "mid_data/smoltalk/data")
    assert len(task) == 7
    for i, row_idx in enumerate(HF_SHUFFLE_7):
        assert task[i] == {"messages": smoltalk_row(row_idx)["messages"]}
    # row 3 is the first row of the second shard
    assert task.where(0).endswith("train-00001-of-00002.parquet row 0")
    assert [task[i] for i in range(7)] == [SmolTalk("train", base / "mid_data/smoltalk/data")[i] for i in range(7)]


def test_multiple_choice_prompt_is_spec_exact():
    prompt = render_multiple_choice("2+2?", ("A", "B", "C", "D"), ["3", "4", "5", "22"])
    assert prompt == (
        "Multiple Choice question: 2+2?\n- 3=A\n- 4=B\n- 5=C\n- 22=D\n"
        "\nRespond only with the letter of the correct answer."
    )


def test_mmlu_auxiliary_train_unwraps_rows_and_answers_with_a_letter(base):
    task = MMLU("auxiliary_train", "train", base / "mid_data/mmlu/auxiliary_train")
    assert len(task) == 5
    row = mmlu_row(HF_SHUFFLE_5[0])
    example = task[0]
    assert example["messages"] == [
        {"role": "user", "content": render_multiple_choice(row["question"], "ABCD", row["choices"])},
        {"role": "assistant", "content": "ABCD"[row["answer"]]},
    ]
    assert example["subject"] == "miscellaneous" and example["letters"] == ("A", "B", "C", "D")


def test_mmlu_jsonl_split_with_stop_capped(base):
    folder = base / "mid_data/mmlu/all"
    assert len(MMLU("all", "test", folder, stop=4)) == 4
    assert len(MMLU("all", "test", folder, stop=5200)) == 6  # stop past the end is capped, as nanochat
    assert ":" in MMLU("all", "test", folder).where(0)  # JSONL records are named file:line


def test_mmlu_bad_row_names_the_record(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{**mmlu_row(0), "choices": ["x", "y", "z"]}])
    with pytest.raises(NanolitError, match=r"test\.jsonl:1: MMLU rows need 4 choices"):
        MMLU("all", "test", tmp_path)[0]
    with pytest.raises(NanolitError, match="only a 'train' split"):
        MMLU("auxiliary_train", "test", tmp_path)


def test_gsm8k_calculator_spans_become_tool_parts():
    answer = "Half is 48/2 = <<48/2=24>>24.\nIn all <<24+48=72>>72 and <<a=b=3>>.\nOdd <<5>>.\n#### 72"
    assert gsm8k_parts(answer) == [
        {"type": "text", "text": "Half is 48/2 = "},
        {"type": "python", "text": "48/2"}, {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24.\nIn all "},
        {"type": "python", "text": "24+48"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 and "},
        {"type": "python", "text": "a=b"}, {"type": "python_output", "text": "3"},  # split on the last "="
        {"type": "text", "text": ".\nOdd "},
        {"type": "python", "text": "5"}, {"type": "python_output", "text": ""},  # no "=": empty output
        {"type": "text", "text": ".\n#### 72"},
    ]


def test_gsm8k_task_from_jsonl_and_parquet(base):
    train = GSM8K("main", "train", base / "mid_data/gsm8k/main")
    test = GSM8K("main", "test", base / "mid_data/gsm8k/main", stop=420)
    assert (len(train), len(test)) == (3, 5)
    row = gsm8k_row(20 + HF_SHUFFLE_5[0])
    assert test[0]["messages"] == [
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": gsm8k_parts(row["answer"])},
    ]


def test_custom_json_keeps_file_order_and_checks_lines(tmp_path):
    good = [[{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(3)]
    write_jsonl(tmp_path / "id.jsonl", good)
    task = CustomJSON(tmp_path / "id.jsonl")
    assert [task[i]["messages"] for i in range(3)] == good
    write_jsonl(tmp_path / "bad.jsonl", [good[0], [good[0][0], good[0][0]]])
    with pytest.raises(NanolitError, match=r"bad\.jsonl:2: message 1 must be"):
        CustomJSON(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("[{\n")
    with pytest.raises(NanolitError, match=r"broken\.jsonl:1: not valid JSON"):
        CustomJSON(tmp_path / "broken.jsonl")


def test_task_slicing_start_stop_step(tmp_path):
    rows = [[{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": "a"}] for i in range(10)]
    write_jsonl(tmp_path / "c.jsonl", rows)
    task = CustomJSON(tmp_path / "c.jsonl", start=2, stop=9, step=3)
    assert len(task) == 3
    assert [task[i]["messages"][0]["content"] for i in range(3)] == ["u2", "u5", "u8"]
    with pytest.raises(IndexError):
        task[3]
    with pytest.raises(NanolitError, match="bad task slice"):
        CustomJSON(tmp_path / "c.jsonl", start=5, stop=2)


def test_load_words_strips_crlf_and_blank_lines(tmp_path):
    (tmp_path / "w.txt").write_bytes(b"apple\r\n\r\nbanana\r\n")
    assert load_words(tmp_path / "w.txt") == ["apple", "banana"]


def test_simple_spelling_is_spec_exact(base):
    words_file = base / "words_alpha.txt"
    shuffled = list(WORDS)
    random.Random(42).shuffle(shuffled)
    train, test = SimpleSpelling(words_file, size=20), SimpleSpelling(words_file, size=20, split="test")
    assert len(train) == 20
    for i in range(20):
        word = random.Random(i).choice(shuffled)
        assert train[i]["messages"] == [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]
        assert test[i]["messages"][0]["content"] == f"Spell the word: {random.Random(10_000_000 + i).choice(shuffled)}"


def test_spelling_bee_counts_by_hand_then_in_python(base):
    task = SpellingBee(base / "words_alpha.txt", size=200)
    saw_zero = False
    for i in range(len(task)):
        user, assistant = task[i]["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        parts = assistant["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        word, letter = parts[2]["text"].split("'")[1], parts[2]["text"].split("'")[3]
        assert parts[2]["text"] == f"'{word}'.count('{letter}')"
        assert word in WORDS and word in user["content"] and letter in user["content"]
        count = word.count(letter)
        saw_zero |= count == 0
        assert parts[3]["text"] == str(count)
        assert parts[4]["text"].endswith(f"#### {count}")
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert parts[0]["text"].count(" yes, count=") == count
    assert saw_zero  # about 10% of questions ask for a letter picked from the whole alphabet
    again = SpellingBee(base / "words_alpha.txt", size=200)
    test = SpellingBee(base / "words_alpha.txt", size=200, split="test")
    assert [again[i] for i in range(50)] == [task[i] for i in range(50)]
    assert [test[i] for i in range(50)] != [task[i] for i in range(50)]


def test_task_mixture_order_is_nanochats(tmp_path):
    tasks = []
    for name, n in (("a", 3), ("b", 2), ("c", 4)):
        rows = [[{"role": "user", "content": f"{name}{i}"}, {"role": "assistant", "content": "x"}] for i in range(n)]
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        tasks.append(CustomJSON(tmp_path / f"{name}.jsonl"))
    mixture = TaskMixture(tasks + [tasks[1]])  # a task passed twice is taken twice
    # nanochat: every (task_idx, local_idx) pair in task order, then random.Random(42).shuffle
    pairs = [(t, i) for t, task in enumerate(mixture.tasks) for i in range(len(task))]
    random.Random(42).shuffle(pairs)
    assert len(mixture) == 11
    assert [mixture[i] for i in range(11)] == [mixture.tasks[t][i] for t, i in pairs]
    assert mixture.where(0) == mixture.tasks[pairs[0][0]].where(pairs[0][1])


def test_build_mid_mixture_composition(base):
    train = build_mid_mixture(base, "train")
    names = [type(t).__name__ for t in train.tasks]
    assert names == ["SmolTalk", "MMLU", "GSM8K", "CustomJSON", "CustomJSON", "SimpleSpelling", "SpellingBee"]
    assert [len(t) for t in train.tasks] == [7, 5, 3, 2, 2, 200_000, 80_000]
    assert len(train) == 7 + 5 + 3 + 2 * 2 + 200_000 + 80_000
    val = build_mid_mixture(base, "val")
    assert [type(t).__name__ for t in val.tasks] == ["SmolTalk", "MMLU", "GSM8K"]
    assert (val.tasks[1].stop, val.tasks[2].stop) == (5200, 420)
    assert len(val) == 4 + 6 + 5
    again = build_mid_mixture(base, "train")
    assert [again[i] for i in range(200)] == [train[i] for i in range(200)]
    with pytest.raises(NanolitError, match="not 'train' or 'val'"):
        build_mid_mixture(base, "test")


@pytest.mark.parametrize("missing, hint", [
    ("identity_conversations.jsonl", "karpathy-public.s3"),
    ("words_alpha.txt", "dwyl/english-words"),
])
def test_missing_local_file_says_how_to_get_it(base, missing, hint):
    (base / missing).unlink()
    with pytest.raises(NanolitError, match=hint) as info:
        build_mid_mixture(base, "train")
    assert str(base / missing) in str(info.value)


@pytest.mark.parametrize("folder, split", [("smoltalk/data", "train"), ("mmlu/all", "val"), ("gsm8k/main", "val")])
def test_missing_hub_source_without_datasets(base, no_hub, folder, split):
    for f in (base / "mid_data" / folder).iterdir():
        f.unlink()
    with pytest.raises(NanolitError, match=r"pip install nanolit\[hf\]") as info:
        build_mid_mixture(base, split)
    assert str(base / "mid_data" / folder) in str(info.value)


def test_hub_used_when_no_local_split(monkeypatch):
    calls = []
    rows = [smoltalk_row(i) for i in range(7)]

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = SmolTalk("test")
    assert calls == [("HuggingFaceTB/smol-smoltalk", None, "test")]
    assert task[0] == {"messages": rows[HF_SHUFFLE_7[0]]["messages"]}
    assert "HuggingFaceTB/smol-smoltalk:default:test row 3" in task.where(0)
    MMLU("auxiliary_train", "train")
    assert calls[-1] == ("cais/mmlu", "auxiliary_train", "train")


def test_hub_failure_is_a_nanolit_error(monkeypatch, tmp_path):
    def load_dataset(repo, config, split):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(NanolitError, match="offline"):
        GSM8K("main", "train", tmp_path / "nowhere")

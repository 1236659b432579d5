"""CORE (nanochat d575940 nanochat/core_eval.py): rendering, few-shot draws, hand-checked scoring with a bigram "model",
the real bundle, download."""
from __future__ import annotations

import http.server
import io
import json
import math
import random
import string
import threading
import zipfile

import pytest
import torch
import torch.nn as nn

from conftest import leave_process_group
from nanolit.common import NanolitError
from nanolit.eval.core import (
    EVAL_BUNDLE_URL,
    TaskSpec,
    batch_sequences,
    centered_accuracy,
    download_core_bundle,
    evaluate_core,
    evaluate_example,
    evaluate_task,
    find_common_length,
    forward_model,
    load_bundle,
    load_task_data,
    render_prompts_lm,
    render_prompts_mc,
    render_prompts_schema,
    sample_fewshot,
    write_core_csv,
)

# -----------------------------------------------------------------------------
# A character tokenizer and a bigram model whose cross-entropies are easy to compute by hand

# "#" first: an all-zero logits row has argmax 0, which must be a character no test expects.
ALPHABET = "# \n" + string.ascii_letters + string.digits + ":"
BOS = len(ALPHABET)
V = len(ALPHABET) + 1
STRENGTH = 4.0


class CharTokenizer:
    """One id per character; ``<|bos|>`` is the last id. Records every prompt it encodes."""

    def __init__(self):
        self.prompts: list[str] = []

    def get_bos_token_id(self) -> int:
        return BOS

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        self.prompts.append(text)
        return ([prepend] if prepend is not None else []) + [ALPHABET.index(c) for c in text]


class BigramModel(nn.Module):
    """``logits[b, t] = table[idx[b, t]]``: the row of a token with a preferred successor has STRENGTH there and 0
    elsewhere; every other row is all zeros (uniform). Records the sequence lengths it is called with."""

    def __init__(self, prefs: dict[str, str]):
        super().__init__()
        table = torch.zeros(V, V)
        for cur, nxt in prefs.items():
            table[ALPHABET.index(cur), ALPHABET.index(nxt)] = STRENGTH
        self.register_buffer("table", table)
        self.seen_lengths: list[int] = []

    def forward(self, idx):
        self.seen_lengths.append(idx.size(1))
        return self.table[idx]


CE_UNIFORM = math.log(V)  # any target after a token without a preference
CE_HIT = math.log(math.exp(STRENGTH) + V - 1) - STRENGTH  # the preferred successor
CE_MISS = math.log(math.exp(STRENGTH) + V - 1)  # any other successor of a token with a preference


def ids(text: str) -> list[int]:
    return [BOS] + [ALPHABET.index(c) for c in text]


def meta(task_type: str, num_fewshot: int = 0, delimiter: str = " ", label: str = "t", baseline: float = 0.0):
    return TaskSpec(label=label, dataset_uri=f"{label}.jsonl", task_type=task_type, num_fewshot=num_fewshot,
                    continuation_delimiter=delimiter, random_baseline=baseline)


# -----------------------------------------------------------------------------
# Rendering (nanochat d575940 nanochat/core_eval.py)

def test_render_mc_with_demo():
    demo = {"query": "Q1", "choices": ["a", "b"], "gold": 1}
    item = {"query": "Q2", "choices": ["x", "y"], "gold": 0}
    assert render_prompts_mc(item, "\nAnswer: ", [demo]) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: x",
        "Q1\nAnswer: b\n\nQ2\nAnswer: y",
    ]
    assert render_prompts_mc(item, " ") == ["Q2 x", "Q2 y"]


def test_render_schema_with_demos():
    demos = [{"context_options": ["c1", "c2"], "continuation": "k1", "gold": 0},
             {"context_options": ["d1", "d2"], "continuation": "k3", "gold": 1}]
    item = {"context_options": ["o1", "o2"], "continuation": "k2", "gold": 1}
    assert render_prompts_schema(item, " ", demos) == ["c1 k1\n\nd2 k3\n\no1 k2", "c1 k1\n\nd2 k3\n\no2 k2"]


def test_render_lm_trims_contexts_and_strips_prompt_without():
    demo = {"context": "  d1 \n", "continuation": "e1"}
    item = {"context": " q ", "continuation": "ans"}
    assert render_prompts_lm(item, " ", [demo]) == ["d1 e1\n\nq", "d1 e1\n\nq ans"]
    assert render_prompts_lm(item, "\nAnswer: ") == ["q\nAnswer:", "q\nAnswer: ans"]


def test_fewshot_draws_are_reproducible_and_exclude_the_example():
    data = [{"i": i} for i in range(20)]
    draws = sample_fewshot(data, 3, 5)
    # nanochat d575940 nanochat/core_eval.py
    expected = random.Random(1234 + 3).sample([i for i in range(20) if i != 3], 5)
    assert [d["i"] for d in draws] == expected
    assert sample_fewshot(data, 3, 5) == draws
    assert all(d["i"] != 3 for d in draws) and len({d["i"] for d in draws}) == 5
    assert [d["i"] for d in sample_fewshot(data, 4, 5)] != expected
    assert sample_fewshot(data, 3, 0) == []


def test_evaluate_example_puts_the_drawn_demos_in_the_prompt():
    data = [{"query": f"q{i}", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(6)]
    tokenizer = CharTokenizer()
    evaluate_example(2, BigramModel({}), tokenizer, data, "cpu", meta("multiple_choice", num_fewshot=2))
    demos = sample_fewshot(data, 2, 2)
    expected_demos = "".join(f"{d['query']} {d['choices'][d['gold']]}\n\n" for d in demos)
    assert tokenizer.prompts == [expected_demos + "q2 a2", expected_demos + "q2 b2"]


# -----------------------------------------------------------------------------
# Token spans, forward, scoring (nanochat d575940 nanochat/core_eval.py)

def test_find_common_length():
    rows = [[9, 1, 2, 3], [9, 1, 5, 3], [9, 1, 2]]
    assert find_common_length(rows, "left") == 2
    assert find_common_length([[9, 1, 2], [9, 1, 2, 3]], "left") == 3
    assert find_common_length([[7, 1, 2, 3], [8, 5, 2, 3]], "right") == 2
    assert find_common_length([[4, 2, 3], [2, 3]], "right") == 2


def test_batch_sequences_spans():
    tok = CharTokenizer()
    rows, starts, ends = batch_sequences(tok, ["ab x", "ab cd"], "multiple_choice")
    assert rows == [ids("ab x"), ids("ab cd")] and starts == [4, 4] and ends == [5, 6]
    rows, starts, ends = batch_sequences(tok, ["ab c", "bba c"], "schema")
    assert rows == [ids("ab c"), ids("bba c")] and starts == [3, 4] and ends == [5, 6]
    rows, starts, ends = batch_sequences(tok, ["ab", "ab cd"], "language_modeling")
    assert rows == [ids("ab cd")] and starts == [3] and ends == [6]
    with pytest.raises(NanolitError, match="not a strict prefix"):
        batch_sequences(tok, ["ab", "xb cd"], "language_modeling")


def test_forward_model_losses_and_predictions():
    model = BigramModel({"a": "b"})
    input_ids = torch.tensor([ids("ab"), ids("ac")])
    losses, predictions = forward_model(model, input_ids)
    assert losses[0, 0].item() == pytest.approx(CE_UNIFORM)  # bos -> a, uniform row
    assert losses[0, 1].item() == pytest.approx(CE_HIT)  # a -> b, the preferred successor
    assert losses[1, 1].item() == pytest.approx(CE_MISS)  # a -> c
    assert torch.isnan(losses[:, 2]).all()  # the last column has no next token
    assert predictions[:, 1].tolist() == [ALPHABET.index("b")] * 2


def test_mc_scores_by_mean_not_sum():
    # Row "ab x" scores " "->x: mean CE_UNIFORM. Row "ab cd" scores " "->c, c->d: mean (CE_UNIFORM + CE_HIT)/2,
    # lower, although its sum is higher. So choice 1 wins only under the mean.
    model = BigramModel({"c": "d"})
    item = {"query": "ab", "choices": ["x", "cd"]}
    assert (CE_UNIFORM + CE_HIT) / 2 < CE_UNIFORM < CE_UNIFORM + CE_HIT
    assert evaluate_example(0, model, CharTokenizer(), [{**item, "gold": 1}], "cpu", meta("multiple_choice"))
    assert not evaluate_example(0, model, CharTokenizer(), [{**item, "gold": 0}], "cpu", meta("multiple_choice"))


def test_schema_scores_the_common_suffix():
    # Both rows end in " c"; row 0 scores b->" " (CE_HIT) and " "->c, row 1 scores a->" " (uniform) and " "->c.
    model = BigramModel({"b": " "})
    item = {"context_options": ["ab", "ba"], "continuation": "c"}
    assert evaluate_example(0, model, CharTokenizer(), [{**item, "gold": 0}], "cpu", meta("schema"))
    assert not evaluate_example(0, model, CharTokenizer(), [{**item, "gold": 1}], "cpu", meta("schema"))


def test_lm_needs_an_exact_greedy_match_from_the_delimiter_on():
    item = {"context": " ab ", "continuation": "cd"}
    lm = meta("language_modeling")
    assert evaluate_example(0, BigramModel({"b": " ", " ": "c", "c": "d"}), CharTokenizer(), [item], "cpu", lm)
    assert not evaluate_example(0, BigramModel({"b": " ", " ": "c", "c": "e"}), CharTokenizer(), [item], "cpu", lm)
    # The stripped prompt ends at "b", so the delimiter's space is scored too: without b->" " it fails.
    assert not evaluate_example(0, BigramModel({" ": "c", "c": "d"}), CharTokenizer(), [item], "cpu", lm)


def test_rows_are_right_padded_with_bos():
    seen = []

    def model(input_ids):
        seen.append(input_ids.clone())
        return torch.zeros(*input_ids.shape, V)

    evaluate_example(0, model, CharTokenizer(), [{"query": "a", "choices": ["b", "cd"], "gold": 0}], "cpu",
                     meta("multiple_choice"))
    assert seen[0].tolist() == [ids("a b") + [BOS], ids("a cd")]


def test_models_with_max_seq_len_are_cropped_from_the_left():
    model = BigramModel({"c": "d"})
    model.max_seq_len = 5
    item = {"query": "abcdefgh", "choices": ["x", "cd"]}
    assert evaluate_example(0, model, CharTokenizer(), [{**item, "gold": 1}], "cpu", meta("multiple_choice"))
    assert model.seen_lengths == [5]
    model.max_seq_len = 1
    with pytest.raises(NanolitError, match="max_seq_len"):
        evaluate_example(0, model, CharTokenizer(), [{**item, "gold": 1}], "cpu", meta("multiple_choice"))


def test_evaluate_task_needs_more_examples_than_shots():
    data = [{"context": "a", "continuation": "b"}] * 3
    with pytest.raises(NanolitError, match="raise max_per_task above 3"):
        evaluate_task(BigramModel({}), CharTokenizer(), data, "cpu", meta("language_modeling", num_fewshot=3))


# -----------------------------------------------------------------------------
# A synthetic bundle: evaluate_core's shuffle, crop, centring and mean; errors; the CSV

PREFS = {"b": " ", " ": "c", "c": "d"}
TINY_TASKS = [
    # label, uri, type, shots, delimiter, baseline, examples (each with "ok": whether the bigram model gets it)
    ("lm", "sym/lm.jsonl", "language_modeling", 1, None, 0.0,
     [{"context": "ab", "continuation": "cd", "ok": True}, {"context": "ab", "continuation": "ce", "ok": False},
      {"context": "ab", "continuation": "c", "ok": True}, {"context": "ax", "continuation": "cd", "ok": False},
      {"context": "b", "continuation": "cd", "ok": True}]),
    ("mc", "mc.jsonl", "multiple_choice", 0, "\nAnswer: ", 25.0,
     [{"query": "ab", "choices": ["x", "cd"], "gold": 1, "ok": True},
      {"query": "ab", "choices": ["x", "cd"], "gold": 0, "ok": False},
      {"query": "a", "choices": ["cd", "z"], "gold": 0, "ok": True},
      {"query": "b", "choices": ["q", "cd"], "gold": 1, "ok": True}]),
]


def make_bundle(root, tasks=TINY_TASKS, write_data=True):
    lines = ["icl_tasks:"]
    for label, uri, task_type, shots, delim, _, examples in tasks:
        lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {task_type}"]
        if delim is not None:
            lines.append(f"  continuation_delimiter: {json.dumps(delim)}")
        if write_data:
            path = root / "eval_data" / uri
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    rows = ["Eval Task,Task Category,Random baseline"] + [f"{t[0]},x,{t[5]}" for t in tasks]
    (root / "eval_meta_data.csv").write_text("\n".join(rows) + "\n")
    return root


def expected_accuracy(examples, max_per_task):
    shuffled = list(examples)
    random.Random(1337).shuffle(shuffled)
    if max_per_task > 0:
        shuffled = shuffled[:max_per_task]
    return sum(e["ok"] for e in shuffled) / len(shuffled)


def test_load_bundle_synthetic(tmp_path):
    specs = load_bundle(make_bundle(tmp_path))
    assert specs == [
        TaskSpec("lm", "sym/lm.jsonl", "language_modeling", 1, " ", 0.0),
        TaskSpec("mc", "mc.jsonl", "multiple_choice", 0, "\nAnswer: ", 25.0),
    ]
    assert load_task_data(tmp_path, specs[1])[2] == TINY_TASKS[1][6][2]


@pytest.mark.parametrize("max_per_task", [-1, 3])
def test_evaluate_core_on_synthetic_bundle(tmp_path, max_per_task):
    bundle = make_bundle(tmp_path)
    out = evaluate_core(BigramModel(PREFS), CharTokenizer(), "cpu", bundle, max_per_task=max_per_task, verbose=False)
    acc_lm = expected_accuracy(TINY_TASKS[0][6], max_per_task)
    acc_mc = expected_accuracy(TINY_TASKS[1][6], max_per_task)
    assert out["results"] == pytest.approx({"lm": acc_lm, "mc": acc_mc})
    centered_mc = (acc_mc - 0.25) / (1 - 0.25)
    assert out["centered_results"] == pytest.approx({"lm": acc_lm, "mc": centered_mc})
    assert out["core_metric"] == pytest.approx((acc_lm + centered_mc) / 2)
    if max_per_task < 0:
        assert out["results"] == pytest.approx({"lm": 3 / 5, "mc": 3 / 4})


def test_evaluate_core_task_subset_and_unknown_label(tmp_path):
    bundle = make_bundle(tmp_path)
    out = evaluate_core(BigramModel(PREFS), CharTokenizer(), "cpu", bundle, tasks=["mc"], verbose=False)
    assert list(out["results"]) == ["mc"]
    with pytest.raises(NanolitError, match="unknown CORE task"):
        evaluate_core(BigramModel(PREFS), CharTokenizer(), "cpu", bundle, tasks=["nope"], verbose=False)


def test_missing_task_file_raises_or_is_skipped_loudly(tmp_path):
    make_bundle(tmp_path)
    (tmp_path / "eval_data" / "mc.jsonl").unlink()
    with pytest.raises(NanolitError, match=r"mc \(eval_data/mc.jsonl\)"):
        load_bundle(tmp_path)
    with pytest.warns(UserWarning, match="skipping 1 task"):
        specs = load_bundle(tmp_path, skip_missing=True)
    assert [s.label for s in specs] == ["lm"]
    with pytest.raises(NanolitError, match="mc.jsonl not found"):
        load_task_data(tmp_path, meta("multiple_choice", label="mc"))
    with pytest.warns(UserWarning):
        out = evaluate_core(BigramModel(PREFS), CharTokenizer(), "cpu", tmp_path, skip_missing=True, verbose=False)
    assert list(out["results"]) == ["lm"]


def test_malformed_lines_name_file_and_line(tmp_path):
    make_bundle(tmp_path)
    spec = load_bundle(tmp_path)[1]
    path = tmp_path / "eval_data" / "mc.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(NanolitError, match=r"mc.jsonl:3: not valid JSON"):
        load_task_data(tmp_path, spec)
    path.write_text(lines[0] + "\n" + json.dumps({"query": "a", "gold": 0}) + "\n")
    with pytest.raises(NanolitError, match=r"mc.jsonl:2: a multiple_choice example needs the fields"):
        load_task_data(tmp_path, spec)


def test_bad_bundle_files(tmp_path):
    with pytest.raises(NanolitError, match="core.yaml not found"):
        load_bundle(tmp_path)
    make_bundle(tmp_path)
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nlm,0\n")
    with pytest.raises(NanolitError, match="no 'Random baseline' row for task mc"):
        load_bundle(tmp_path)
    (tmp_path / "core.yaml").write_text("icl_tasks:\n- label: lm\n  dataset_uri: x.jsonl\n  num_fewshot: [0]\n"
                                        "  icl_task_type: generation\n")
    with pytest.raises(NanolitError, match="icl_task_type 'generation'"):
        load_bundle(tmp_path)


def test_write_core_csv(tmp_path):
    results = {"results": {"copa": 0.6, "boolq": 0.5},
               "centered_results": {"copa": centered_accuracy(0.6, 50), "boolq": centered_accuracy(0.5, 62)},
               "core_metric": 0.25}
    path = tmp_path / "base_eval" / "base_model_000050.csv"
    write_core_csv(path, results)
    lines = path.read_text().splitlines()
    assert lines[0] == f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"
    assert lines[1] == f"{'copa':<35}, {'0.600000':<10}, {'0.200000':<10}"
    assert lines[2].split(",")[2].strip() == f"{(0.5 - 0.62) / 0.38:.6f}"
    assert lines[3] == f"{'CORE':<35}, {'':<10}, {'0.250000':<10}"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


# -----------------------------------------------------------------------------
# The real bundle (18 of 22 tasks, used in place) and the real d2 model

# label, type, shots, delimiter, random baseline: eval_bundle/README.md and nanochat d575940 nanochat/core_eval.py
README_TASKS = [
    ("jeopardy", "language_modeling", 10, "\nAnswer: ", 0.0),
    ("bigbench_qa_wikidata", "language_modeling", 10, " ", 0.0),
    ("arc_easy", "multiple_choice", 10, "\nAnswer: ", 25.0),
    ("arc_challenge", "multiple_choice", 10, "\nAnswer: ", 25.0),
    ("copa", "multiple_choice", 0, " ", 50.0),
    ("commonsense_qa", "multiple_choice", 10, " ", 20.0),
    ("piqa", "multiple_choice", 10, "\nAnswer: ", 50.0),
    ("openbook_qa", "multiple_choice", 0, " ", 25.0),
    ("lambada_openai", "language_modeling", 0, " ", 0.0),
    ("winograd", "schema", 0, " ", 50.0),
    ("winogrande", "schema", 0, " ", 50.0),
    ("bigbench_dyck_languages", "language_modeling", 10, " ", 0.0),
    ("agi_eval_lsat_ar", "multiple_choice", 3, " ", 20.0),
    ("bigbench_cs_algorithms", "language_modeling", 10, " ", 0.0),
    ("bigbench_operators", "language_modeling", 10, " ", 0.0),
    ("bigbench_repeat_copy_logic", "language_modeling", 10, " ", 0.0),
    ("boolq", "multiple_choice", 10, "\nAnswer: ", 62.0),
    ("bigbench_language_identification", "multiple_choice", 10, " ", 9.1),
]


def test_real_bundle_tasks(eval_bundle):
    specs = load_bundle(eval_bundle)
    assert [(s.label, s.task_type, s.num_fewshot, s.continuation_delimiter, s.random_baseline) for s in specs] \
        == README_TASKS
    by_label = {s.label: s for s in specs}
    assert by_label["boolq"].dataset_uri == "reading_comprehension/boolq.jsonl"
    assert len(load_task_data(eval_bundle, by_label["copa"])) == 100  # README: lines per file
    assert len(load_task_data(eval_bundle, by_label["winograd"])) == 273


def test_real_bundle_end_to_end_with_long_prompts(nanochat_d2, eval_bundle):
    from nanolit.checkpoint import build_model
    from nanolit.tokenizer import Tokenizer

    gpt, ckpt_meta = build_model(nanochat_d2, 50, "cpu")
    tokenizer = Tokenizer.from_directory(nanochat_d2 / "tokenizer")
    seen = []

    def model(input_ids):  # a plain callable: no max_seq_len, so nothing is cropped
        seen.append(input_ids.size(1))
        return gpt(input_ids)

    tasks = ["lambada_openai", "winograd", "boolq"]  # one of each type; boolq is 10-shot with long passages
    out = evaluate_core(model, tokenizer, "cpu", eval_bundle, max_per_task=12, tasks=tasks, verbose=False)
    assert list(out["results"]) == tasks
    assert all(0.0 <= acc <= 1.0 for acc in out["results"].values())
    baselines = {"lambada_openai": 0.0, "winograd": 50.0, "boolq": 62.0}
    for label, acc in out["results"].items():
        assert out["centered_results"][label] == pytest.approx(centered_accuracy(acc, baselines[label]))
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)
    # The boolq prompts are longer than nanochat's 10 x sequence_len rotary table, and were scored whole.
    assert max(seen) > 10 * ckpt_meta["model_config"]["sequence_len"]


# -----------------------------------------------------------------------------
# Download (nanochat d575940 nanochat/core_eval.py) from a local HTTP server

def bundle_zip_bytes(with_folder: bool = True) -> bytes:
    buf = io.BytesIO()
    prefix = "eval_bundle/" if with_folder else "other/"
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(prefix + "core.yaml", "icl_tasks: []\n")
        zf.writestr(prefix + "eval_data/world_knowledge/x.jsonl", "{}\n")
    return buf.getvalue()


class ZipHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.payload`` at any path; the first ``server.failures`` requests get a 500."""

    def do_GET(self):
        self.server.requests += 1
        if self.server.failures > 0:
            self.server.failures -= 1
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.payload)))
        self.end_headers()
        self.wfile.write(self.server.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def zip_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ZipHandler)
    server.payload, server.failures, server.requests = bundle_zip_bytes(), 0, 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
    server.shutdown()
    server.server_close()


def test_default_url():
    assert EVAL_BUNDLE_URL == "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def test_download_unzips_once(tmp_path, zip_server):
    server, url = zip_server
    bundle = download_core_bundle(tmp_path, url=url)
    assert bundle == tmp_path / "eval_bundle"
    assert (bundle / "core.yaml").read_text() == "icl_tasks: []\n"
    assert (bundle / "eval_data" / "world_knowledge" / "x.jsonl").exists()
    assert (tmp_path / "eval_bundle.zip").read_bytes() == server.payload
    assert download_core_bundle(tmp_path, url=url) == bundle
    assert server.requests == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files or folders left


def test_concurrent_downloads_fetch_once(tmp_path, zip_server):
    server, url = zip_server
    results = []
    threads = [threading.Thread(target=lambda: results.append(download_core_bundle(tmp_path, url=url)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "eval_bundle"] * 3
    assert server.requests == 1


def test_download_retries_then_succeeds(tmp_path, zip_server):
    server, url = zip_server
    server.failures = 1
    assert (download_core_bundle(tmp_path, url=url) / "core.yaml").exists()
    assert server.requests == 2


def test_zip_without_bundle_folder(tmp_path, zip_server):
    server, url = zip_server
    server.payload = bundle_zip_bytes(with_folder=False)
    with pytest.raises(NanolitError, match="no eval_bundle/ folder"):
        download_core_bundle(tmp_path, url=url)
    assert not (tmp_path / "eval_bundle").exists() and not (tmp_path / "eval_bundle.zip").exists()


def test_download_that_is_not_a_zip(tmp_path, zip_server):
    server, url = zip_server
    server.payload = b"<html>an error page</html>"
    with pytest.raises(NanolitError, match="is not a zip file"):
        download_core_bundle(tmp_path, url=url)
    assert not (tmp_path / "eval_bundle.zip").exists()
    server.payload = bundle_zip_bytes()  # a rerun downloads again and succeeds
    assert (download_core_bundle(tmp_path, url=url) / "core.yaml").exists()
    assert server.requests == 2


# -----------------------------------------------------------------------------
# Two gloo ranks split the examples and sum their results (nanochat d575940 nanochat/core_eval.py)

def _distributed_worker(rank: int, world: int, store: str, data: list, out_path: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    tokenizer = CharTokenizer()
    acc = evaluate_task(BigramModel(PREFS), tokenizer, data, "cpu", meta("multiple_choice"))
    if rank == 0:
        torch.save({"acc": acc}, out_path)
    # Each rank rendered only its own examples: r, r+W, ...
    assert len(tokenizer.prompts) == sum(len(data[i]["choices"]) for i in range(rank, len(data), world))
    leave_process_group()


@pytest.mark.slow
def test_evaluate_task_across_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    data = TINY_TASKS[1][6] * 2 + TINY_TASKS[1][6][:1]
    single = evaluate_task(BigramModel(PREFS), CharTokenizer(), data, "cpu", meta("multiple_choice"))
    out = tmp_path / "acc.pt"
    store = str(tmp_path / "store")  # a file store: a free port found and closed first could be taken before the ranks bind it
    mp.spawn(_distributed_worker, args=(2, store, data, str(out)), nprocs=2)
    assert torch.load(out)["acc"] == pytest.approx(single) == pytest.approx(7 / 9)

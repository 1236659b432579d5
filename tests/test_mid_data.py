"""The mid-training stream (nanochat d575940 scripts/mid_train.py) and MidDataModule: packing, ranks, progress,
last_step, exact resume."""
from __future__ import annotations

import itertools
import json
import types
from pathlib import Path

import lightning.pytorch as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanolit.common import NanolitError
from nanolit.data.chat import render_conversation
from nanolit.data.mid import MidDataModule, inputs_and_targets, mid_train_steps, mid_val_batches
from nanolit.data.tasks import Task, build_mid_mixture
from nanolit.tokenizer import Tokenizer

B, T = 2, 8


@pytest.fixture(scope="module")
def tok(byte_tokenizer) -> Tokenizer:
    return byte_tokenizer


class ListTask(Task):
    def __init__(self, conversations: list[dict]):
        super().__init__()
        self.conversations = conversations

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]

    def source_of(self, index: int) -> str:
        return f"list conversation {index}"


def chats(n: int) -> ListTask:
    """n conversations of uneven lengths (about one micro-batch each at B*T+1 = 17 tokens)."""
    return ListTask([
        {"messages": [{"role": "user", "content": "q" * (i % 5 + 1) + str(i)},
                      {"role": "assistant", "content": "a" * (i * 7 % 11 + 1)}]}
        for i in range(n)
    ])


def flat(micro: torch.Tensor) -> list[int]:
    """A micro-batch [B, T+1] of overlapping rows back to its B*T+1 stream tokens."""
    return micro[:, :-1].flatten().tolist() + micro[-1, -1:].tolist()


def nanochat_reference(task, tok, A, num_iterations=-1, rank=0, world_size=1):
    """nanochat's mid_data_generator and loop, micro-batch by micro-batch (nanochat d575940 scripts/mid_train.py).

    Returns, per trained optimizer step, its micro-batches (B*T+1 tokens each) and the progress its LR used.
    """
    flags = {"last_step": False, "approx": 0.0}
    needed, size = B * T + 1, len(task)

    def generator():
        buffer, cursor, it = [], rank, 0
        while True:
            while len(buffer) < needed:
                ids, _ = render_conversation(tok, task[cursor])
                buffer += ids
                cursor += world_size
                if cursor >= size:
                    cursor -= size
                    flags["last_step"] = True
            it += 1
            if 0 < num_iterations <= it:
                flags["last_step"] = True
            chunk, buffer = buffer[:needed], buffer[needed:]
            flags["approx"] = it / num_iterations if num_iterations > 0 else cursor / size
            yield chunk

    loader = generator()
    x = next(loader)
    progress, steps = 0.0, []
    while not flags["last_step"]:
        micro_batches = []
        for _ in range(A):
            micro_batches.append(x)
            x = next(loader)  # prefetch, then update progress (nanochat's micro-step order)
            progress = max(progress, flags["approx"])
        steps.append((micro_batches, progress))
    return steps


def trained_steps(stream) -> list[tuple[torch.Tensor, dict]]:
    """Items up to (not including) the first with last_step: what a trainer trains on."""
    return list(itertools.takewhile(lambda item: not item[1]["last_step"], stream))


@pytest.mark.parametrize("A, num_iterations, rank, world_size", [
    (1, -1, 0, 1), (2, -1, 0, 1), (3, -1, 0, 1), (1, 4, 0, 1), (2, -1, 1, 2), (1, -1, 2, 3),
])
def test_stream_matches_nanochats_loop(tok, A, num_iterations, rank, world_size):
    task = chats(13)
    reference = nanochat_reference(task, tok, A, num_iterations, rank, world_size)
    ours = trained_steps(mid_train_steps(task, tok, B, T, A, rank, world_size, num_iterations))
    assert len(reference) >= 2 and len(ours) == len(reference)
    for j, ((tokens, state), (micro_batches, progress)) in enumerate(zip(ours, reference), 1):
        assert tokens.shape == (A, B, T + 1) and tokens.dtype == torch.int64
        assert [flat(tokens[a]) for a in range(A)] == micro_batches
        assert state["progress"] == pytest.approx(progress, abs=0)
        assert state["it"] == j


def test_packing_concatenates_renders_in_cursor_order(tok):
    task = chats(5)
    order = itertools.islice(itertools.cycle(range(5)), 20)  # 20 renders of at least 7 tokens cover 4 micro-batches
    stream = [t for i in order for t in render_conversation(tok, task[i])[0]]
    (tokens, _), = itertools.islice(mid_train_steps(task, tok, B, T, grad_accum_steps=4), 1)
    for a in range(4):
        micro = stream[a * (B * T + 1): (a + 1) * (B * T + 1)]
        for b in range(B):
            assert tokens[a, b].tolist() == micro[b * T: b * T + T + 1]  # rows overlap by one token
    x, y = inputs_and_targets(tokens[0])
    assert torch.equal(x, tokens[0, :, :-1]) and torch.equal(y, tokens[0, :, 1:])


def test_wrap_inside_a_step_trains_it_and_stops_before_the_next(tok):
    """A wrap in a later micro-batch of a step is trained (nanochat finishes its micro-steps); the next is last."""
    task = chats(13)
    steps = list(itertools.islice(mid_train_steps(task, tok, B, T, grad_accum_steps=3), 12))
    flags = [state["last_step"] for _, state in steps]
    first_last = flags.index(True)
    assert all(flags[first_last:])  # sticky, like nanochat's global
    assert steps[first_last - 1][1]["wrapped"]  # the epoch already ended inside the last trained step
    assert not steps[first_last - 2][1]["wrapped"]


def test_num_iterations_counts_steps_and_drives_progress(tok):
    A, N = 2, 3
    steps = list(itertools.islice(mid_train_steps(chats(40), tok, B, T, A, num_iterations=N), 4))
    assert [s["last_step"] for _, s in steps] == [False, False, True, True]
    # LR progress of step j is measured after prefetching micro-batch j*A + 1 of N*A
    assert [s["progress"] for _, s in steps] == pytest.approx([(j * A + 1) / (N * A) for j in range(1, 5)])


def test_exact_resume_from_any_step(tok):
    task = chats(11)
    for masked in (False, True):
        full = list(itertools.islice(mid_train_steps(task, tok, B, T, 2, mask_user_tokens=masked), 9))
        for k in (0, 3, 6):
            resumed = itertools.islice(
                mid_train_steps(task, tok, B, T, 2, mask_user_tokens=masked, resume_state=full[k][1]), 9 - k - 1
            )
            for (tokens, state), (want_tokens, want_state) in zip(resumed, full[k + 1:], strict=True):
                assert torch.equal(tokens, want_tokens)
                assert state.keys() == want_state.keys()
                for key in state:
                    same = torch.equal if isinstance(state[key], torch.Tensor) else (lambda a, b: a == b)
                    assert same(state[key], want_state[key]), key


def test_resume_state_checks(tok):
    _, state = next(mid_train_steps(chats(11), tok, B, T))
    with pytest.raises(NanolitError, match="mask_user_tokens=False"):
        next(mid_train_steps(chats(11), tok, B, T, mask_user_tokens=True, resume_state=state))
    with pytest.raises(NanolitError, match="lacks"):
        next(mid_train_steps(chats(11), tok, B, T, resume_state={"cursor": 3}))


def test_mask_user_tokens_sets_untrained_targets_to_minus_one(tok):
    task = chats(6)
    ids, mask = [], []
    for i in itertools.cycle(range(6)):
        more_ids, more_mask = render_conversation(tok, task[i])
        ids, mask = ids + more_ids, mask + more_mask
        if len(ids) > 3 * (B * T + 1):
            break
    (tokens, _), = itertools.islice(mid_train_steps(task, tok, B, T, 3, mask_user_tokens=True), 1)
    for a in range(3):
        start = a * (B * T + 1)
        x, y = inputs_and_targets(tokens[a])
        want_x = ids[start: start + B * T]
        want_y = [t if m else -1 for t, m in zip(ids[start + 1: start + B * T + 1], mask[start + 1: start + B * T + 1])]
        assert x.flatten().tolist() == want_x
        assert y.flatten().tolist() == want_y
    assert (y == -1).any() and (y >= 0).any()


def test_bad_conversation_names_its_record(tok):
    task = chats(4)
    task.conversations[1] = {"messages": [{"role": "assistant", "content": "hi"}]}
    with pytest.raises(NanolitError, match="list conversation 1: bad conversation"):
        next(mid_train_steps(task, tok, B, T, grad_accum_steps=2))


def test_val_batches(tok):
    task = chats(9)
    batches = mid_val_batches(task, tok, B, T, eval_tokens=3 * B * T + 5)
    assert len(batches) == 3
    first = next(mid_train_steps(task, tok, B, T, grad_accum_steps=3))[0]
    for (x, y), micro in zip(batches, first):
        assert x.shape == y.shape == (B, T)
        assert torch.equal(x, micro[:, :-1]) and torch.equal(y, micro[:, 1:])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, mid_val_batches(task, tok, B, T, 3 * B * T)))
    with pytest.raises(NanolitError, match="raise eval_tokens"):
        mid_val_batches(task, tok, B, T, eval_tokens=B * T - 1)
    with pytest.raises(NanolitError, match="fewer than the 4 ranks"):
        mid_val_batches(chats(3), tok, B, T, eval_tokens=B * T * 4, world_size=4)


# --------------------------------------------------------------------------------------------- MidDataModule


def make_base(root: Path, tok: Tokenizer) -> Path:
    """A base dir with a tokenizer and every mid source in its real schema (small)."""
    tok.save(root / "tokenizer")
    data = root / "mid_data"

    def parquet(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)

    def jsonl(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def smol(i):
        return {"messages": [{"content": f"hello {i}", "role": "user"}, {"content": f"hi {i}", "role": "assistant"}]}

    def mmlu(i):
        return {"question": f"q{i}", "subject": "misc", "choices": ["w", "x", "y", "z"], "answer": i % 4}

    def gsm(i):
        return {"question": f"{i}+1?", "answer": f"<<{i}+1={i + 1}>>\n#### {i + 1}"}

    parquet(data / "smoltalk/data/train-00000-of-00001.parquet", [smol(i) for i in range(6)])
    parquet(data / "smoltalk/data/test-00000-of-00001.parquet", [smol(100 + i) for i in range(3)])
    parquet(data / "mmlu/auxiliary_train/train-00000-of-00001.parquet", [{"train": mmlu(i)} for i in range(4)])
    jsonl(data / "mmlu/all/test.jsonl", [mmlu(i) for i in range(3)])
    jsonl(data / "gsm8k/main/train.jsonl", [gsm(i) for i in range(3)])
    jsonl(data / "gsm8k/main/test.jsonl", [gsm(i) for i in range(2)])
    jsonl(root / "identity_conversations.jsonl",
          [[{"role": "user", "content": "who?"}, {"role": "assistant", "content": "nanochat"}]])
    (root / "words_alpha.txt").write_text("cat\r\ndog\r\nbee\r\n")
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok) -> Path:
    return make_base(tmp_path_factory.mktemp("mid_base"), tok)


def datamodule(base: Path, **kwargs) -> MidDataModule:
    knobs = dict(base_dir=str(base), device_batch_size=B, max_seq_len=T, total_batch_size=2 * B * T,
                 eval_tokens=2 * B * T)
    return MidDataModule(**{**knobs, **kwargs})


def test_datamodule_streams_the_train_mixture_and_records_the_consumed_step(base, tok):
    dm = datamodule(base, num_iterations=5)
    dm.setup("fit")
    assert dm.grad_accum_steps == 2 and dm.vocab_size == 265 and dm.token_bytes.shape == (265,)
    mixture = build_mid_mixture(base, "train")
    want = list(itertools.islice(mid_train_steps(mixture, tok, B, T, 2, num_iterations=5), 3))
    got = list(itertools.islice(iter(dm.train_dataloader()), 3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want))
    dm.trainer = types.SimpleNamespace(training=True, global_rank=0, world_size=1)
    batch = dm.on_before_batch_transfer(got[1], 0)
    assert batch is got[1][0]
    assert (dm.progress, dm.last_step) == (got[1][1]["progress"], got[1][1]["last_step"])
    assert dm.state_dict() == {"train_loader": [got[1][1]]}
    # a new DataModule loaded from that state continues with the third step
    resumed = datamodule(base, num_iterations=5)
    resumed.load_state_dict(dm.state_dict())
    assert torch.equal(next(iter(resumed.train_dataloader()))[0], want[2][0])
    (x, y), _ = dm.val_dataloader()
    assert x.shape == y.shape == (B, T)


def test_datamodule_other_world_size_resumes_near_the_slowest_rank(base):
    dm = datamodule(base)
    dm.setup("fit")
    states = [dict(next(iter(dm.train_dataloader()))[1], cursor=c) for c in (7, 4)]
    with pytest.warns(UserWarning, match="saved by 2 rank"):
        dm.load_state_dict({"train_loader": states})
    assert dm._consumed["cursor"] == 4 and len(dm._consumed["buffer"]) == 0


def test_datamodule_missing_source_is_a_nanolit_error(tmp_path, tok, monkeypatch):
    base = make_base(tmp_path, tok)
    (base / "identity_conversations.jsonl").unlink()
    with pytest.raises(NanolitError, match="identity_conversations.jsonl not found"):
        datamodule(base).setup("fit")


class _Recorder(L.LightningModule):
    """Records each consumed batch with the DataModule's progress and last_step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        dm = self.trainer.datamodule
        self.seen.append((batch.clone(), dm.progress, dm.last_step))
        return self.w * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(base: Path, max_steps: int, ckpt_path=None, save_to=None) -> list:
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    module = _Recorder()
    trainer.fit(module, datamodule=datamodule(base, num_iterations=8), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module.seen


def test_lightning_checkpoint_resumes_the_mid_stream_exactly(base, tok, tmp_path):
    mixture = build_mid_mixture(base, "train")
    want = list(itertools.islice(mid_train_steps(mixture, tok, B, T, 2, num_iterations=8), 5))
    first = _fit(base, 3, save_to=tmp_path / "mid.ckpt")
    second = _fit(base, 5, ckpt_path=tmp_path / "mid.ckpt")
    for (tokens, progress, last_step), (want_tokens, state) in zip(first + second, want, strict=True):
        assert torch.equal(tokens, want_tokens)
        assert (progress, last_step) == (state["progress"], state["last_step"])

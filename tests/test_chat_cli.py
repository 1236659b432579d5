"""`nanolit chat`, `nanolit sample` and `nanolit eval bpb` through the real command, against the engine's own decode."""
from __future__ import annotations

import os
import pty
import select
import sys
import time

import pytest
import torch
from conftest import save_tiny_ckpt
from test_engine import ScriptedModel

from nanolit.checkpoint import load_any
from nanolit.chat_cli import chat, stream_reply
from nanolit.cli import main
from nanolit.data.chat import render_for_completion
from nanolit.engine import Engine
from nanolit.model import GPTConfig


def greedy_reply(loaded, user: str, max_tokens: int = 256) -> str:
    """The engine's own greedy reply to one user turn, as text (the end marker excluded)."""
    prompt = render_for_completion(loaded.tokenizer, {"messages": [{"role": "user", "content": user},
                                                                   {"role": "assistant", "content": ""}]})
    rows, _ = Engine(loaded.model, loaded.tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return loaded.tokenizer.decode(rows[0][len(prompt):])


@pytest.mark.parametrize("which", ["mid_d2", "tiny_chat_ckpt"])
def test_prompt_mode_prints_the_engines_greedy_reply(which, request, capsys):
    checkpoint = request.getfixturevalue(which)
    main(["chat", "--checkpoint", str(checkpoint), "-p", "Why is the sky blue?", "-t", "0"])
    want = greedy_reply(load_any(checkpoint), "Why is the sky blue?")
    assert want.strip()  # the reply is not empty, so the comparison means something
    assert capsys.readouterr().out == want + "\n"


def test_conversation_tokens_are_the_chat_rendering(mid_d2):
    loaded = load_any(mid_d2)
    tokens = chat(loaded.model, loaded.tokenizer, "Hello there", temperature=0.0, max_tokens=8, write=lambda s: None)
    prompt = render_for_completion(loaded.tokenizer, {"messages": [{"role": "user", "content": "Hello there"},
                                                                   {"role": "assistant", "content": "x"}]})
    assert tokens[:len(prompt)] == prompt
    # a reply cut at max_tokens is closed with <|assistant_end|>, like a finished turn
    assert len(tokens) == len(prompt) + 8 + 1 and tokens[-1] == loaded.tokenizer.encode_special("<|assistant_end|>")


def test_calculator_result_is_streamed(nanochat_d2):
    from nanolit.tokenizer import Tokenizer

    tok = Tokenizer.from_directory(nanochat_d2 / "tokenizer")
    sp = tok.encode_special
    # the script advances on every forward, forced steps included: fillers stand where the tool's output goes
    fillers = [0] * (2 + len(tok.encode("36")))
    script = [sp("<|python_start|>"), *tok.encode("12*3"), sp("<|python_end|>"), *fillers, *tok.encode(" so 36"),
              sp("<|assistant_end|>")]
    engine = Engine(ScriptedModel(script, tok.get_vocab_size(), GPTConfig(n_layer=1, n_head=1, n_kv_head=1,
                                                                          n_embd=8)), tok)
    pieces = []
    reply = stream_reply(engine, [tok.get_bos_token_id(), sp("<|assistant_start|>")], pieces.append, 0.0, None)
    assert "".join(pieces) == "<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|> so 36"
    assert reply[-1] == sp("<|assistant_end|>")


def test_split_characters_print_once_complete(byte_tokenizer, tiny_chat_ckpt):
    """A byte-level model emits a multi-byte character one byte per token: it is printed whole, not as U+FFFD."""
    text = "héllo ☃ 🙂"
    script = [*byte_tokenizer.encode(text), byte_tokenizer.encode_special("<|assistant_end|>")]
    assert len(script) - 1 == len(text.encode("utf-8"))  # one token per byte
    engine = Engine(ScriptedModel(script, 265, GPTConfig(n_layer=1, n_head=1, n_kv_head=1, n_embd=8)),
                    byte_tokenizer)
    pieces = []
    stream_reply(engine, [byte_tokenizer.get_bos_token_id()], pieces.append, 0.0, None)
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def test_base_models_and_foreign_vocab_are_refused(nanochat_d2, tiny_chat_ckpt, byte_tokenizer, tmp_path, capsys):
    for checkpoint in (nanochat_d2, save_tiny_ckpt(tmp_path / "base.ckpt", byte_tokenizer,
                                                   {"target_param_data_ratio": 20})):
        with pytest.raises(SystemExit) as e:
            main(["chat", "--checkpoint", str(checkpoint), "-p", "hi"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a base model" in err[0] and "nanolit sample" in err[0]
    with pytest.raises(SystemExit):
        main(["chat", "--checkpoint", str(tiny_chat_ckpt), "--tokenizer", str(nanochat_d2 / "tokenizer"), "-p", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nanolit: error: tokenizer has 4096 tokens but the model has 265; pass --tokenizer with the "
                   "model's own tokenizer"]


def test_sample_gives_the_fixture_greedy_tokens(nanochat_d2, expected_d2, capsys):
    from nanolit.tokenizer import Tokenizer

    tok = Tokenizer.from_directory(nanochat_d2 / "tokenizer")
    main(["sample", "--checkpoint", str(nanochat_d2), "--prompt", expected_d2["prompt"]])
    assert capsys.readouterr().out == tok.decode(expected_d2["prompt_ids"] + expected_d2["greedy16"]) + "\n"
    main(["sample", "--checkpoint", str(nanochat_d2), "--max_tokens", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7 and lines[0].startswith("<|bos|>The capital of France is")


def test_eval_bpb_reproduces_nanochat_val_bpb(nanochat_d2, expected_d2, capsys):
    from nanolit.eval.base_loss import evaluate_splits

    loaded = load_any(nanochat_d2)
    bpb = evaluate_splits(loaded.model, loaded.tokenizer, nanochat_d2 / "base_data", 4, 32768, ["val"])
    # fp32 on CPU, same batches and sums as nanochat: only summation order can differ (tests/test_bpb.py)
    assert bpb["val"] == pytest.approx(expected_d2["val_bpb"], abs=1e-6)
    main(["eval", "bpb", "--checkpoint", str(nanochat_d2), "--device_batch_size", "4", "--split_tokens", "32768",
          "--splits", "val"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"val bpb: {expected_d2['val_bpb']:.4f}" and len(out) == 1 + 7
    with pytest.raises(SystemExit):
        main(["eval", "bpb", "--checkpoint", str(nanochat_d2), "--split_tokens", "1000"])
    assert "is not a multiple of" in capsys.readouterr().err


def test_eval_bpb_train_and_val(tiny_base_dir, nanochat_d2, capsys):
    from nanolit.eval.base_loss import evaluate_splits

    loaded = load_any(nanochat_d2)
    got = evaluate_splits(loaded.model, loaded.tokenizer, tiny_base_dir / "base_data", 2, 2 * 256, ["train", "val"])
    assert set(got) == {"train", "val"} and all(0 < v < 10 for v in got.values()) and got["train"] != got["val"]


# ---------------------------------------------------------------------------------------------------- a terminal
def read_until(fd: int, marker: str, buffer: list[str], timeout: float = 120) -> str:
    """Read the pty into ``buffer`` until ``marker`` appears in what was read since the last call; return that."""
    deadline, chunk = time.monotonic() + timeout, ""
    while marker not in chunk:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {''.join(buffer) + chunk!r}")
        try:
            data = os.read(fd, 4096).decode("utf-8", errors="replace")
        except OSError:  # EIO: the child closed the terminal
            data = ""
        if not data:
            raise AssertionError(f"terminal closed before {marker!r}; got {''.join(buffer) + chunk!r}")
        chunk += data.replace("\r\n", "\n")
    buffer.append(chunk)
    return chunk


def spawn(args: list[str]) -> tuple[int, int]:
    pid, fd = pty.fork()  # the child gets the pty as its controlling terminal, so ^C and ^D act as typed
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "nanolit", *args])
    return pid, fd


def finish(pid: int, fd: int, buffer: list[str]) -> int:
    # Drain until the child closes the terminal. Closing the terminal first would hang the child up (SIGHUP, -1),
    # so wait as long as a loaded 2-core machine may take to print and exit (seconds; 300 s is the harness bound).
    while True:
        ready, _, _ = select.select([fd], [], [], 300)
        try:
            data = os.read(fd, 4096) if ready else b""
        except OSError:
            data = b""
        if not data:
            break
        buffer.append(data.decode("utf-8", errors="replace").replace("\r\n", "\n"))
    os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def ctrl_c(fd: int, buffer: list[str]) -> None:
    """Type Ctrl-C until the child says goodbye. One typed in the instant after the prompt is printed, before the
    child waits for input again, can be lost (CPython's readline looks at signals only when that wait is
    interrupted, and the signal may land on one of torch's threads); a person would press it again, and so does
    this, 10 s apart: answering takes the child milliseconds, so a second press is only sent after a lost one."""
    for _ in range(10):
        os.write(fd, b"\x03")
        try:
            read_until(fd, "Goodbye!", buffer, timeout=10)
            return
        except AssertionError:  # no goodbye within 10 s (the echoed ^C is all there was)
            continue


def test_interactive_chat_in_a_terminal(mid_d2):
    want = greedy_reply(load_any(mid_d2), "Hello")
    pid, fd = spawn(["chat", "--checkpoint", str(mid_d2), "-t", "0"])
    out: list[str] = []
    read_until(fd, "User: ", out)
    os.write(fd, b"Hello\n")
    turn = read_until(fd, "User: ", out)
    assert turn.split("Assistant: ", 1)[1].rsplit("\n\nUser: ", 1)[0] == want
    os.write(fd, b"clear\n")
    assert "Conversation cleared." in read_until(fd, "User: ", out)
    ctrl_c(fd, out)  # at the prompt
    code = finish(pid, fd, out)
    text = "".join(out)
    assert code == 0 and text.rstrip().endswith("Goodbye!") and "Traceback" not in text


def test_end_of_input_ends_cleanly(tiny_chat_ckpt):
    pid, fd = spawn(["chat", "--checkpoint", str(tiny_chat_ckpt)])
    out: list[str] = []
    read_until(fd, "User: ", out)
    os.write(fd, b"\x04")  # Ctrl-D: end of input
    code = finish(pid, fd, out)
    assert code == 0 and "".join(out).rstrip().endswith("Goodbye!") and "Traceback" not in "".join(out)


def test_quit_and_keyboard_interrupt_in_process(tiny_chat_ckpt):
    loaded = load_any(tiny_chat_ckpt)
    written = []
    lines = iter(["", "hi", "quit", "never read"])
    tokens = chat(loaded.model, loaded.tokenizer, read=lambda _: next(lines), temperature=0.0, max_tokens=4,
                  write=written.append)
    assert tokens.count(loaded.tokenizer.encode_special("<|user_start|>")) == 1 and written[-1] == "\nGoodbye!\n"

    def interrupt(_):
        raise KeyboardInterrupt

    assert chat(loaded.model, loaded.tokenizer, read=interrupt, write=written.append) == [
        loaded.tokenizer.get_bos_token_id()]
    assert torch.is_grad_enabled()  # the engine's inference mode did not leak out

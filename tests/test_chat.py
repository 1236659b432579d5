"""Chat rendering (nanochat d575940 nanochat/tokenizer.py), token by token, on a byte-level tokenizer where text ids are
its UTF-8 bytes."""
from __future__ import annotations

import copy

import pytest

from nanolit.common import NanolitError
from nanolit.data.chat import render_conversation, render_for_completion
from nanolit.tokenizer import SPECIAL_TOKENS, Tokenizer

# Byte-level vocab: ids 0-255 are bytes, then the 9 specials in nanochat d575940 nanochat/tokenizer.py order.
BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END, PYTHON_START, PYTHON_END, OUTPUT_START, OUTPUT_END = range(
    256, 265
)


@pytest.fixture(scope="module")
def tok(byte_tokenizer) -> Tokenizer:
    return byte_tokenizer


def text(s: str, mask: int) -> list[tuple[int, int]]:
    return [(b, mask) for b in s.encode("utf-8")]


def unzip(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    return [i for i, _ in pairs], [m for _, m in pairs]


def conv(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_string_turns_token_by_token(tok):
    ids, mask = render_conversation(tok, conv(("user", "hi"), ("assistant", "yo"), ("user", "é?"), ("assistant", "k")))
    expected = [
        (BOS, 0), (USER_START, 0), *text("hi", 0), (USER_END, 0),
        (ASSISTANT_START, 0), *text("yo", 1), (ASSISTANT_END, 1),
        (USER_START, 0), *text("é?", 0), (USER_END, 0),
        (ASSISTANT_START, 0), *text("k", 1), (ASSISTANT_END, 1),
    ]
    assert (ids, mask) == unzip(expected)


def test_assistant_parts_tokens_and_masks(tok):
    parts = [
        {"type": "text", "text": "a="},
        {"type": "python", "text": "1+1"},
        {"type": "python_output", "text": "2"},
        {"type": "text", "text": ""},
        {"type": "text", "text": "#### 2"},
    ]
    ids, mask = render_conversation(tok, conv(("user", "q"), ("assistant", parts)))
    expected = [
        (BOS, 0), (USER_START, 0), *text("q", 0), (USER_END, 0),
        (ASSISTANT_START, 0),
        *text("a=", 1),
        (PYTHON_START, 1), *text("1+1", 1), (PYTHON_END, 1),
        (OUTPUT_START, 0), *text("2", 0), (OUTPUT_END, 0),
        *text("#### 2", 1),
        (ASSISTANT_END, 1),
    ]
    assert (ids, mask) == unzip(expected)


def test_system_message_merged_into_first_user_message(tok):
    conversation = conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Ok"))
    before = copy.deepcopy(conversation)
    ids, mask = render_conversation(tok, conversation)
    expected = [
        (BOS, 0), (USER_START, 0), *text("Be brief.\n\nHi", 0), (USER_END, 0),
        (ASSISTANT_START, 0), *text("Ok", 1), (ASSISTANT_END, 1),
    ]
    assert (ids, mask) == unzip(expected)
    assert conversation == before  # the task's record is not edited


def test_truncated_to_max_tokens(tok):
    conversation = conv(("user", "hello"), ("assistant", "world"))
    full_ids, full_mask = render_conversation(tok, conversation)
    assert len(full_ids) == 1 + 1 + 5 + 1 + 1 + 5 + 1
    ids, mask = render_conversation(tok, conversation, max_tokens=9)
    assert (ids, mask) == (full_ids[:9], full_mask[:9])


def test_default_cap_is_2048(tok):
    ids, mask = render_conversation(tok, conv(("user", "x" * 3000), ("assistant", "y")))
    assert len(ids) == len(mask) == 2048
    assert ids[-1] == ord("x")


def test_conversation_may_end_on_a_user_turn(tok):
    ids, _ = render_conversation(tok, conv(("user", "a"), ("assistant", "b"), ("user", "c")))
    assert ids[-3:] == [USER_START, ord("c"), USER_END]


def test_render_for_completion_drops_last_reply_and_opens_the_assistant(tok):
    conversation = conv(("user", "2+2?"), ("assistant", "4"))
    prompt_ids, _ = render_conversation(tok, conv(("user", "2+2?")))
    assert render_for_completion(tok, conversation) == prompt_ids + [ASSISTANT_START]
    assert conversation["messages"][-1]["content"] == "4"
    with pytest.raises(NanolitError, match="last message must be the assistant"):
        render_for_completion(tok, conv(("user", "q")))


@pytest.mark.parametrize(
    "conversation, problem",
    [
        ({"messages": []}, "no messages"),
        ({}, "no messages"),
        (conv(("user", "a"), ("user", "b")), "message 1 has role 'user' where 'assistant'"),
        (conv(("assistant", "a")), "message 0 has role 'assistant' where 'user'"),
        (conv(("user", "a"), ("assistant", "b"), ("system", "c")), "message 2 has role 'system'"),
        (conv(("system", "s"), ("assistant", "b")), "system message must be followed by a user"),
        (conv(("system", "s")), "system message must be followed by a user"),
        (conv(("user", ["part"]),), "user content must be a string"),
        (conv(("user", "q"), ("assistant", [{"type": "image", "text": "x"}])), "unknown type 'image'"),
        (conv(("user", "q"), ("assistant", [{"type": "text"}])), "part that is not"),
        (conv(("user", "q"), ("assistant", 42)), "string or a list of parts"),
        ({"messages": [{"role": "user"}]}, "message 0 is not"),
    ],
)
def test_bad_conversations_name_the_record(tok, conversation, problem):
    with pytest.raises(NanolitError, match=problem) as info:
        render_conversation(tok, conversation, where="identity.jsonl:12")
    assert str(info.value).startswith("identity.jsonl:12: bad conversation: ")
    assert "\n" not in str(info.value)


def test_real_tokenizer_special_ids_and_text(nanochat_d2):
    """With nanochat's d2 tokenizer: specials are its ids (vocab - 9 ...), text is its ordinary encoding."""
    real = Tokenizer.from_directory(nanochat_d2 / "tokenizer")
    ids, mask = render_conversation(real, conv(("user", "Hello there"), ("assistant", "General Kenobi")))
    special = {name: real.encode_special(name) for name in SPECIAL_TOKENS}
    assert special["<|bos|>"] == real.get_vocab_size() - 9
    user, reply = real.encode("Hello there"), real.encode("General Kenobi")
    assert ids == [
        special["<|bos|>"], special["<|user_start|>"], *user, special["<|user_end|>"],
        special["<|assistant_start|>"], *reply, special["<|assistant_end|>"],
    ]
    assert mask == [0, 0] + [0] * len(user) + [0, 0] + [1] * len(reply) + [1]

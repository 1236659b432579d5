"""Chat rendering: a conversation becomes token ids plus a training mask, with nanochat's special tokens (nanochat
d575940 nanochat/tokenizer.py).

A conversation is ``{"messages": [{"role": ..., "content": ...}, ...]}``. Roles alternate user, assistant, user, ...
after an optional leading system message. User content is a string; assistant content is a string or a list of
parts ``{"type": "text" | "python" | "python_output", "text": str}`` (tool calls and their results).

The mask is 1 on tokens the assistant is trained to produce and 0 elsewhere (user turns, tool outputs, BOS and
``<|assistant_start|>``). nanochat's mid-training ignores it (nanochat d575940 nanochat/tokenizer.py);
``MidDataModule(mask_user_tokens=True)`` uses it.
"""
from __future__ import annotations

from nanolit.common import NanolitError

# nanochat d575940 nanochat/tokenizer.py: renders are cut to this many tokens (nanochat's default, also used by
# mid_train).
MAX_TOKENS = 2048

# Part type -> (opening special token, closing special token, mask). nanochat d575940 nanochat/tokenizer.py: the model
# writes text and python calls (mask 1); the tool's output is given to it (mask 0).
_PART_TOKENS = {
    "text": (None, None, 1),
    "python": ("<|python_start|>", "<|python_end|>", 1),
    "python_output": ("<|output_start|>", "<|output_end|>", 0),
}


def render_conversation(
    tokenizer, conversation: dict, max_tokens: int = MAX_TOKENS, where: str | None = None
) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of ``conversation``: BOS, then each turn wrapped in its special tokens, cut to ``max_tokens``.

    ``where`` names the record (e.g. ``"identity.jsonl:12"``) in the error raised for a malformed conversation.
    """
    messages = _chat_messages(conversation, where)
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: int | list[int], value: int) -> None:
        tokens = [tokens] if isinstance(tokens, int) else tokens
        ids.extend(tokens)
        mask.extend([value] * len(tokens))

    special = tokenizer.encode_special
    add(tokenizer.get_bos_token_id(), 0)
    for i, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "user":
            if not isinstance(content, str):
                kind = type(content).__name__
                raise _error(where, f"message {i} (user) has {kind} content; user content must be a string")
            add(special("<|user_start|>"), 0)
            add(tokenizer.encode(content), 0)
            add(special("<|user_end|>"), 0)
            continue
        add(special("<|assistant_start|>"), 0)
        if isinstance(content, str):
            add(tokenizer.encode(content), 1)
        elif isinstance(content, list):
            for part in content:
                start, end, value = _part_tokens(part, i, where)
                if start is not None:
                    add(special(start), value)
                add(tokenizer.encode(part["text"]), value)
                if end is not None:
                    add(special(end), value)
        else:
            raise _error(
                where, f"message {i} (assistant) has {type(content).__name__} content; use a string or a list of parts"
            )
        add(special("<|assistant_end|>"), 1)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer, conversation: dict, where: str | None = None) -> list[int]:
    """Prompt ids for sampling the assistant's reply: the conversation minus its last (assistant) message,
    rendered, then ``<|assistant_start|>`` (nanochat d575940 scripts/tok_train.py)."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise _error(where, "the last message must be the assistant's (it is the one to be completed)")
    ids, _ = render_conversation(tokenizer, {**conversation, "messages": messages[:-1]}, where=where)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


def _chat_messages(conversation: dict, where: str | None) -> list[dict]:
    """The messages to render: a leading system message merged into the first user message (nanochat d575940
    nanochat/tokenizer.py), roles checked."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise _error(where, 'no messages; expected {"messages": [{"role": ..., "content": ...}, ...]}')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _error(where, f"message {i} is not a {{'role': ..., 'content': ...}} object")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise _error(where, "a system message must be followed by a user message")
        system, user = messages[0]["content"], messages[1]["content"]
        if not (isinstance(system, str) and isinstance(user, str)):
            raise _error(where, "the system message and the first user message must have string content")
        # Copy rather than edit: tasks hand out their stored records.
        messages = [{**messages[1], "content": system + "\n\n" + user}, *messages[2:]]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise _error(
                where,
                f"message {i} has role {message['role']!r} where {expected!r} was expected; "
                "roles must alternate user, assistant, user, ... (after an optional first system message)",
            )
    return messages


def _part_tokens(part, index: int, where: str | None) -> tuple[str | None, str | None, int]:
    if not isinstance(part, dict) or not isinstance(part.get("text"), str):
        raise _error(where, f"message {index} has a part that is not a {{'type': ..., 'text': str}} object")
    kind = part.get("type")
    if kind not in _PART_TOKENS:
        known = ", ".join(_PART_TOKENS)
        raise _error(where, f"message {index} has a part of unknown type {kind!r}; use one of {known}")
    return _PART_TOKENS[kind]


def _error(where: str | None, problem: str) -> NanolitError:
    prefix = f"{where}: " if where else ""
    return NanolitError(f"{prefix}bad conversation: {problem}")

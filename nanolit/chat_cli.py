"""Talk to a chat model in the terminal (nanochat d575940 scripts/chat_cli.py) on nanolit's KV-cache engine.

The conversation is kept as tokens: ``<|bos|>``, then per turn ``<|user_start|>`` text ``<|user_end|>``
``<|assistant_start|>`` reply ``<|assistant_end|>``, exactly what :func:`nanolit.data.chat.render_conversation`
gives for the same messages. Replies stream token by token; when the model calls the calculator
(``<|python_start|>expr<|python_end|>``) the engine inserts the result, and both are shown.
"""
from __future__ import annotations

import codecs
import sys
from typing import Callable

from nanolit.common import NanolitError
from nanolit.engine import Engine

MAX_REPLY_TOKENS = 256  # chat_cli's max_tokens per reply
TEMPERATURE, TOP_K = 0.6, 50  # chat_cli's defaults
CHAT_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")
BANNER = ("\nnanolit chat\n" + "-" * 50 + "\nType 'quit' or 'exit' to end the conversation\n"
          "Type 'clear' to start a new conversation\n" + "-" * 50)


def require_chat_model(phase: str, tokenizer, checkpoint: str) -> None:
    """Refuse a model that cannot hold a conversation: its tokenizer lacks the chat tokens, or it is a base model
    (pretraining only; :func:`nanolit.checkpoint.checkpoint_phase` decides)."""
    missing = [name for name in CHAT_TOKENS if name not in tokenizer.get_special_tokens()]
    if missing:
        raise NanolitError(f"the tokenizer of {checkpoint} has no {missing[0]} token, so it cannot hold a "
                           f"conversation; use `nanolit sample --checkpoint {checkpoint}` for plain completions")
    if phase == "base":
        raise NanolitError(f"{checkpoint} is a base model (pretraining only) and has not learned to chat; "
                           f"use `nanolit sample --checkpoint {checkpoint}`, or chat with a mid-trained model")


class TokenText:
    """Text of a token stream as it grows: a character split over several byte-level tokens is printed once
    complete (nanochat decodes each token alone, which shows U+FFFD for the pieces)."""

    def __init__(self, tokenizer):
        self.enc = tokenizer.enc
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> str:
        return self.decoder.decode(self.enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def stream_reply(engine: Engine, conversation: list[int], write: Callable[[str], None], temperature: float,
                 top_k: int | None, max_tokens: int = MAX_REPLY_TOKENS, seed: int = 42) -> list[int]:
    """Generate the assistant's reply to ``conversation`` (which ends with ``<|assistant_start|>``), writing its
    text as it comes; returns the reply's tokens, always ending with ``<|assistant_end|>``."""
    tok = engine.tokenizer
    assistant_end, bos = tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()
    text = TokenText(tok)
    reply: list[int] = []
    for column, _ in engine.generate(conversation, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                     top_k=top_k, seed=seed):
        token = column[0]
        reply.append(token)
        if token not in (assistant_end, bos):  # the end marker is not part of the reply's text
            write(text(token))
    write(text.flush())
    # A reply cut at max_tokens (or ended by <|bos|>) is closed so the next turn renders like a finished one.
    if not reply or reply[-1] != assistant_end:
        reply.append(assistant_end)
    return reply


def chat(model, tokenizer, prompt: str | None = None, temperature: float = TEMPERATURE, top_k: int | None = TOP_K,
         max_tokens: int = MAX_REPLY_TOKENS, read: Callable[[str], str] = input,
         write: Callable[[str], None] | None = None) -> list[int]:
    """The chat loop; returns the conversation's tokens when it ends.

    ``prompt``: answer it once and return (only the reply is written). Otherwise read turns with ``read``:
    ``quit``/``exit`` ends, ``clear`` starts over, an empty line is skipped; end of input and Ctrl-C end cleanly.
    """
    write = write or _stdout
    engine = Engine(model, tokenizer)
    special = tokenizer.encode_special
    conversation = [tokenizer.get_bos_token_id()]
    if prompt is None:
        write(BANNER + "\n")
    try:
        while True:
            if prompt is not None:
                user = prompt
            else:
                try:
                    user = read("\nUser: ").strip()
                except EOFError:
                    break
            if user.lower() in ("quit", "exit"):
                break
            if user.lower() == "clear":
                conversation = [tokenizer.get_bos_token_id()]
                write("Conversation cleared.\n")
                continue
            if not user:
                continue
            conversation += [special("<|user_start|>"), *tokenizer.encode(user), special("<|user_end|>"),
                             special("<|assistant_start|>")]
            if prompt is None:
                write("\nAssistant: ")
            conversation += stream_reply(engine, conversation, write, temperature, top_k, max_tokens)
            write("\n")
            if prompt is not None:
                return conversation
    except KeyboardInterrupt:
        pass
    if prompt is None:
        write("\nGoodbye!\n")
    return conversation


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()

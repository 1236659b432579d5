"""Engine: calculator tool, tool state machine, batched generation."""
import json

import pytest
import torch

from nanolit.engine import Engine, use_calculator
from nanolit.model import GPTConfig, build_gpt
from nanolit.tokenizer import Tokenizer


@pytest.mark.parametrize("expr,value", [
    ("1+2*3", 7), ("(10 - 4) / 3", 2.0), ("1,000 * 2", 2000), ("-3 + +4", 1),
    ("'strawberry'.count('r')", 3),
])
def test_calculator_allows_arithmetic_and_count(expr, value):
    assert use_calculator(expr) == value


@pytest.mark.parametrize("expr", [
    "2**10", "__import__('os').system('true')", "open('x')", "1/0", "abc", "'a'.upper()", "9" * 20 + "*" + "9" * 20,
])
def test_calculator_rejects_everything_else(expr):
    assert use_calculator(expr) is None


class ScriptedModel(torch.nn.Module):
    """A model whose greedy output follows a fixed script regardless of input (to drive the tool machine)."""

    def __init__(self, script, vocab, config):
        super().__init__()
        self.script, self.vocab, self.config = script, vocab, config
        self.calls = 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def get_device(self):
        return self.anchor.device

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        if kv_cache is not None:  # fill the cache like a real model, so the engine's prefill copy works
            c = self.config
            kv = torch.zeros(B, c.n_kv_head, T, c.n_embd // c.n_head)
            for layer in range(c.n_layer):
                kv_cache.insert_kv(layer, kv, kv)
        logits = torch.zeros(B, T, self.vocab)
        tok = self.script[min(self.calls, len(self.script) - 1)]
        logits[:, -1, tok] = 1.0
        self.calls += 1
        return logits


def test_tool_use_forces_calculator_output(nanochat_d2):
    tok = Tokenizer.from_directory(nanochat_d2 / "tokenizer")
    sp = tok.encode_special
    expr = tok.encode("12*3")
    script = [sp("<|python_start|>"), *expr, sp("<|python_end|>"), 5, 6, 7, 8, 9, sp("<|assistant_end|>")]
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
    engine = Engine(ScriptedModel(script, tok.get_vocab_size(), config), tok)
    results, masks = engine.generate_batch([tok.get_bos_token_id()], num_samples=2, max_tokens=40, temperature=0.0)
    out = results[0][1:]
    forced = [sp("<|output_start|>"), *tok.encode("36"), sp("<|output_end|>")]
    n = len(expr) + 2
    assert out[:n] == script[:n]
    assert out[n:n + len(forced)] == forced
    assert masks[0][1 + n:1 + n + len(forced)] == [0] * len(forced)
    assert masks[0][1:1 + n] == [1] * n
    assert results[0] == results[1]
    assert sp("<|assistant_end|>") not in results[0]


def test_engine_greedy_equals_model_generate(nanochat_d2, expected_d2):
    meta = json.loads((nanochat_d2 / "meta_000050.json").read_text())
    model = build_gpt(GPTConfig(**meta["model_config"]))
    model.load_state_dict(torch.load(nanochat_d2 / "model_000050.pt", weights_only=True))
    tok = Tokenizer.from_directory(nanochat_d2 / "tokenizer")
    results, _ = Engine(model.eval(), tok).generate_batch(expected_d2["prompt_ids"], num_samples=1,
                                                          max_tokens=16, temperature=0.0)
    assert results[0][len(expected_d2["prompt_ids"]):] == expected_d2["greedy16"]

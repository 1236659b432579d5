"""Hugging Face transformers format both ways, checked against nanolit's model, tokenizer and chat rendering.

Needs the ``hf`` extra (transformers >= 5.0); the tests that need it are skipped, visibly, without it.
"""
from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest
import torch

from nanolit.checkpoint import load_any, load_nanochat
from nanolit.cli import main
from nanolit.common import NanolitError
from nanolit.data.chat import render_conversation, render_for_completion

MULTILINGUAL = ("Hello wörld! Ça va? 日本語のテキスト、한국어 텍스트, русский текст 🙂🚀👩‍👩‍👧 naïve café\n\n"
                "def f(x):\n    return x**2  # 12345 678\r\n\t<tab> they'll we've I'M  spaces   end\u00a0\u200b")

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12*3?"},
                  {"role": "assistant", "content": [
                      {"type": "text", "text": "Let me compute: "}, {"type": "python", "text": "12*3"},
                      {"type": "python_output", "text": "36"}, {"type": "text", "text": "\n\n#### 36"}]},
                  {"role": "user", "content": "Thanks 🙂"}, {"role": "assistant", "content": "You're welcome."}]},
    {"messages": [{"role": "user", "content": "Spell 'naïve'"}, {"role": "assistant", "content": "naïve:n,a,ï,v,e"},
                  {"role": "user", "content": "Multiple Choice question: 2+2?\n- 4=A\n- 5=B\n"},
                  {"role": "assistant", "content": "A"}]},
]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", minversion="5.0", reason="the hf extra (pip install 'nanolit[hf]')")


@pytest.fixture(scope="module")
def hf_d2(transformers, nanochat_d2, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "d2"
    main(["export", "hf", "--checkpoint", str(nanochat_d2), "--out", str(out)])
    return out


def fp32_rotary(model):
    """Replace nanochat's bf16 rotary tables by the fp32 values they round (what transformers computes)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, model.head_dim, 2, dtype=torch.float32) / model.head_dim))
    freqs = torch.outer(torch.arange(model.cos.size(1), dtype=torch.float32), inv_freq)
    model.cos, model.sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    return model


def test_logits_match_nanolit(transformers, hf_d2, nanochat_d2, expected_d2):
    ids = torch.tensor(expected_d2["batch_ids"]).view(2, 257)[:, :-1]
    model = load_nanochat(nanochat_d2)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_d2).eval()
    assert type(hf).__name__ == "NanoChatForCausalLM"
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        # nanochat rounds its rotary tables to bf16 (relative 2^-9 on every q and k entry), transformers does not:
        # measured 2.1e-3 on logits of size up to 8.3; 1e-2 leaves 5x room and is far below the logit gaps
        assert (ours - theirs).abs().max() < 1e-2
        assert theirs[0, -1].topk(5).indices.tolist() == expected_d2["logits_top5_row0_last"]
        # with the same rotary values the two models are the same fp32 arithmetic: measured 0.0; 1e-5 allows
        # another summation order over logits of size ~10 (fp32 eps 1.2e-7 times a few hundred terms)
        exact = fp32_rotary(model)(ids)
        assert (exact - theirs).abs().max() < 1e-5
        # transformers' default eps 1e-6 instead of torch's 1.19e-7 moves logits by ~6e-6: small, but measurable
        other = transformers.AutoModelForCausalLM.from_pretrained(hf_d2, rms_norm_eps=1e-6).eval()
        moved = (exact - other(ids).logits).abs().max()
    assert 1e-7 < moved < 1e-4


def test_greedy_generate_gives_nanochats_tokens(transformers, hf_d2, expected_d2):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_d2).eval()
    prompt = torch.tensor([expected_d2["prompt_ids"]])
    out = hf.generate(prompt, max_new_tokens=16, do_sample=False)
    assert out[0, prompt.size(1):].tolist() == expected_d2["greedy16"]


def test_tokenizer_encodes_like_nanolit(transformers, hf_d2, nanochat_d2):
    ours = load_any(nanochat_d2).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(hf_d2)
    texts = [MULTILINGUAL, *pq.read_table(nanochat_d2 / "base_data" / "shard_00004.parquet").column("text")
             .to_pylist()[:200]]
    assert theirs(texts, add_special_tokens=False)["input_ids"] == ours.encode(texts)
    assert theirs.decode(ours.encode(MULTILINGUAL)) == MULTILINGUAL
    assert {name: theirs.convert_tokens_to_ids(name) for name in ours.get_special_tokens()} == {
        name: ours.encode_special(name) for name in ours.get_special_tokens()}
    assert theirs.bos_token_id == ours.get_bos_token_id() and len(theirs) == ours.get_vocab_size()


def test_chat_template_renders_like_nanolit(transformers, hf_d2, nanochat_d2):
    ours = load_any(nanochat_d2).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(hf_d2)
    for conversation in CONVERSATIONS:
        messages = conversation["messages"]
        ids, _ = render_conversation(ours, conversation)
        assert theirs.apply_chat_template(messages, tokenize=True, return_dict=False) == ids
        prompt = theirs.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                            return_dict=False)
        assert prompt == render_for_completion(ours, conversation)


def test_export_then_import_gives_identical_tensors(transformers, hf_d2, nanochat_d2, tmp_path, capsys):
    main(["import", "hf", str(hf_d2), "--out", str(tmp_path / "base")])
    folder = tmp_path / "base" / "base_checkpoints" / "d2"  # the exported phase (base) and nanochat's d<depth> tag
    assert str(folder) in capsys.readouterr().out
    want, got = load_nanochat(nanochat_d2)[0].state_dict(), load_nanochat(folder)[0].state_dict()
    assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want)
    loaded, original = load_any(folder), load_any(nanochat_d2)
    assert (loaded.step, loaded.phase) == (50, "base")
    enc, ref = loaded.tokenizer.enc, original.tokenizer.enc
    assert (enc._mergeable_ranks, enc._pat_str, enc._special_tokens) == (
        ref._mergeable_ranks, ref._pat_str, ref._special_tokens)
    meta = json.loads((folder / "meta_000050.json").read_text())
    assert meta["model_config"] == json.loads((nanochat_d2 / "meta_000050.json").read_text())["model_config"]
    # importing again into the same base dir reuses its tokenizer
    main(["import", "hf", str(hf_d2), "--out", str(tmp_path / "base"), "--source", "mid"])
    assert load_any(tmp_path / "base" / "mid_checkpoints" / "d2").phase == "mid"


def test_chat_checkpoint_round_trip(transformers, tiny_chat_ckpt, hf_d2, tmp_path, capsys):
    """A nanolit .ckpt (byte-level tokenizer, chat phase) goes out and back as a chat (SFT) model."""
    main(["export", "hf", "--checkpoint", str(tiny_chat_ckpt), "--out", str(tmp_path / "hf")])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    byte_level = load_any(tiny_chat_ckpt).tokenizer
    for conversation in CONVERSATIONS:
        assert tok.apply_chat_template(conversation["messages"], return_dict=False) == render_conversation(
            byte_level, conversation)[0]
    main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "base")])
    back = load_any(tmp_path / "base" / "chatsft_checkpoints" / "d1")
    assert back.phase == "sft" and back.step == 7
    want = load_any(tiny_chat_ckpt).model.state_dict()
    assert all(torch.equal(want[k], v) for k, v in back.model.state_dict().items())
    with pytest.raises(SystemExit):  # the d2 model's tokenizer is not the one this base dir already holds
        main(["import", "hf", str(hf_d2), "--out", str(tmp_path / "base")])
    assert "holds another tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "base" / "base_checkpoints").exists()


def test_2026_architecture_and_foreign_models_are_refused(transformers, hf_d2, nanochat_d2, tmp_path, capsys):
    folder = tmp_path / "mar2026"
    folder.mkdir()
    state = torch.load(nanochat_d2 / "model_000050.pt", weights_only=True)
    torch.save({**state, "resid_lambdas": torch.ones(2), "smear_gate.weight": torch.ones(1)},
               folder / "model_000050.pt")
    (folder / "meta_000050.json").write_text((nanochat_d2 / "meta_000050.json").read_text())
    with pytest.raises(SystemExit) as e:
        main(["export", "hf", "--checkpoint", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "mar2026 architecture" in err[0] and "cannot express" in err[0]
    assert not (tmp_path / "out" / "config.json").exists()

    llama = tmp_path / "llama"
    llama.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (llama / name).write_bytes((hf_d2 / name).read_bytes())
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(SystemExit):
        main(["import", "hf", str(llama), "--out", str(tmp_path / "base")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_type='llama'" in err[0]


def test_missing_transformers_is_one_line(monkeypatch, nanochat_d2, tmp_path):
    from nanolit.hf import export_hf

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(NanolitError, match=r"install it with pip install 'nanolit\[hf\]'"):
        export_hf(nanochat_d2, tmp_path / "out")

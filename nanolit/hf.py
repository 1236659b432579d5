"""Hugging Face transformers format, both ways: ``NanoChatForCausalLM`` folders from nanolit/nanochat models and back.

transformers (>= 5.0) ships ``NanoChatForCausalLM``, the architecture of nanochat d575940: rotary then QK-norm,
parameter-free RMSNorm, ReLU² MLP, untied head, logits softcapped at 15. An export folder holds ``config.json``,
``generation_config.json``, ``model.safetensors``, the tokenizer files that ``AutoTokenizer.from_pretrained`` reads
(``tokenizer.json`` with the same byte-level BPE, split pattern and special tokens, and a chat template that renders
conversations as :mod:`nanolit.data.chat` does), and ``nanolit.json`` (the training phase, step and meta, so an
import lands where it came from).

Numerics: ``rms_norm_eps`` is set to torch's default for fp32 (``finfo(float32).eps``), which nanochat's
``F.rms_norm`` uses; transformers' 1e-6 moves the d2 fixture's logits by about 1e-5. nanochat stores its rotary
tables in bf16, transformers computes them in fp32: that rounding (relative 2^-9) is the one difference left, and
moves the fixture's logits by a few 1e-4 (tests/test_hf.py measures both).
"""
from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

import tiktoken
import torch

from nanolit.checkpoint import SOURCE_DIRS, detect_architecture, load_any, save_nanochat_checkpoint
from nanolit.common import NanolitError, get_base_dir
from nanolit.model import ROTARY_BASE, SOFTCAP, GPTConfig
from nanolit.tokenizer import Tokenizer

NANOLIT_FILE = "nanolit.json"
HF_INSTALL = "pip install 'nanolit[hf]'"

# nanolit (= nanochat) parameter names -> NanoChatForCausalLM's; {i} is the layer.
_LAYER_KEYS = {
    "transformer.h.{i}.attn.c_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "transformer.h.{i}.attn.c_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "transformer.h.{i}.attn.c_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "transformer.h.{i}.attn.c_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "transformer.h.{i}.mlp.c_fc.weight": "model.layers.{i}.mlp.fc1.weight",
    "transformer.h.{i}.mlp.c_proj.weight": "model.layers.{i}.mlp.fc2.weight",
}
_GLOBAL_KEYS = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}

# Renders a conversation exactly as nanolit.data.chat.render_conversation (nanochat's render_conversation):
# <|bos|>, a first system message merged into the first user message with a blank line, user turns in
# <|user_start|>..<|user_end|>, assistant turns in <|assistant_start|>..<|assistant_end|> with list content as text,
# python (<|python_start|>..<|python_end|>) and python_output (<|output_start|>..<|output_end|>) parts.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "<|bos|>"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user_start|>{{ ns.system + message['content'] }}<|user_end|>{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}<|assistant_start|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}<|python_start|>{{ part['text'] }}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{ part['text'] }}<|output_end|>"
    "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|assistant_end|>"
    "{%- else -%}{{ raise_exception('roles must be system (first only), user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise NanolitError(f"the Hugging Face format needs transformers >= 5.0; install it with {HF_INSTALL}") from None
    if not hasattr(transformers, "NanoChatConfig"):
        raise NanolitError(f"transformers {transformers.__version__} has no NanoChat model (it came in 5.0); "
                           f"upgrade it with {HF_INSTALL}")
    return transformers


def to_hf_state_dict(state_dict: dict, n_layer: int) -> dict:
    """nanolit parameter names -> NanoChatForCausalLM's (the tensors themselves are not copied)."""
    names = dict(_GLOBAL_KEYS)
    for i in range(n_layer):
        names.update({ours.format(i=i): theirs.format(i=i) for ours, theirs in _LAYER_KEYS.items()})
    return _rename(state_dict, names)


def from_hf_state_dict(state_dict: dict, n_layer: int) -> dict:
    """NanoChatForCausalLM parameter names -> nanolit's."""
    ours = to_hf_state_dict({k: k for k in _nanolit_keys(n_layer)}, n_layer)
    return _rename(state_dict, {theirs: mine for theirs, mine in ours.items()})


def _nanolit_keys(n_layer: int) -> list[str]:
    return [*_GLOBAL_KEYS, *(k.format(i=i) for i in range(n_layer) for k in _LAYER_KEYS)]


def _rename(state_dict: dict, names: dict) -> dict:
    if set(state_dict) != set(names):
        extra, missing = sorted(set(state_dict) - set(names)), sorted(set(names) - set(state_dict))
        raise NanolitError(f"parameter names do not match a NanoChat model: unexpected {extra[:3]}, missing "
                           f"{missing[:3]}; this is not a Dec-2025 nanochat model")
    return {names[k]: v for k, v in state_dict.items()}


def hf_config(config: GPTConfig, tokenizer: Tokenizer):
    """The ``NanoChatConfig`` of a nanolit model (fp32 weights, nanochat's eps, rotary base and softcap)."""
    tf = _transformers()
    return tf.NanoChatConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=4 * config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.sequence_len, hidden_act="relu2",
        rms_norm_eps=torch.finfo(torch.float32).eps,  # F.rms_norm's default for fp32 (module docstring)
        rope_parameters={"rope_type": "default", "rope_theta": float(ROTARY_BASE)},
        final_logit_softcapping=SOFTCAP, attention_bias=False, tie_word_embeddings=False,
        bos_token_id=tokenizer.get_bos_token_id(), eos_token_id=tokenizer.encode_special("<|assistant_end|>"),
        pad_token_id=tokenizer.get_bos_token_id(), dtype="float32",
    )


def hf_tokenizer(tokenizer: Tokenizer):
    """A ``PreTrainedTokenizerFast`` with the same BPE, split pattern and special tokens, and nanochat's chat template.

    transformers' own tiktoken converter derives the merges from the ranks (it reads them from a tiktoken file).
    """
    tf = _transformers()
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = tokenizer.enc
    specials = tokenizer.get_special_tokens()
    with tempfile.TemporaryDirectory() as tmp:
        ranks_file = os.path.join(tmp, "ranks.tiktoken")
        # tiktoken's file format, one "base64(token) rank" line per token (tiktoken's own writer needs blobfile)
        lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in enc._mergeable_ranks.items())
        Path(ranks_file).write_text("".join(lines))
        backend = TikTokenConverter(vocab_file=ranks_file, pattern=enc._pat_str,
                                    extra_special_tokens=specials).converted()
    for name in specials:  # the converter appends specials in order: check they kept tokenizer.pkl's ids
        if backend.token_to_id(name) != tokenizer.encode_special(name):
            raise NanolitError(f"special token {name} would get id {backend.token_to_id(name)}, not "
                               f"{tokenizer.encode_special(name)}; the tokenizer's special ids are not after its BPE ids")
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|assistant_end|>",
                                      pad_token="<|bos|>", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
              tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a nanolit ``.ckpt`` or nanochat folder as a transformers NanoChat folder ``out_dir``; returns it.

    Files are staged in a temporary folder beside ``out_dir`` and renamed into it one by one.
    """
    tf = _transformers()
    from safetensors.torch import save_file

    _check_exportable(Path(checkpoint), step)
    loaded = load_any(checkpoint, step, tokenizer_dir, "cpu")
    config = loaded.model.config
    tensors = {k: v.detach().float().contiguous() for k, v in loaded.model.state_dict().items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as stage:
        save_file(to_hf_state_dict(tensors, config.n_layer), os.path.join(stage, "model.safetensors"),
                  metadata={"format": "pt"})
        hf_config(config, loaded.tokenizer).save_pretrained(stage)
        stops = [loaded.tokenizer.encode_special("<|assistant_end|>"), loaded.tokenizer.get_bos_token_id()]
        # the engine ends a reply at <|assistant_end|> or <|bos|>; generate() stops at either too
        tf.GenerationConfig(bos_token_id=stops[1], eos_token_id=stops, pad_token_id=stops[1]).save_pretrained(stage)
        hf_tokenizer(loaded.tokenizer).save_pretrained(stage)
        record = {"phase": loaded.phase, "step": loaded.step,
                  "meta": loaded.record if Path(checkpoint).is_dir() else {"user_config": loaded.record}}
        Path(stage, NANOLIT_FILE).write_text(json.dumps(record, indent=2, default=str))
        for path in sorted(Path(stage).iterdir()):
            os.replace(path, out_dir / path.name)
    return out_dir


def _check_exportable(checkpoint: Path, step: int | None) -> None:
    """Refuse nanochat's 2026 architectures before loading, with the reason transformers cannot hold them."""
    if not checkpoint.is_dir():
        return  # a nanolit .ckpt is always the Dec-2025 architecture
    from nanolit.checkpoint import find_last_step

    step = find_last_step(checkpoint) if step is None else step
    path = checkpoint / f"model_{step:06d}.pt"
    if not path.is_file():
        return  # load_any names the missing file
    try:
        keys = torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()
    except Exception:  # load_any gives the one-line reason for an unreadable file
        return
    era = detect_architecture(dict.fromkeys(keys))
    if era != "dec2025":
        raise NanolitError(f"{path} is nanochat's {era} architecture, which transformers' NanoChatForCausalLM "
                           "cannot express (it is nanochat's Dec-2025 model); export a model of that architecture")


# --------------------------------------------------------------------------------------------------------- import
def tiktoken_from_hf(tokenizer_json: dict, name: str = "rustbpe") -> tiktoken.Encoding:
    """The tiktoken Encoding of a byte-level BPE ``tokenizer.json`` whose pre-tokenizer splits on one regex.

    tiktoken needs only the ranks (a token's id is its rank), the split pattern and the special tokens.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise NanolitError(f"tokenizer.json holds a {model.get('type')} model, not byte-level BPE; nanolit cannot "
                           "use it")
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    added = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    try:
        ranks = {bytes(byte_of[c] for c in token): rank for token, rank in model["vocab"].items() if token not in added}
    except KeyError:
        raise NanolitError("tokenizer.json's vocab is not byte-level (a character outside GPT-2's byte alphabet); "
                           "nanolit cannot use it") from None
    return tiktoken.Encoding(name=name, pat_str=_split_pattern(tokenizer_json.get("pre_tokenizer")),
                             mergeable_ranks=ranks, special_tokens=added)


def _split_pattern(pre_tokenizer: dict | None) -> str:
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])
    splits = [s["pattern"]["Regex"] for s in steps if s.get("type") == "Split" and "Regex" in s.get("pattern", {})]
    if len(splits) != 1:
        raise NanolitError("tokenizer.json's pre-tokenizer does not split on exactly one regex; nanolit cannot "
                           "rebuild its tiktoken pattern")
    return splits[0]


def _gpt_config(config: dict) -> GPTConfig:
    """nanolit's GPTConfig of a NanoChat ``config.json``; anything the Dec-2025 model cannot do is refused."""
    def expect(key, want, ok=None):
        value = config.get(key, want)
        if not (ok(value) if ok else value == want):
            raise NanolitError(f"config.json has {key}={value!r} where nanochat's model needs {want!r}; "
                               "nanolit cannot import it")

    expect("model_type", "nanochat")
    expect("hidden_act", "relu2")
    expect("final_logit_softcapping", SOFTCAP)
    expect("tie_word_embeddings", False)
    expect("attention_bias", False)
    expect("intermediate_size", 4 * config.get("hidden_size", 0))
    expect("head_dim", config["hidden_size"] // config["num_attention_heads"])
    expect("rope_parameters", {"rope_type": "default", "rope_theta": ROTARY_BASE},
           lambda r: r.get("rope_type", "default") == "default" and float(r.get("rope_theta")) == ROTARY_BASE)
    return GPTConfig(sequence_len=config["max_position_embeddings"], vocab_size=config["vocab_size"],
                     n_layer=config["num_hidden_layers"], n_head=config["num_attention_heads"],
                     n_kv_head=config.get("num_key_value_heads") or config["num_attention_heads"],
                     n_embd=config["hidden_size"])


def _load_safetensors(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(hf_dir / shard).items()}
    if not (hf_dir / "model.safetensors").is_file():
        raise NanolitError(f"no model.safetensors in {hf_dir}; pass a transformers model folder")
    return load_file(hf_dir / "model.safetensors")


def import_hf(hf_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None, source: str | None = None,
              model_tag: str | None = None) -> Path:
    """Write a transformers NanoChat folder in nanochat's layout under ``base_dir``; returns the checkpoint folder.

    The tokenizer goes to ``<base_dir>/tokenizer/`` (an existing one must be the same), the weights and meta to
    ``<base_dir>/<source>_checkpoints/<model_tag or d{depth}>/``. ``source`` defaults to the phase recorded by
    :func:`export_hf`, else ``sft`` when the tokenizer has a chat template and ``base`` when it has none.
    """
    _transformers()
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file() or not (hf_dir / "tokenizer.json").is_file():
        raise NanolitError(f"{hf_dir} has no config.json and tokenizer.json; pass a transformers model folder")
    config = _gpt_config(json.loads((hf_dir / "config.json").read_text()))
    state = from_hf_state_dict(_load_safetensors(hf_dir), config.n_layer)
    tokenizer = Tokenizer(tiktoken_from_hf(json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))))
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise NanolitError(f"{hf_dir}'s tokenizer has {tokenizer.get_vocab_size()} tokens but its model "
                           f"{config.vocab_size}; the folder mixes two models")
    record = json.loads((hf_dir / NANOLIT_FILE).read_text()) if (hf_dir / NANOLIT_FILE).is_file() else {}
    source = source or _phase_source(record.get("phase"), hf_dir)
    if source not in SOURCE_DIRS:
        raise NanolitError(f"unknown source {source!r}; use one of {', '.join(SOURCE_DIRS)}")
    base = get_base_dir(base_dir, create=True)
    _save_tokenizer(tokenizer, base / "tokenizer")
    folder = base / SOURCE_DIRS[source] / (model_tag or f"d{config.n_layer}")
    step = int(record.get("step", 0))
    meta = {**record.get("meta", {}), "step": step, "model_config": config.to_dict(), "imported_from": str(hf_dir)}
    save_nanochat_checkpoint(folder, step, state, None, meta)
    return folder


def _phase_source(phase: str | None, hf_dir: Path) -> str:
    """The checkpoint folder for a recorded phase; without one, a chat template marks a chat (SFT) model."""
    if phase in SOURCE_DIRS:
        return phase
    if phase == "chat":
        return "sft"
    config = hf_dir / "tokenizer_config.json"
    in_config = config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8"))
    return "sft" if in_config or (hf_dir / "chat_template.jinja").is_file() else "base"


def _save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """Save unless ``folder`` already holds a tokenizer, which must then be the same one."""
    if not (folder / "tokenizer.pkl").is_file():
        tokenizer.save(folder)
        return
    existing = Tokenizer.from_directory(folder).enc
    same = (existing._mergeable_ranks == tokenizer.enc._mergeable_ranks and existing._pat_str == tokenizer.enc._pat_str
            and existing._special_tokens == tokenizer.enc._special_tokens)
    if not same:
        raise NanolitError(f"{folder} holds another tokenizer; import into a new base dir with --out")

"""Checkpoints in nanochat's on-disk format (nanochat d575940 scripts/base_train.py, nanochat/checkpoint_manager.py), so
nanochat and nanolit read each other's files.

A checkpoint dir (``<base>/base_checkpoints/d20/``) holds, per saved step:
``model_{step:06d}.pt`` (the uncompiled model's state_dict), ``meta_{step:06d}.json`` (indent 2) and
``optim_{step:06d}_rank{r}.pt`` (one file per rank).

Two generations, told apart by the model's keys: nanochat d575940 (Dec 2025, ``nanolit.model.GPT``; an optimizer
file is the list ``[adamw, muon]`` of state dicts) and nanochat 92d63d4 (July 2026, ``nanolit.model2026.GPT2026``;
an optimizer file is one ``MuonAdamW`` state dict, rank r's shard of it under W ranks, and the meta json also has
``total_batch_size``, ``model_config.window_pattern`` and ``dataloader_state_dict.epoch``).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanolit.common import NanolitError, atomic_write, get_base_dir, load_tensors
from nanolit.tokenizer import Tokenizer, get_tokenizer

if TYPE_CHECKING:
    from nanolit.model import GPT
    from nanolit.model2026 import GPT2026

# nanochat d575940 nanochat/checkpoint_manager.py: load_model's source names and the base-dir folders they live in.
SOURCE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}

# nanochat d575940 nanochat/gpt.py: every state_dict key of the Dec-2025 architecture (no biases, norms or positional
# table).
_DEC2025_KEY = re.compile(
    r"transformer\.wte\.weight|lm_head\.weight|transformer\.h\.\d+\.(attn\.c_(q|k|v|proj)|mlp\.c_(fc|proj))\.weight"
)

# Every state_dict key of nanochat 92d63d4 (July 2026): the Dec-2025 keys, value embeddings and their gates, the
# per-layer lambdas, the smear gate and the backout lambda.
_JUL2026_KEY = re.compile(
    r"transformer\.wte\.weight|lm_head\.weight|resid_lambdas|x0_lambdas|smear_lambda|backout_lambda|smear_gate\.weight"
    r"|value_embeds\.\d+\.weight|transformer\.h\.\d+\.(attn\.c_(q|k|v|proj)|attn\.ve_gate|mlp\.c_(fc|proj))\.weight"
)
_JUL2026_MARKERS = ("smear_gate.weight", "backout_lambda", "resid_lambdas", "x0_lambdas")

# later nanochat commits: keys that first appear in later nanochat versions, newest first (a Mar-2026 model has all of
# them).
_NEWER_ERAS = [
    ("smear_", "mar2026", "smear gate and backout lambdas, March 2026 or later"),
    ("value_embeds.", "jan2026-ve", "value embeddings, mid-January 2026 or later"),
    ("resid_lambdas", "jan2026", "per-layer residual lambdas, January 2026"),
]


def _paths(ckpt_dir: Path, step: int, rank: int) -> tuple[Path, Path, Path]:
    return (
        ckpt_dir / f"model_{step:06d}.pt",
        ckpt_dir / f"meta_{step:06d}.json",
        ckpt_dir / f"optim_{step:06d}_rank{rank}.pt",
    )


def save_nanochat_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model_state: dict,
    optim_states: list[dict] | None,
    meta: dict,
    rank: int = 0,
) -> None:
    """Write one step's files like nanochat's ``save_checkpoint`` (nanochat d575940 nanochat/checkpoint_manager.py).

    Rank 0 writes the model and meta; every rank writes its optimizer file when ``optim_states`` is given.
    All files are staged as temporaries first and renamed only once every one was written, model last, so a
    failure mid-save leaves the previous files untouched and ``find_last_step`` never sees a half-saved step.
    """
    model_path, meta_path, optim_path = _paths(Path(ckpt_dir), step, rank)
    # ExitStack exits in reverse order: the renames run optim, meta, model.
    with contextlib.ExitStack() as stack:
        if rank == 0:
            torch.save(model_state, stack.enter_context(atomic_write(model_path)))
            stack.enter_context(atomic_write(meta_path)).write_text(json.dumps(meta, indent=2))
        if optim_states is not None:
            torch.save(optim_states, stack.enter_context(atomic_write(optim_path)))


def load_nanochat_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    device: torch.device | str,
    load_optimizer: bool = False,
    rank: int = 0,
) -> tuple[dict, list[dict] | None, dict]:
    """``(model_state_dict, optimizer_states or None, meta)`` of one step, tensors mapped to ``device``."""
    model_path, meta_path, optim_path = _paths(Path(ckpt_dir), step, rank)
    needed = [model_path, meta_path] + ([optim_path] if load_optimizer else [])
    for path in needed:
        if not path.is_file():
            raise NanolitError(f"checkpoint file {path} is missing; pick a saved step (see {ckpt_dir})")
    model_state = load_tensors(model_path, device)
    optim_states = load_tensors(optim_path, device) if load_optimizer else None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise NanolitError(f"{meta_path} is not valid JSON ({e}); the save was interrupted or the file edited") from None
    return model_state, optim_states, meta


def detect_architecture(state_dict: dict) -> str:
    """Which nanochat architecture a state_dict belongs to, by its key set (later nanochat commits).

    ``"dec2025"`` (nanochat d575940: the keys of its nanochat/gpt.py only), ``"jul2026"`` (nanochat 92d63d4's key set,
    which ``nanolit.model2026`` implements), ``"jan2026"``, ``"jan2026-ve"``, ``"mar2026"`` (other 2026 key sets), or
    ``"unknown"`` when the keys match none of these.
    """
    keys = [k.removeprefix("_orig_mod.") for k in state_dict]
    if keys and all(_DEC2025_KEY.fullmatch(k) for k in keys):
        return "dec2025"
    if all(_JUL2026_KEY.fullmatch(k) for k in keys) and all(m in keys for m in _JUL2026_MARKERS):
        return "jul2026"
    for marker, era, _ in _NEWER_ERAS:
        if any(k.startswith(marker) for k in keys):
            return era
    return "unknown"


def _architecture_error(ckpt_dir: Path, era: str) -> NanolitError:
    why = {name: text for _, name, text in _NEWER_ERAS}.get(era, "its parameter names are not nanochat's")
    return NanolitError(
        f"checkpoint in {ckpt_dir} is neither the Dec-2025 nor the July-2026 nanochat architecture ({why}); nanolit "
        "reads nanochat d575940 (Dec 2025) and 92d63d4 (July 2026) checkpoints: use one of those, or one nanolit wrote"
    )


def _drop_vocab_padding(state_dict: dict, vocab_size: int) -> dict:
    """Slice wte/lm_head back to ``vocab_size`` rows.

    From 2025-12-23 (later nanochat commits) nanochat pads both to a multiple of 64 rows and slices the logits back, so
    the extra rows never affect outputs and those checkpoints still load into the Dec-2025 model.
    """
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in state_dict and state_dict[key].shape[0] > vocab_size:
            state_dict[key] = state_dict[key][:vocab_size]
    return state_dict


def build_model(
    ckpt_dir: str | os.PathLike, step: int, device: torch.device | str, phase: str = "eval"
) -> tuple[GPT | GPT2026, dict]:
    """Load a checkpoint of either generation into a fresh model, like nanochat's ``build_model`` (nanochat d575940
    nanochat/checkpoint_manager.py).

    Returns ``(model, meta)``: a ``GPT`` for a d575940 checkpoint, a ``GPT2026`` for a 92d63d4 one (told apart by
    the keys, ``detect_architecture``).
    """
    if phase not in ("eval", "train"):
        raise NanolitError(f"phase must be 'eval' or 'train', got {phase!r}")
    ckpt_dir, device = Path(ckpt_dir), torch.device(device)
    model_state, _, meta = load_nanochat_checkpoint(ckpt_dir, step, device)
    # bf16 embeddings (nanochat d575940 nanochat/gpt.py; CUDA runs) are upcast off CUDA, where bf16 matmuls are slow or
    # missing.
    if device.type in ("cpu", "mps"):
        model_state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_state.items()}
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    era = detect_architecture(model_state)
    if era == "dec2025":
        model = _build_dec2025(ckpt_dir, step, device, model_state, meta)
    elif era == "jul2026":
        model = _build_jul2026(ckpt_dir, step, device, model_state, meta)
    else:
        raise _architecture_error(ckpt_dir, era)
    model.train(phase == "train")
    return model, meta


def _model_config(ckpt_dir: Path, step: int, meta: dict, config_cls, defaults: dict | None = None):
    try:
        return config_cls(**{**(defaults or {}), **meta["model_config"]})
    except (KeyError, TypeError) as e:
        raise NanolitError(f"meta_{step:06d}.json in {ckpt_dir} has no usable model_config ({e})") from None


def _load_weights(model, model_state: dict, ckpt_dir: Path):
    # assign=True: parameters take the checkpoint's tensors and dtypes (bf16 embeddings stay bf16 on CUDA).
    try:
        model.load_state_dict(model_state, strict=True, assign=True)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].strip()
        raise NanolitError(f"checkpoint in {ckpt_dir} does not fit its model_config: {reason}") from None
    return model


def _build_dec2025(ckpt_dir: Path, step: int, device: torch.device, model_state: dict, meta: dict) -> GPT:
    # Imported here so callbacks can use the save/load functions without importing the models (design.md).
    from nanolit.model import GPTConfig, build_gpt

    config = _model_config(ckpt_dir, step, meta, GPTConfig)
    return _load_weights(build_gpt(config, device), _drop_vocab_padding(model_state, config.vocab_size), ckpt_dir)


def _build_jul2026(ckpt_dir: Path, step: int, device: torch.device, model_state: dict, meta: dict) -> GPT2026:
    from nanolit.model2026 import GPTConfig2026, build_gpt2026

    # nanochat 92d63d4's loader gives a model_config without window_pattern full-context attention ("L")
    config = _model_config(ckpt_dir, step, meta, GPTConfig2026, {"window_pattern": "L"})
    return _load_weights(build_gpt2026(config, device), model_state, ckpt_dir)


def find_largest_model(checkpoints_dir: str | os.PathLike) -> str:
    """The tag with the largest depth ``d<N>``, else the most recently modified tag folder (nanochat d575940
    nanochat/checkpoint_manager.py)."""
    checkpoints_dir = Path(checkpoints_dir)
    tags = [p for p in checkpoints_dir.iterdir() if p.is_dir()] if checkpoints_dir.is_dir() else []
    if not tags:
        raise NanolitError(f"no model folders in {checkpoints_dir}; train a model first or pass --model_tag")
    depths = [(int(m.group(1)), p.name) for p in tags if (m := re.fullmatch(r"d(\d+)", p.name))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda p: p.stat().st_mtime).name


def find_last_step(ckpt_dir: str | os.PathLike) -> int:
    """The largest step with a ``model_<step>.pt`` in ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir)
    steps = [int(m.group(1)) for p in ckpt_dir.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", p.name))]
    if not steps:
        raise NanolitError(f"no model_<step>.pt in {ckpt_dir}; train or pick another --model_tag")
    return max(steps)


def load_model(
    source: str,
    base_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    phase: str = "eval",
    model_tag: str | None = None,
    step: int | None = None,
) -> tuple[GPT, Tokenizer, dict]:
    """``(model, tokenizer, meta)`` for ``source`` in base/mid/sft/rl; defaults to the largest model's last step."""
    if source not in SOURCE_DIRS:
        raise NanolitError(f"unknown checkpoint source {source!r}; use one of {', '.join(SOURCE_DIRS)}")
    base = get_base_dir(base_dir)
    checkpoints_dir = base / SOURCE_DIRS[source]
    model_tag = model_tag or find_largest_model(checkpoints_dir)
    ckpt_dir = checkpoints_dir / model_tag
    step = find_last_step(ckpt_dir) if step is None else step
    model, meta = build_model(ckpt_dir, step, device, phase)
    tokenizer = get_tokenizer(base)
    vocab_size = meta["model_config"]["vocab_size"]
    if tokenizer.get_vocab_size() != vocab_size:
        raise NanolitError(
            f"tokenizer in {base / 'tokenizer'} has {tokenizer.get_vocab_size()} tokens but the model in {ckpt_dir} "
            f"has {vocab_size}; use the tokenizer the model was trained with"
        )
    return model, tokenizer, meta


def load_nanochat(path: str | os.PathLike, step: int | None = None,
                  device: torch.device | str = "cpu") -> tuple[GPT | GPT2026, dict]:
    """``(model, meta)`` from a nanochat checkpoint folder of either generation; ``step=None`` takes the largest."""
    step = find_last_step(path) if step is None else step
    return build_model(path, step, device, phase="eval")


def save_nanochat(model: GPT | GPT2026, path: str | os.PathLike, step: int, meta: dict,
                  optimizers=None, rank: int = 0, world_size: int = 1) -> None:
    """Write ``model`` (and optionally its optimizer state) in nanochat's layout of the model's generation.

    ``meta`` gets the model's ``model_config`` and ``step`` filled in if missing.

    - d575940 (``GPT``): ``optimizers`` is ``[adamw, muon]``; every rank calls this and writes its own file.
    - 92d63d4 (``GPT2026``): ``optimizers`` is the ``MuonAdamW`` (or a one-element list of it), its ``state_dict()``
      the single-process layout (a sharded optimizer's, consolidated). Rank 0 writes everything, the optimizer as
      nanochat's ``world_size`` per-rank files; other ranks write nothing.
    """
    meta = {"step": step, "model_config": model.config.to_dict(), **meta}
    if not getattr(model.config, "window_pattern", None):
        optim_states = [opt.state_dict() for opt in optimizers] if optimizers is not None else None
        save_nanochat_checkpoint(path, step, model.state_dict(), optim_states, meta, rank=rank)
        return
    if rank != 0:
        return
    if isinstance(optimizers, (list, tuple)):
        if len(optimizers) != 1:
            raise NanolitError(f"a 2026 model has one optimizer (MuonAdamW), got {len(optimizers)}")
        optimizers = optimizers[0]
    save_nanochat_checkpoint(path, step, model.state_dict(), None, meta, rank=0)
    if optimizers is not None:
        write_optimizer_2026(path, step, optimizers.state_dict(), _numels(optimizers), world_size)


def _numels(optimizer) -> list[int]:
    return [p.numel() for group in optimizer.param_groups for p in group["params"]]


def write_optimizer_2026(path: str | os.PathLike, step: int, full_state: dict, numels: list[int],
                         world_size: int = 1) -> None:
    """nanochat 92d63d4's ``optim_{step}_rank{r}.pt`` for r < ``world_size``: rank r's shard of the single-process
    ``MuonAdamW`` state (``nanolit.optim2026.rank_state_dict``); each file written atomically."""
    from nanolit.optim2026 import rank_state_dict

    # nanochat's groups have no "name" (nanolit's LR-logging label; load_state_dict puts it back)
    full_state = {**full_state, "param_groups": [{k: v for k, v in group.items() if k != "name"}
                                                 for group in full_state["param_groups"]]}
    for r in range(world_size):
        _, _, optim_path = _paths(Path(path), step, r)
        with atomic_write(optim_path) as tmp:
            torch.save(rank_state_dict(full_state, numels, r, world_size), tmp)


def read_optimizer_2026(path: str | os.PathLike, step: int, numels: list[int],
                        device: torch.device | str = "cpu") -> dict:
    """The single-process ``MuonAdamW`` state dict of a 92d63d4 checkpoint, merged from all its per-rank files
    (whatever world size wrote them), for ``MuonAdamW.load_state_dict`` at any world size."""
    from nanolit.optim2026 import merge_rank_state_dicts

    path = Path(path)
    ranks = sorted(int(m.group(1)) for p in path.glob(f"optim_{step:06d}_rank*.pt")
                   if (m := re.fullmatch(rf"optim_{step:06d}_rank(\d+)\.pt", p.name)))
    if not ranks or ranks != list(range(len(ranks))):
        raise NanolitError(f"optimizer files of step {step} in {path} are missing or not ranks 0..W-1 (found ranks "
                           f"{ranks}); copy every optim_{step:06d}_rank*.pt of the run")
    parts = [load_tensors(_paths(path, step, r)[2], device) for r in ranks]
    if not all(isinstance(part, dict) and "param_groups" in part for part in parts):
        raise NanolitError(f"optim_{step:06d}_rank0.pt in {path} is not a single optimizer state dict (a d575940 "
                           "checkpoint holds a list [adamw, muon]); load it with the model it was saved with")
    return merge_rank_state_dicts(parts, numels)


def load_optimizer_2026(path: str | os.PathLike, step: int, optimizer) -> None:
    """Load a 92d63d4 checkpoint's optimizer files into ``optimizer`` (a ``MuonAdamW`` or its sharded form)."""
    optimizer.load_state_dict(read_optimizer_2026(path, step, _numels(optimizer)))


def nanochat_meta_2026(plan, step: int, val_bpb: float | None, dataloader_state: dict, loop_state: dict,
                       user_config: dict | None = None) -> dict:
    """nanochat 92d63d4's meta json for a run planned by ``nanolit.recipe2026.plan_2026``, in its key order.

    ``user_config`` adds base_train's other arguments (run, eval_every, ...) to the knobs; ``dataloader_state``
    is the best-fit loader's (nanochat reads its ``pq_idx``, ``rg_idx`` and ``epoch``; the rest lets nanolit
    resume exactly); ``loop_state`` holds ``min_val_bpb``, ``smooth_train_loss`` and ``total_training_time``.
    """
    from dataclasses import asdict

    knobs = asdict(plan.knobs)
    knobs.pop("vocab_size")  # from the tokenizer, not an argument of base_train
    return {
        "step": step,
        "val_bpb": val_bpb,
        "model_config": plan.model_config.to_dict(),
        "user_config": {**knobs, **(user_config or {})},
        "device_batch_size": plan.knobs.device_batch_size,
        "max_seq_len": plan.knobs.max_seq_len,
        "total_batch_size": plan.total_batch_size,
        "dataloader_state_dict": dict(dataloader_state),
        "loop_state": dict(loop_state),
    }


def load_lightning_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[GPT | GPT2026, dict]:
    """``(model, checkpoint dict)`` from a nanolit Lightning ``.ckpt`` of either generation (the module keeps its
    model under ``gpt.``)."""
    from nanolit.model import GPTConfig, build_gpt

    ckpt = load_tensors(path, device)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise NanolitError(f"{path} is not a Lightning checkpoint (no state_dict); pass a nanolit .ckpt")
    state = {k.removeprefix("gpt."): v for k, v in ckpt["state_dict"].items() if k.startswith("gpt.")}
    hp = ckpt.get("hyper_parameters", {})
    if "transformer.wte.weight" not in state or "depth" not in hp:
        raise NanolitError(f"{path} holds no nanolit GPT (no gpt.* weights or depth hyperparameter)")
    if detect_architecture(state) == "jul2026":  # a GPT2026Module's: its knobs give the shapes, the vocab unpadded
        from nanolit.model2026 import GPTConfig2026, build_gpt2026

        config = GPTConfig2026.from_knobs(hp["depth"], hp["vocab_size"], hp["max_seq_len"], hp["aspect_ratio"],
                                          hp["head_dim"], hp["window_pattern"])
        model = build_gpt2026(config, device)
    else:
        vocab_size = state["transformer.wte.weight"].shape[0]
        model = build_gpt(GPTConfig.from_depth(hp["depth"], vocab_size=vocab_size, sequence_len=hp["max_seq_len"]),
                          device)
    if torch.device(device).type != "cuda":
        state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), ckpt


def load_for_eval(checkpoint: str | os.PathLike, step: int | None = None, tokenizer_dir: str | os.PathLike | None = None,
                  device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, int]:
    """``(model, tokenizer, step)`` from a nanolit ``.ckpt`` or a nanochat checkpoint folder (see :func:`load_any`)."""
    loaded = load_any(checkpoint, step, tokenizer_dir, device)
    return loaded.model, loaded.tokenizer, loaded.step


@dataclass
class Loaded:
    """What :func:`load_any` found: the model, its tokenizer, the step, the training phase and the saved record
    (a nanochat ``meta`` dict, or a Lightning checkpoint's ``hyper_parameters``)."""

    model: GPT
    tokenizer: Tokenizer
    step: int
    phase: str  # "base", or the phase after it: "mid", "sft", "rl", or "chat" when the record does not say which
    record: dict
    tokenizer_dir: Path  # a base dir's tokenizer/ folder: the base dir is its parent


def load_any(checkpoint: str | os.PathLike, step: int | None = None, tokenizer_dir: str | os.PathLike | None = None,
             device: torch.device | str = "cpu") -> Loaded:
    """The model, tokenizer, step and phase of a nanolit ``.ckpt`` or a nanochat checkpoint folder.

    The tokenizer comes from ``tokenizer_dir``, else from the run's data base dir (nanolit), else from the
    ``tokenizer/`` folder of the base dir that holds ``base_checkpoints/<tag>/`` or from a ``tokenizer/`` inside the
    checkpoint folder (nanochat). The phase is decided by :func:`checkpoint_phase`.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        model, record = load_nanochat(checkpoint, step, device)
        step = record.get("step", step)
        default_tok = checkpoint.parent.parent / "tokenizer"
        if not default_tok.is_dir() and (checkpoint / "tokenizer").is_dir():
            default_tok = checkpoint / "tokenizer"
        phase = checkpoint_phase(record.get("user_config"), folder=checkpoint)
    elif checkpoint.is_file():
        model, ckpt = load_lightning_checkpoint(checkpoint, device)
        step, record = ckpt.get("global_step", 0), ckpt.get("hyper_parameters", {})
        base = (ckpt.get("datamodule_hyper_parameters") or {}).get("base_dir")
        default_tok = get_base_dir(base) / "tokenizer" if base or tokenizer_dir is None else None
        phase = checkpoint_phase(record)
    else:
        raise NanolitError(f"checkpoint {checkpoint} does not exist; pass a nanolit .ckpt or a nanochat folder")
    tokenizer_dir = Path(tokenizer_dir or default_tok)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise NanolitError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model has "
                           f"{model.config.vocab_size}; pass --tokenizer with the model's own tokenizer")
    return Loaded(model, tokenizer, step, phase, record, tokenizer_dir)


def checkpoint_phase(config: dict | None, folder: Path | None = None) -> str:
    """Which training phase wrote a checkpoint: ``"base"``, ``"mid"``, ``"sft"``, ``"rl"`` or ``"chat"``.

    A nanochat folder inside ``base_checkpoints/``, ``mid_checkpoints/``, ... is the phase its parent names, as
    nanochat's ``load_model(source)`` reads it. Elsewhere, the run's configuration decides (``meta["user_config"]``
    or a ``.ckpt``'s hyperparameters): base training records its horizon knob ``target_param_data_ratio`` and starts
    from nothing, while every later phase starts from a model (``init_from``; nanochat's mid_train and chat_sft
    record no base_train knobs). Anything that is not recognisably base training is ``"chat"``.
    """
    if folder is not None:
        for source, dirname in SOURCE_DIRS.items():
            if folder.parent.name == dirname:
                return source
    config = config or {}
    return "base" if "target_param_data_ratio" in config and "init_from" not in config else "chat"

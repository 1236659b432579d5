"""The ``nanolit`` command: ``LightningCLI`` for training, plus the data, tokenizer, eval and quickstart tools.

    nanolit fit -c configs/quickstart.yaml [--model.depth=12] [--ckpt_path last]
    nanolit data download -n 8            nanolit data from-text FILES... [--out DIR]
    nanolit tokenizer train [--vocab_size N] [--max_chars N] [--doc_cap N]
    nanolit tokenizer eval
    nanolit eval core --checkpoint PATH --bundle DIR ...    nanolit eval download-core
    nanolit quickstart
    nanolit chat --checkpoint PATH [-p PROMPT]    nanolit sample --checkpoint PATH [--prompt TEXT ...]
    nanolit eval bpb --checkpoint PATH            nanolit eval chat --checkpoint PATH [-a 'ARC-Easy|GSM8K']
    nanolit export hf --checkpoint PATH --out DIR nanolit import hf DIR [--out BASE_DIR]

A ``NanolitError`` (bad input) prints one line naming the problem and the fix and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import warnings
from pathlib import Path

from nanolit.common import NanolitError, get_base_dir

TOOLS = ("data", "tokenizer", "eval", "quickstart", "chat", "sample", "export", "import")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``nanolit`` console script, ``python -m nanolit`` and the root ``cli.py``."""
    argv = list(sys.argv[1:] if args is None else args)
    quiet_known_noise()
    try:
        check_config_files(argv)
        first = argv[2:3] if argv[:1] == ["--base_dir"] else argv[:1]  # `nanolit --base_dir X data ...`
        if first and first[0] in TOOLS:
            run_tool(argv)
        else:
            run_lightning_cli(None if args is None else argv)
    except argparse.ArgumentError as e:  # a flag or config the parser refused (`nanolit fit` raises these)
        if re.search(r"arguments are required: \w+\.model\b", str(e)):
            message = ("no model: pass a config that names one, e.g. -c configs/quickstart.yaml (base), "
                       "configs/quickstart2026.yaml (the 2026 recipe) or configs/mid.yaml")
        else:
            message = f"{parse_error_line(str(e))}; `nanolit fit --help` lists every knob"
        print(f"nanolit: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        error = user_error(e)
        if error is None:
            raise
        print(f"nanolit: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


_PARSER_NOISE = re.compile(r"^(- )?(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value|"
                           r"Expected a <class 'NoneType'>|tip: )")


def parse_error_line(message: str) -> str:
    """jsonargparse's nested, multi-line error in one line: the keys on the way down and the innermost reason."""
    keys, reasons = [], []
    for line in (line.strip() for line in message.splitlines()):
        if not line or _PARSER_NOISE.match(line):
            continue
        line = line.removeprefix("- ")
        key = re.fullmatch(r'Parser key "([^"]+)":?', line)
        if key:
            keys.append(key.group(1).removesuffix(".init_args"))
        elif not line.startswith("Problem with given class_path"):
            reasons.append(line.rstrip(":"))
    where = f"--{'.'.join(keys)}: " if keys else ""
    return where + " ".join(reasons)


def check_config_files(argv: list[str]) -> None:
    """One line naming a ``-c/--config`` file that is missing or not YAML (the parser would name neither)."""
    import yaml

    for flag, value in zip(argv, argv[1:]):
        if flag not in ("-c", "--config"):
            continue
        path = Path(value)
        if not path.is_file():
            raise NanolitError(f"config file {path} does not exist; pass a YAML file such as configs/quickstart.yaml")
        try:
            yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise NanolitError(f"config file {path} is not valid YAML{at} ({getattr(e, 'problem', None) or e}); "
                               "fix it or pass another") from None


def user_error(exception: BaseException) -> NanolitError | None:
    """The ``NanolitError`` behind ``exception``: itself, or one a library wrapped on the way up (jsonargparse turns
    errors raised while it builds the model or the data into a ``ValueError``; Lightning re-raises others)."""
    seen = set()
    while exception is not None and id(exception) not in seen:
        if isinstance(exception, NanolitError):
            return exception
        seen.add(id(exception))
        exception = exception.__cause__ or exception.__context__
    return None


def quiet_known_noise() -> None:
    """Silence what other libraries print that tells a nanolit user nothing (each filter says why)."""
    # The DataModule's val_dataloader feeds the BPB callback at nanochat's steps; Lightning's own val loop is off.
    warnings.filterwarnings("ignore", message=r".*`val_dataloader` but have no `validation_step`.*")
    # torch 2.13 deprecates LeafSpec, which Lightning 2.6's pytree helper still checks for.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    # Lightning's start and end chatter: the plan table shows the device and the seed, the step lines the end
    # (and an advert for its cloud logger).
    chatter = ("litlogger", "GPU available:", "TPU available:", "Seed set to", "`Trainer.fit` stopped:")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).addFilter(lambda record: not record.getMessage().startswith(chatter) and
                                          "litlogger" not in record.getMessage())
    # `--ckpt_path last` on a run's first launch (how a job is relaunched): there is nothing to resume yet.
    warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint.*')


# ---------------------------------------------------------------------------------------------------- training
def run_lightning_cli(argv: list[str] | None):
    """``LightningCLI`` on ``argv`` (``None``: ``sys.argv``, which LightningCLI reads itself)."""
    from nanolit.lightning_cli import NanoCLI

    cli = NanoCLI(args=argv)
    leave_process_group()
    return cli


def leave_process_group() -> None:
    """Ranks leave the process group together: Lightning leaves it up, and with gloo a rank that exits while its
    peer still holds the group makes that peer abort now and then, failing a finished job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------- tools
def tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanolit", description="nanolit tools (training: `nanolit fit -c CONFIG`)")
    parser.add_argument("--base_dir", default=None, help="base dir (default $NANOLIT_BASE_DIR or ~/.cache/nanolit)")
    sub = parser.add_subparsers(dest="tool", required=True)

    data = sub.add_parser("data", help="pretraining shards").add_subparsers(dest="action", required=True)
    dl = data.add_parser("download", help="download FineWeb-Edu shards (nanochat's dataset)")
    dl.add_argument("-n", "--num_shards", type=int, default=-1, help="shards to fetch, -1 for all 1823")
    dl.add_argument("-w", "--workers", type=int, default=4)
    dl.add_argument("--url", default=None, help="base URL (default nanochat's)")
    ft = data.add_parser("from-text", help="build shards from local .txt/.jsonl/.parquet files")
    ft.add_argument("inputs", nargs="+")
    ft.add_argument("--out", default=None, help="output folder (default <base_dir>/base_data)")
    ft.add_argument("--chars_per_shard", type=int, default=250_000_000)

    tok = sub.add_parser("tokenizer", help="train or evaluate the BPE tokenizer").add_subparsers(
        dest="action", required=True)
    tt = tok.add_parser("train", help="train on the train shards (tok_train)")
    tt.add_argument("--vocab_size", type=int, default=65536)
    tt.add_argument("--max_chars", type=int, default=10_000_000_000)
    tt.add_argument("--doc_cap", type=int, default=10_000)
    tt.add_argument("--force", action="store_true",
                    help="replace an existing tokenizer (every checkpoint trained on the old one stops matching)")
    tok.add_parser("eval", help="compression ratio on the val shard (tok_eval)")

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="action", required=True)
    core = ev.add_parser("core", help="CORE metric of a checkpoint (base_eval)")
    core.add_argument("--checkpoint", required=True, help="a nanolit .ckpt or a nanochat checkpoint folder")
    core.add_argument("--step", type=int, default=None, help="nanochat folder: step to load (default: last)")
    core.add_argument("--tokenizer", default=None, help="tokenizer folder (default: found from the checkpoint)")
    core.add_argument("--bundle", default=None, help="eval bundle folder (default <base_dir>/eval_bundle)")
    core.add_argument("--max_per_task", type=int, default=-1, help="examples per task, -1 for all")
    core.add_argument("--skip_missing", action="store_true",
                      help="leave out tasks whose data is missing (the CORE mean then covers fewer tasks)")
    core.add_argument("--tasks", default=None, help="comma-separated task labels (default: all in core.yaml)")
    core.add_argument("--output", default=None, help="CSV path (default <base_dir>/base_eval/...)")
    core.add_argument("--device", default=None)
    dc = ev.add_parser("download-core", help="download and unpack the CORE eval bundle")
    dc.add_argument("--url", default=None)
    bpb = _checkpoint_args(ev.add_parser("bpb", help="train/val bits per byte and samples (base_loss)"))
    bpb.add_argument("--device_batch_size", type=int, default=32)
    bpb.add_argument("--split_tokens", type=int, default=20 * 524288, help="tokens per split")
    bpb.add_argument("--splits", default="train,val", help="comma-separated: train, val")
    ce = _checkpoint_args(ev.add_parser("chat", help="ChatCORE tasks of a chat model (chat_eval)"))
    ce.add_argument("-a", "--task_name", default=None, help="tasks split by |, default all: "
                    "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee")
    ce.add_argument("-t", "--temperature", type=float, default=0.0)
    ce.add_argument("-m", "--max_new_tokens", type=int, default=512)
    ce.add_argument("-n", "--num_samples", type=int, default=1)
    ce.add_argument("-k", "--top_k", type=int, default=50)
    ce.add_argument("-b", "--batch_size", type=int, default=8, help="batch size of the categorical tasks")
    ce.add_argument("-x", "--max_problems", type=int, default=None, help="at most this many problems per task")

    talk = _checkpoint_args(sub.add_parser("chat", help="talk to a chat model (chat_cli)"))
    talk.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    talk.add_argument("-t", "--temperature", type=float, default=0.6)
    talk.add_argument("-k", "--top_k", type=int, default=50)
    talk.add_argument("--max_tokens", type=int, default=256, help="most tokens per reply")
    sm = _checkpoint_args(sub.add_parser("sample", help="complete prompts with a model (base_train's samples)"))
    sm.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default nanochat's 7)")
    sm.add_argument("--max_tokens", type=int, default=16)
    sm.add_argument("-t", "--temperature", type=float, default=0.0, help="0 is greedy")
    sm.add_argument("-k", "--top_k", type=int, default=None)
    sm.add_argument("--seed", type=int, default=42)

    ex = sub.add_parser("export", help="write a model in another format").add_subparsers(dest="action", required=True)
    exh = _checkpoint_args(ex.add_parser("hf", help="transformers NanoChatForCausalLM folder"))
    exh.add_argument("--out", required=True, help="output folder")
    im = sub.add_parser("import", help="read a model from another format").add_subparsers(dest="action", required=True)
    imh = im.add_parser("hf", help="transformers NanoChat folder -> nanochat layout under the base dir")
    imh.add_argument("hf_dir", help="folder with config.json, model.safetensors and tokenizer.json")
    imh.add_argument("--out", default=None, help="base dir to write into (default: --base_dir or the default one)")
    imh.add_argument("--source", default=None, choices=["base", "mid", "sft", "rl"],
                     help="checkpoint folder (default: the exported phase, else sft with a chat template)")
    imh.add_argument("--model_tag", default=None, help="folder name (default d<depth>)")

    qs = sub.add_parser("quickstart", help="build a corpus, train a tokenizer and a small model on it")
    qs.add_argument("--out", default="runs/quickstart", help="folder for the data, logs and checkpoints")
    qs.add_argument("extra", nargs=argparse.REMAINDER, help="extra `nanolit fit` overrides")
    return parser


def run_tool(argv: list[str]) -> None:
    # allow `nanolit data download --base_dir X` as well as `nanolit --base_dir X data download`
    if "--base_dir" in argv[1:]:
        i = argv.index("--base_dir")
        argv = argv[i:i + 2] + argv[:i] + argv[i + 2:]
    ns = tool_parser().parse_args(argv)
    if ns.tool == "quickstart":
        from nanolit.quickstart import quickstart

        quickstart(Path(ns.out), ns.extra)
        return
    base = get_base_dir(ns.base_dir, create=ns.tool in ("data", "import"))  # only the data tools start a new base dir
    handler = {("data", "download"): _data_download, ("data", "from-text"): _data_from_text,
               ("tokenizer", "train"): _tokenizer_train, ("tokenizer", "eval"): _tokenizer_eval,
               ("eval", "core"): _eval_core, ("eval", "download-core"): _eval_download_core,
               ("eval", "bpb"): _eval_bpb, ("eval", "chat"): _eval_chat, ("chat", None): _chat, ("sample", None): _sample,
               ("export", "hf"): _export_hf, ("import", "hf"): _import_hf}
    handler[(ns.tool, getattr(ns, "action", None))](ns, base)


def _data_download(ns, base: Path) -> None:
    from nanolit.data.shards import DATA_URL, download_shards

    out = base / "base_data"
    paths = download_shards(ns.num_shards, out, workers=ns.workers, base_url=ns.url or DATA_URL,
                            on_done=lambda p: print(f"ok {p.name}", flush=True))
    print(f"{len(paths)} shards in {out}")


def _data_from_text(ns, base: Path) -> None:
    from nanolit.data.shards import write_shards_from_text

    out = Path(ns.out) if ns.out else base / "base_data"
    paths = write_shards_from_text(ns.inputs, out, chars_per_shard=ns.chars_per_shard)
    print(f"wrote {len(paths)} shards to {out} (the last, {paths[-1].name}, is the validation shard)")


def _tokenizer_train(ns, base: Path) -> None:
    from nanolit.tokenizer import PICKLE_NAME, train_tokenizer

    existing = base / "tokenizer" / PICKLE_NAME
    if existing.exists() and not ns.force:
        raise NanolitError(f"{existing} exists: a new tokenizer gives the ids of every checkpoint trained on it other "
                           "meanings; keep it, train into another --base_dir, or pass --force to replace it")

    tok = train_tokenizer(base, vocab_size=ns.vocab_size, max_chars=ns.max_chars, doc_cap=ns.doc_cap)
    print(f"trained a {tok.get_vocab_size():,}-token tokenizer -> {base / 'tokenizer'}")


def _tokenizer_eval(ns, base: Path) -> None:
    from nanolit.data.shards import list_parquet_files, read_texts, train_val_split
    from nanolit.tokenizer import evaluate_compression, get_tokenizer

    tok = get_tokenizer(base)
    _, (val,) = train_val_split(list_parquet_files(base / "base_data"))
    stats = evaluate_compression(tok, read_texts(val, 0))
    print(f"{val.name} (first row group): {stats['bytes']:,} bytes -> {stats['tokens']:,} tokens, "
          f"{stats['ratio']:.3f} bytes/token")


def _eval_core(ns, base: Path) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from nanolit.checkpoint import load_for_eval
    from nanolit.common import autocast_context, autodetect_device_type
    from nanolit.eval.core import evaluate_core, load_bundle, write_core_csv

    if ns.max_per_task == 0 or ns.max_per_task < -1:
        raise NanolitError(f"--max_per_task {ns.max_per_task} evaluates no example; give a positive number, or -1 "
                           "for all of them")
    if not Path(ns.checkpoint).exists():
        raise NanolitError(f"checkpoint {ns.checkpoint} does not exist; pass a nanolit .ckpt or a nanochat "
                           "checkpoint folder")
    bundle = Path(ns.bundle) if ns.bundle else base / "eval_bundle"
    tasks = ns.tasks.split(",") if ns.tasks else None
    load_bundle(bundle, skip_missing=ns.skip_missing, tasks=tasks)  # a bad bundle is named before the model loads
    device = torch.device(ns.device or autodetect_device_type())
    model, tokenizer, step = load_for_eval(ns.checkpoint, step=ns.step, tokenizer_dir=ns.tokenizer, device=device)
    with autocast_context(device):
        out = evaluate_core(model, tokenizer, device, bundle, max_per_task=ns.max_per_task, tasks=tasks,
                            skip_missing=ns.skip_missing)
    table = Table(title=f"CORE of {ns.checkpoint} (step {step})")
    for col in ("Task", "Accuracy", "Centered"):
        table.add_column(col)
    for label, acc in out["results"].items():
        table.add_row(label, f"{acc:.4f}", f"{out['centered_results'][label]:.4f}")
    table.add_row("CORE", "", f"{out['core_metric']:.4f}")
    Console().print(table)
    output = Path(ns.output) if ns.output else base / "base_eval" / f"base_model_{step:06d}.csv"
    write_core_csv(output, out)
    print(f"wrote {output}")


def _eval_download_core(ns, base: Path) -> None:
    from nanolit.eval.core import EVAL_BUNDLE_URL, download_core_bundle

    print(f"CORE bundle at {download_core_bundle(base, url=ns.url or EVAL_BUNDLE_URL)}")


def _checkpoint_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--checkpoint", required=True, help="a nanolit .ckpt or a nanochat checkpoint folder")
    parser.add_argument("-s", "--step", type=int, default=None, help="nanochat folder: step to load (default: last)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: found from the checkpoint)")
    parser.add_argument("--device", default=None)
    return parser


def _load(ns):
    import torch

    from nanolit.checkpoint import load_any
    from nanolit.common import autodetect_device_type

    return load_any(ns.checkpoint, ns.step, ns.tokenizer, torch.device(ns.device or autodetect_device_type()))


def _chat(ns, base: Path) -> None:
    from nanolit.chat_cli import chat, require_chat_model

    loaded = _load(ns)
    require_chat_model(loaded.phase, loaded.tokenizer, ns.checkpoint)
    # Ctrl-C must end the chat even where the launching shell or job runner ignores SIGINT (Python then keeps
    # ignoring it), as background jobs and some runners do.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    chat(loaded.model, loaded.tokenizer, ns.prompt, ns.temperature, ns.top_k, ns.max_tokens)


def _sample(ns, base: Path) -> None:
    from nanolit.sample import NANOCHAT_PROMPTS, sample_lines

    loaded = _load(ns)
    for line in sample_lines(loaded.model, loaded.tokenizer, ns.prompt or NANOCHAT_PROMPTS,
                             max_tokens=ns.max_tokens, temperature=ns.temperature, top_k=ns.top_k, seed=ns.seed):
        print(line, flush=True)


def _eval_bpb(ns, base: Path) -> None:
    from nanolit.eval.base_loss import evaluate_splits
    from nanolit.sample import NANOCHAT_PROMPTS, sample_lines

    loaded = _load(ns)
    data = (base if ns.base_dir else loaded.tokenizer_dir.parent) / "base_data"
    results = evaluate_splits(loaded.model, loaded.tokenizer, data, ns.device_batch_size, ns.split_tokens,
                              [s.strip() for s in ns.splits.split(",") if s.strip()])
    for split, bpb in results.items():
        print(f"{split} bpb: {bpb:.4f}")
    for line in sample_lines(loaded.model, loaded.tokenizer, NANOCHAT_PROMPTS):
        print(line, flush=True)


def _eval_chat(ns, base: Path) -> None:
    from nanolit.eval.chat import evaluate_chat

    loaded = _load(ns)
    out = evaluate_chat(loaded.model, loaded.tokenizer, tasks=ns.task_name,
                        base_dir=base if ns.base_dir else loaded.tokenizer_dir.parent, max_problems=ns.max_problems,
                        batch_size=ns.batch_size, num_samples=ns.num_samples, max_new_tokens=ns.max_new_tokens,
                        temperature=ns.temperature, top_k=ns.top_k, log=lambda line: print(line, flush=True))
    if out["chatcore"] is not None:
        print(f"ChatCORE metric: {out['chatcore']:.4f}")


def _export_hf(ns, base: Path) -> None:
    from nanolit.hf import export_hf

    print(f"wrote a transformers NanoChat model to {export_hf(ns.checkpoint, ns.out, ns.step, ns.tokenizer)}")


def _import_hf(ns, base: Path) -> None:
    from nanolit.hf import import_hf

    folder = import_hf(ns.hf_dir, ns.out or base, ns.source, ns.model_tag)
    print(f"wrote {folder} (tokenizer in {folder.parent.parent / 'tokenizer'})")


if __name__ == "__main__":
    main()

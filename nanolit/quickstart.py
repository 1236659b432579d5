"""``nanolit quickstart`` (``make quickstart``): the whole pipeline on the embedded corpus, offline, in minutes.

1. shards from the Python documentation that ships with the interpreter (``nanolit.data.corpus``);
2. a 4096-token BPE tokenizer trained on them;
3. ``nanolit fit -c configs/quickstart.yaml``: a d4 GPT with the real recipe, val bpb every 30 steps,
   samples, checkpoints and ``report.md`` under the output folder.
Steps 1-2 are skipped when their outputs exist, so a second run goes straight to training.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from nanolit.common import NanolitError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
VOCAB_SIZE = 4096  # the size nanochat's own CPU smoke tests use (the d2 fixture's tokenizer)
CHARS_PER_SHARD = 400_000  # ~2.3 MB corpus -> 5 train shards and a val shard


def prepare_base_dir(base: Path) -> None:
    """Build the shards and the tokenizer in ``base`` unless they are already there."""
    from nanolit.data.corpus import write_default_corpus
    from nanolit.data.shards import list_parquet_files, write_shards_from_text
    from nanolit.tokenizer import train_tokenizer

    if not list_parquet_files(base / "base_data"):
        print("[1/3] building shards from the Python documentation shipped with this interpreter ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            corpus = write_default_corpus(Path(tmp) / "python_docs.jsonl")
            shards = write_shards_from_text([corpus], base / "base_data", chars_per_shard=CHARS_PER_SHARD,
                                            val_fraction=0.1)
        print(f"      {len(shards)} shards in {base / 'base_data'}", flush=True)
    if not (base / "tokenizer" / "tokenizer.pkl").exists():
        print(f"[2/3] training a {VOCAB_SIZE}-token BPE tokenizer ...", flush=True)
        train_tokenizer(base, vocab_size=VOCAB_SIZE)


def quickstart(out: Path, extra: list[str]) -> None:
    """Prepare ``out/base`` and train with the quickstart config; ``extra`` are ``nanolit fit`` overrides."""
    from nanolit.cli import run_lightning_cli

    if not CONFIG.is_file():
        raise NanolitError(f"{CONFIG} is missing; run the quickstart from a nanolit source checkout")
    base = out / "base"
    prepare_base_dir(base)
    print("[3/3] training (nanolit fit -c configs/quickstart.yaml) ...", flush=True)
    sys.argv = sys.argv[:1]  # the fit arguments below are the whole command line (LightningCLI warns otherwise)
    run_lightning_cli(["fit", "-c", str(CONFIG), f"--data.init_args.base_dir={base}",
                       f"--trainer.default_root_dir={out}", *extra])
    print(f"\ndone: logs, checkpoints and report.md are in {out}")

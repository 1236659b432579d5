"""``nanolit quickstart`` (``make quickstart``): base and mid-training on what ships with Python, offline, in minutes.

1. shards from the Python documentation that ships with the interpreter (``nanolit.data.corpus``);
2. a 4096-token BPE tokenizer trained on them;
3. ``nanolit fit -c configs/quickstart.yaml``: a d4 GPT with the real recipe, val bpb every 30 steps,
   samples, checkpoints and ``report.md`` under the output folder, exported in nanochat's format;
4. a small chat dataset in the real mid-training formats (``nanolit.data.offline_chat``), then
   ``nanolit fit -c configs/mid.yaml`` on it: 40 steps of mid-training from the model step 3 exported;
5. ``nanolit fit -c configs/sft.yaml``: 30 steps of SFT from the mid-trained model, with chat_sft's val loss and its
   MMLU and ARC-Easy accuracies, then ``nanolit chat -p`` asks the fine-tuned model one question.
Steps 1, 2 and the chat data are skipped when their outputs exist, and both fits resume (``--ckpt_path last``), so
a second run continues an interrupted one and says so about a finished one.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from nanolit.common import NanolitError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG, MID_CONFIG, SFT_CONFIG = CONFIGS / "quickstart.yaml", CONFIGS / "mid.yaml", CONFIGS / "sft.yaml"
# mid-training at the quickstart's size: its batch, 40 steps (mid's horizon is the data's num_iterations, whose
# step N is the signal to stop), val bpb every 20 steps on 16K tokens, eager (40 steps do not pay back compiling)
MID_OVERRIDES = ["--model.max_seq_len=256", "--model.device_batch_size=8", "--model.total_batch_size=4096",
                 "--model.loss_chunk_size=512", "--model.compile=false", "--data.num_iterations=41",
                 "--data.eval_tokens=16384", "--bpb.eval_every=20", "--trainer.devices=1"]
# SFT at the quickstart's size: chat_sft's 32 conversations a step as 4 micro-batches of 8, cut at the model's 256
# tokens; 30 steps (num_iterations 31: chat_sft does not train its last); val loss every 10 steps on 8 x 8
# conversations; MMLU and ARC-Easy on all their test problems once, at the end (step 30)
SFT_OVERRIDES = ["--model.max_seq_len=256", "--model.device_batch_size=8", "--model.num_iterations=31",
                 "--model.loss_chunk_size=512", "--data.eval_steps=8", "--val_loss.eval_every=10",
                 "--chat_eval.eval_metrics_every=30", "--chat_eval.eval_metrics_max_problems=-1",
                 "--trainer.devices=1"]
CHAT_PROMPT = "What does `json.dumps` do?"
VOCAB_SIZE = 4096  # the size nanochat's own CPU smoke tests use (the d2 fixture's tokenizer)
CHARS_PER_SHARD = 400_000  # ~2.3 MB corpus -> 5 train shards and a val shard


def prepare_base_dir(base: Path) -> None:
    """Build the shards and the tokenizer in ``base`` unless they are already there."""
    from nanolit.data.corpus import write_default_corpus
    from nanolit.data.shards import list_parquet_files, write_shards_from_text
    from nanolit.tokenizer import train_tokenizer

    if not list_parquet_files(base / "base_data"):
        print("[1/5] building shards from the Python documentation shipped with this interpreter ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            corpus = write_default_corpus(Path(tmp) / "python_docs.jsonl")
            shards = write_shards_from_text([corpus], base / "base_data", chars_per_shard=CHARS_PER_SHARD,
                                            val_fraction=0.1)
        print(f"      {len(shards)} shards in {base / 'base_data'}", flush=True)
    if not (base / "tokenizer" / "tokenizer.pkl").exists():
        print(f"[2/5] training a {VOCAB_SIZE}-token BPE tokenizer ...", flush=True)
        train_tokenizer(base, vocab_size=VOCAB_SIZE)


def quickstart(out: Path, extra: list[str]) -> None:
    """Prepare ``out/base``, train with the quickstart config, then mid-train and fine-tune on the offline chat data
    and ask the result one question; ``extra`` are ``nanolit fit`` overrides for the base run."""
    from nanolit.checkpoint import SOURCE_DIRS, find_largest_model
    from nanolit.cli import main, run_lightning_cli
    from nanolit.data.offline_chat import write_offline_chat_data
    from nanolit.data.tasks import IDENTITY_FILE, task_folder

    for config in (CONFIG, MID_CONFIG, SFT_CONFIG):
        if not config.is_file():
            raise NanolitError(f"{config} is missing; run the quickstart from a nanolit source checkout")
    base = out / "base"
    prepare_base_dir(base)
    print("[3/5] base training (nanolit fit -c configs/quickstart.yaml) ...", flush=True)
    sys.argv = sys.argv[:1]  # the fit arguments below are the whole command line (LightningCLI warns otherwise)
    run_lightning_cli(["fit", "-c", str(CONFIG), f"--data.init_args.base_dir={base}",
                       f"--trainer.default_root_dir={out}", "--ckpt_path", "last", *extra])
    # a quickstart folder from before SFT has no ARC files: the data is written again (the same rows, plus ARC)
    if not (base / IDENTITY_FILE).exists() or not (task_folder(base, "ARC-Easy") / "train.jsonl").exists():
        counts = ", ".join(f"{v:,} {k}" for k, v in write_offline_chat_data(base).items())
        print(f"[4/5] mid-training on a chat set built from Python's docs ({counts}): "
              "nanolit fit -c configs/mid.yaml ...", flush=True)
    else:
        print("[4/5] mid-training (nanolit fit -c configs/mid.yaml) ...", flush=True)
    run_lightning_cli(["fit", "-c", str(MID_CONFIG), f"--data.init_args.base_dir={base}",
                       f"--trainer.default_root_dir={out / 'mid'}", "--ckpt_path", "last", *MID_OVERRIDES])
    print("[5/5] SFT (nanolit fit -c configs/sft.yaml) ...", flush=True)
    run_lightning_cli(["fit", "-c", str(SFT_CONFIG), f"--data.init_args.base_dir={base}",
                       f"--trainer.default_root_dir={out / 'sft'}", "--ckpt_path", "last", *SFT_OVERRIDES])
    chat_model = base / SOURCE_DIRS["sft"] / find_largest_model(base / SOURCE_DIRS["sft"])
    print(f"\n$ nanolit chat --checkpoint {chat_model} -p '{CHAT_PROMPT}'", flush=True)
    main(["chat", "--checkpoint", str(chat_model), "-p", CHAT_PROMPT])
    print(f"\ndone: logs, checkpoints and report.md are in {out} (base), {out / 'mid'} (mid) and {out / 'sft'} (SFT); "
          f"the models in nanochat's format are in {base / 'base_checkpoints'}, {base / 'mid_checkpoints'} and "
          f"{base / SOURCE_DIRS['sft']}; talk to the last one with `nanolit chat --checkpoint {chat_model}`")

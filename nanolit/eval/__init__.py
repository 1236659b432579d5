"""Evaluation in plain torch: bits per byte (nanochat d575940 nanochat/loss_eval.py) and the CORE metric (nanochat
d575940 nanochat/core_eval.py)."""
from nanolit.eval.bpb import bits_per_byte, bpb_sums, evaluate_bpb
from nanolit.eval.core import (
    EVAL_BUNDLE_URL,
    TaskSpec,
    download_core_bundle,
    evaluate_core,
    evaluate_task,
    load_bundle,
    load_task_data,
    write_core_csv,
)

__all__ = [
    "EVAL_BUNDLE_URL",
    "TaskSpec",
    "bits_per_byte",
    "bpb_sums",
    "download_core_bundle",
    "evaluate_bpb",
    "evaluate_core",
    "evaluate_task",
    "load_bundle",
    "load_task_data",
    "write_core_csv",
]

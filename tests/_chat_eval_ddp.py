"""The two-rank chat evaluation of tests/test_chat_eval.py: evaluate_chat on 2 gloo CPU processes.

    python tests/_chat_eval_ddp.py CKPT BASE_DIR TASKS OUT_JSON

Rank zero writes OUT_JSON: the all-reduced counts and each rank's own problem totals (recorded before the sum).
"""
from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

import nanolit.eval.chat as chat_eval
from nanolit.checkpoint import load_any


def run(rank: int, ckpt: str, base: str, tasks: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    local = []
    summed = chat_eval._sum_over_ranks

    def record(passed, total, device):
        local.append(total)
        return summed(passed, total, device)

    chat_eval._sum_over_ranks = record
    loaded = load_any(ckpt)
    result = chat_eval.evaluate_chat(loaded.model, loaded.tokenizer, tasks=tasks, base_dir=base, batch_size=2,
                                     max_new_tokens=6)
    totals = [None, None]
    dist.all_gather_object(totals, local)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"counts": result["counts"], "rank_totals": totals}, f)
    dist.barrier()  # leave together: a rank tearing gloo down while its peer still talks aborts the peer
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(*sys.argv[1:5], port), nprocs=2)

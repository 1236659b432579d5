"""SFT under real DDP (2 CPU processes, gloo): the ranks split each step's conversations as chat_sft does, stop
together at the horizon, average gradients and the val loss as chat_sft does, and rank zero alone exports."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from conftest import leave_process_group
from test_sft_train import B, T, Spy, base, gpt_state, no_hub  # noqa: F401 (base and no_hub are fixtures)

from nanolit.callbacks import ValidationLoss
from nanolit.checkpoint import load_nanochat, save_nanochat
from nanolit.data.sft import build_sft_val, sft_batches
from nanolit.data.sft_datamodule import SFTDataModule
from nanolit.model import GPTConfig, build_gpt
from nanolit.sft import SFTModule

TESTS_DIR = Path(__file__).resolve().parent
K, STEPS = 2, 2  # micro-batches per rank and step (one process accumulates 2K); steps trained (num_iterations 3)
KNOBS = {"device_batch_size": B, "target_examples_per_step": 2 * K * B, "max_seq_len": T}
EPS = 2 ** -24  # fp32's unit roundoff

# Lightning's launcher reruns this script for rank 1; both ranks run `run` and save what they saw.
SCRIPT = """
import sys
sys.path.insert(0, {tests_dir!r})
from test_sft_ddp import run
run(*sys.argv[1:], devices=2)
"""


class Record(Spy):
    """Spy's micro-batches and start weights, plus each micro-batch's loss and the gradient the optimizers apply at
    step 0 (after DDP's all-reduce)."""

    def __init__(self):
        super().__init__()
        self.losses, self.grad = [], None

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        spied = pl_module.__dict__["train_model"]

        def scoring(x, y, **kwargs):
            loss = spied(x, y, **kwargs)
            self.losses.append(float(loss.detach()))
            return loss

        pl_module.__dict__["train_model"] = scoring

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grad is None:
            self.grad = torch.cat([p.grad.flatten() for p in pl_module.gpt.parameters()])


def run(base_dir, init, root, devices: int = 1, **module_kwargs) -> dict:
    """SFT of ``init`` for STEPS steps on ``devices`` CPU processes; each rank saves what it saw to root/rank<r>.pt."""
    record, val_loss = Record(), ValidationLoss(eval_every=100)  # evaluates at step 0 and on the final model
    module = SFTModule(init_from=str(init), num_iterations=STEPS + 1, **KNOBS, **module_kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[record, val_loss], default_root_dir=root)
    trainer.fit(module, datamodule=SFTDataModule(str(base_dir), eval_steps=1, **KNOBS))
    out = {"world_size": trainer.world_size, "accum": module.grad_accum_steps, "step": trainer.global_step,
           "calls": record.calls, "losses": record.losses, "start": record.start, "grad": record.grad,
           "val_loss": val_loss.run_state.val_loss, "weights": gpt_state(module.gpt)}
    Path(root).mkdir(parents=True, exist_ok=True)
    torch.save(out, Path(root) / f"rank{trainer.global_rank}.pt")
    if devices > 1:
        leave_process_group()
    return out


@contextlib.contextmanager
def one_thread():
    """As the DDP ranks run (OMP_NUM_THREADS=1): another thread count may split a matmul's sums otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def conversations(calls: list, pad: int) -> list[tuple]:
    """Each row of these micro-batches as (inputs, targets), cut before its trailing padding: the same whatever
    micro-batch (and so padded width) the conversation was in."""
    rows = []
    for x, y in calls:
        for xs, ys in zip(x.tolist(), y.tolist()):
            n = len(xs)
            while n and xs[n - 1] == pad:
                n -= 1
            rows.append((xs[:n], ys[:n]))
    return rows


def gradient(gpt: torch.nn.Module, start: dict, calls: list) -> torch.Tensor:
    """chat_sft's gradient (nanochat d575940 scripts/chat_sft.py): each micro-batch's mean loss over its own
    supervised tokens, divided by the number of micro-batches in the step (DDP's average over ranks included)."""
    gpt.load_state_dict(start)
    gpt.zero_grad(set_to_none=True)
    with one_thread():
        for x, y in calls:
            (gpt(x, y) / len(calls)).backward()
    return torch.cat([p.grad.flatten() for p in gpt.parameters()])


def supervised_nats(losses: list[float], calls: list) -> float:
    """The step's summed loss over its supervised tokens, from the micro-batches' means: grouping-independent."""
    return sum(loss * int((y >= 0).sum()) for loss, (_, y) in zip(losses, calls, strict=True))


@pytest.mark.slow  # Lightning launches a second Python process that imports torch and Lightning: ~30 s here
def test_two_process_sft_splits_steps_averages_like_chat_sft_and_exports_once(base, tmp_path, byte_tokenizer):
    # A d1 with no all-zero matrix (nanochat zeroes lm_head and every c_proj: every loss would be ln V and only
    # lm_head would get a gradient at step 0).
    gpt = build_gpt(GPTConfig.from_depth(1, byte_tokenizer.get_vocab_size(), 64), "cpu")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in gpt.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    init = tmp_path / "init"
    save_nanochat(gpt, init, 0, {"user_config": {}})

    script = tmp_path / "ddp_sft.py"
    script.write_text(SCRIPT.format(tests_dir=str(TESTS_DIR)))
    # the child imports nanolit as this process does; one thread per rank, as two processes share the cores
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(base), str(init), str(tmp_path / "two")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = run(base, init, tmp_path / "one", export=False)  # the same target_examples_per_step on one process

    # 1. Both ranks trained the horizon's STEPS steps of K micro-batches, and stopped there with the same weights.
    assert (one["world_size"], one["accum"], one["step"], len(one["calls"])) == (1, 2 * K, STEPS, STEPS * 2 * K)
    for r in ranks:
        assert (r["world_size"], r["accum"], r["step"], len(r["calls"])) == (2, K, STEPS, STEPS * K)
        assert all(torch.equal(v, ranks[0]["weights"][k]) for k, v in r["weights"].items())
    # Rank zero alone exported: the model and chat_sft's meta, no optimizer, nothing from rank 1.
    export = base / "chatsft_checkpoints"
    assert sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file()) == [
        f"d1/meta_{STEPS:06d}.json", f"d1/model_{STEPS:06d}.pt"]
    meta = json.loads((export / "d1" / f"meta_{STEPS:06d}.json").read_text())
    assert meta["step"] == STEPS and meta["val_loss"] == ranks[0]["val_loss"] == ranks[1]["val_loss"]
    assert meta["model_config"]["n_layer"] == 1 and meta["model_config"]["vocab_size"] == gpt.config.vocab_size
    assert meta["user_config"]["target_examples_per_step"] == 2 * K * B
    assert meta["nanolit_run"] == str((tmp_path / "two").resolve())
    exported, _ = load_nanochat(export / "d1")
    assert all(torch.equal(v.float(), ranks[0]["weights"][k].float()) for k, v in exported.state_dict().items())
    assert proc.stdout.count("Validation loss") == 2  # steps 0 and 2, printed by rank zero only

    # 2. The same conversations per step as one process: rank r takes conversations r, r + 2, ... (chat_sft's
    # generator), so each step's 2KB conversations are one process's, split between the ranks.
    pad = byte_tokenizer.encode_special("<|assistant_end|>")
    single = conversations(one["calls"], pad)
    for rank, r in enumerate(ranks):
        assert conversations(r["calls"], pad) == single[rank::2]
        assert all(torch.equal(v, one["start"][k]) for k, v in r["start"].items())
    # But not the same micro-batches: rank 0's first holds conversations 0 and 2, one process's 0 and 1. chat_sft
    # averages per-micro-batch means (each over its own supervised tokens), so the two step-0 mean losses and
    # gradients differ; what both keep is the step's summed loss over its supervised tokens. The sums here add
    # N (~250) positive fp32 per-token losses in another order and shape (N * EPS relative each), and the rows'
    # forward runs at another padded width and thread count (another N * EPS at most): 2 * N * EPS.
    first = [c for r in ranks for c in r["calls"][:K]]  # the step's micro-batches on both ranks
    tokens = sum(int((y >= 0).sum()) for _, y in first)
    two_nats = supervised_nats(ranks[0]["losses"][:K] + ranks[1]["losses"][:K], first)
    assert two_nats == pytest.approx(supervised_nats(one["losses"][:2 * K], one["calls"][:2 * K]),
                                     rel=2 * tokens * EPS)

    # DDP's part: the gradient applied at step 0 is chat_sft's over both ranks' micro-batches. Both sum the same
    # four micro-batch gradients, one process as ((a+b)+c)+d and DDP as (a+b)+(c+d) (halving is exact): three
    # fp32 additions in another order, a few EPS of the summands; 1e-6 leaves a wide margin (tests/test_ddp.py).
    # A lost or unaveraged rank, or one process's grouping, is off by far more (asserted, so this can fail).
    model = build_gpt(GPTConfig.from_depth(1, byte_tokenizer.get_vocab_size(), 64), "cpu")
    expected = gradient(model, ranks[0]["start"], first)
    assert (ranks[0]["grad"] - expected).norm() <= 1e-6 * expected.norm()
    assert torch.equal(ranks[0]["grad"], ranks[1]["grad"])
    assert (one["grad"] - expected).norm() > 1e-3 * expected.norm()
    single_expected = gradient(model, one["start"], one["calls"][:2 * K])  # one process: its own grouping
    assert (one["grad"] - single_expected).norm() <= 1e-6 * single_expected.norm()

    # 3. The val loss: chat_sft's mean over ranks of each rank's batch means, rank r's batch being val conversations
    # r, r + 2 (one process's would be 0, 1 for eval_steps=1, or {0, 1}, {2, 3} for eval_steps=2: other means). The
    # callback sums per-token losses in fp32 and F.cross_entropy reduces its own way, each of the `tokens`
    # additions rounding by EPS relative, plus one rounding for the all-reduce's mean: (tokens + 1) * EPS.
    model.load_state_dict(ranks[0]["weights"])
    model.eval()
    val = [next(sft_batches(build_sft_val(base), byte_tokenizer, B, r, 2, max_tokens=T)) for r in range(2)]
    with torch.no_grad(), one_thread():
        means = [float(model(x, y)) for x, y in val]
    tokens = sum(int((y >= 0).sum()) for _, y in val)
    assert ranks[0]["val_loss"] == pytest.approx(sum(means) / 2, rel=(tokens + 1) * EPS)
    assert abs(means[0] - means[1]) > (tokens + 1) * EPS * means[0]  # a rank's batch alone would fail

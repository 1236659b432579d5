"""nanolit against nanochat itself: the same base-training recipe run by both programs, whole processes side by side.

Each round runs nanochat d575940's ``python -m scripts.base_train`` (from a checkout given by ``--nanochat``) and
``nanolit fit`` (this tree) with the same recipe on the same shards and tokenizer, one after the other (the order
alternates between rounds), each program as it runs by default. Each program prints its own line per step; this
script reads them:

- nanochat's ``dt`` runs from before the step's first forward to after its optimizer steps, and includes fetching
  the next micro-batch after every backward (its loader tokenizes inside the step);
- nanolit's ``dt`` (``train/dt``, ``TokenThroughputMonitor``) runs from the step's first ``on_train_batch_start`` to
  its last ``on_train_batch_end``: it leaves out the work between steps (the next batch's fetch, the loop's and
  the callbacks' bookkeeping). So nanolit also runs with :class:`StepClock`, which times the whole step the way
  nanochat's ``dt`` does: from one step's ``on_train_batch_start`` to the next one's, less the evaluations in
  between (the run state's ``eval_seconds``). The ratios use that whole step; nanolit's own ``dt`` is shown beside.

Steps counted: 1 .. N-2 of both programs (step 0 carries the compilation and is shown apart as the cold start; the
last step has no next step to close nanolit's whole-step clock). Per round and side: the fast decile (mean of the
fastest tenth of the counted steps) and the median; ratio = nanolit / nanochat, below 1 when nanolit is faster.
Also printed: the load average before each run, each process's wall time, and the largest relative difference of
the two programs' loss curves (the EMA loss of every step line) and val bpb, which should stay within 0.1%.

Preparing nanochat (outside this repository): a checkout at d575940 and its own Python environment, e.g.::

    git clone https://github.com/karpathy/nanochat ../nanochat-d575940 && git -C ../nanochat-d575940 checkout d575940
    python3 -m venv ../nanochat-venv
    ../nanochat-venv/bin/pip install torch==2.13.0      # first, pinned: the same torch as nanolit's
    ../nanochat-venv/bin/pip install tiktoken pyarrow regex psutil wandb pyyaml requests rustbpe tokenizers \\
        filelock jinja2 numpy                            # its pyproject's imports; check torch is still 2.13.0

The data: ``--base-dir`` (nanochat's layout: ``base_data/shard_*.parquet`` with the last shard as val, and
``tokenizer/tokenizer.pkl`` + ``token_bytes.pt``); by default it is laid out from the shared fixtures (nanochat's
d2 tokenizer, the 2026 fixture's five FineWeb-Edu shards). Each run gets a fresh folder linking to them, so the two
programs never see each other's checkpoints. Nothing is downloaded.

    .venv/bin/python benchmarks/vs_nanochat.py --nanochat ../nanochat-d575940 \\
        --nanochat-python ../nanochat-venv/bin/python --depth 2 --rounds 3
    .venv/bin/python benchmarks/vs_nanochat.py --nanochat ../nanochat-d575940 \\
        --nanochat-python ../nanochat-venv/bin/python --depth 4 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NANOLIT_SHARED", ROOT.parent / "shared"))
CLOCK_ENV = "VS_NANOCHAT_CLOCK"  # where StepClock writes nanolit's whole-step times
STEP_LINE = re.compile(r"^step (\d+)/\d+ .*?\| loss: ([\d.]+) .*?\| dt: ([\d.]+)ms")
VAL_LINE = re.compile(r"^Step (\d+) \| Validation bpb: ([\d.]+)")

try:  # only inside `nanolit fit` (StepClock); the driver itself needs nothing but the standard library
    import lightning.pytorch as _L
except ImportError:  # pragma: no cover
    _L = None


if _L is not None:
    class StepClock(_L.Callback):
        """nanochat's ``dt`` for nanolit: from a step's ``on_train_batch_start`` to the next step's, less the
        evaluations that ran in between; one figure per step (the last has none), written as JSON to
        ``$VS_NANOCHAT_CLOCK`` at the end of training."""

        def __init__(self) -> None:
            self.times: dict[int, float] = {}
            self._last: tuple[int, float, float] | None = None  # (step, clock, eval_seconds) at its start

        def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
            from nanolit.runstate import RunState

            now, evals = time.perf_counter(), RunState.of(trainer).eval_seconds
            if self._last is not None:
                step, then, evals_then = self._last
                self.times[step] = now - then - (evals - evals_then)
            self._last = (trainer.global_step, now, evals)

        def on_train_end(self, trainer, pl_module) -> None:
            path = os.environ.get(CLOCK_ENV)
            if path and trainer.is_global_zero:
                Path(path).write_text(json.dumps({str(k): v for k, v in sorted(self.times.items())}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanochat", type=Path, required=True, help="a nanochat checkout (d575940): holds scripts/")
    p.add_argument("--nanochat-python", default=None,
                   help="the Python with nanochat's dependencies (default: <nanochat>/.venv/bin/python, else this one)")
    p.add_argument("--base-dir", type=Path, default=None,
                   help="base_data/ + tokenizer/ in nanochat's layout (default: from the shared fixtures)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--total-batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=50, help="num_iterations of both runs")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=3, help="runs of each program, alternating")
    p.add_argument("--nanochat-args", default="", help="more base_train flags, e.g. '--device_type=cpu'")
    p.add_argument("--nanolit-args", default="", help="more `nanolit fit` flags, e.g. '--model.compile=false'")
    p.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    return p.parse_args(argv)


def default_base_dir(work: Path) -> Path:
    """nanochat's d2 tokenizer and the 2026 fixture's five shards (four train, one val), linked into ``work``."""
    tokenizer = SHARED / "fixtures" / "nanochat_d2" / "tokenizer"
    shards = SHARED / "fixtures" / "nanochat_2026_d2" / "base_data"
    if not (tokenizer / "tokenizer.pkl").exists() or len(list(shards.glob("shard_*.parquet"))) < 2:
        raise SystemExit(f"no --base-dir and no fixtures under {SHARED} (set NANOLIT_SHARED or pass --base-dir)")
    base = work / "data"
    base.mkdir(parents=True, exist_ok=True)
    for name, target in (("tokenizer", tokenizer), ("base_data", shards)):
        if not (base / name).exists():
            (base / name).symlink_to(target.resolve())
    return base


def run_base(work: Path, data: Path, name: str) -> Path:
    """A fresh base dir for one run: links to the shared shards and tokenizer, its own checkpoints and report."""
    base = work / name
    base.mkdir(parents=True)
    for sub in ("tokenizer", "base_data"):
        (base / sub).symlink_to((data / sub).resolve())
    return base


def nanochat_command(args: argparse.Namespace, python: str) -> list[str]:
    return [python, "-m", "scripts.base_train", f"--depth={args.depth}", f"--max_seq_len={args.max_seq_len}",
            f"--device_batch_size={args.device_batch_size}", f"--total_batch_size={args.total_batch_size}",
            f"--num_iterations={args.steps}", f"--eval_every={args.eval_every}", f"--eval_tokens={args.eval_tokens}",
            "--core_metric_every=-1", "--sample_every=1000000", *shlex.split(args.nanochat_args)]


def nanolit_command(args: argparse.Namespace, base: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "nanolit", "fit", "--model", "nanolit.module.GPTModule",
            f"--model.depth={args.depth}", f"--model.max_seq_len={args.max_seq_len}",
            f"--model.device_batch_size={args.device_batch_size}", f"--model.total_batch_size={args.total_batch_size}",
            f"--model.num_iterations={args.steps}", f"--data.base_dir={base}", f"--data.eval_tokens={args.eval_tokens}",
            f"--bpb.eval_every={args.eval_every}", "--core.core_metric_every=-1", "--sample.sample_every=-1",
            f"--trainer.default_root_dir={root}", "--trainer.callbacks+=vs_nanochat.StepClock",
            *shlex.split(args.nanolit_args)]


def parse_output(text: str) -> tuple[dict[int, tuple[float, float]], dict[int, float]]:
    """``({step: (loss, dt seconds)}, {step: val bpb})`` from a program's own lines."""
    steps, vals = {}, {}
    for line in text.splitlines():
        if m := STEP_LINE.match(line):
            steps[int(m.group(1))] = (float(m.group(2)), float(m.group(3)) / 1000)
        elif m := VAL_LINE.match(line):
            vals[int(m.group(1))] = float(m.group(2))
    return steps, vals


def run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[str, float, float]:
    """Run ``cmd``; ``(its output, wall seconds, load average before)``. A failed run stops the benchmark."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}); last lines:\n{proc.stdout[-3000:]}")
    return proc.stdout, wall, load


def fast_decile(times: list[float]) -> float:
    """The mean of the fastest tenth (at least one step)."""
    ordered = sorted(times)
    return statistics.fmean(ordered[:max(1, len(ordered) // 10)])


def summarize(times: dict[int, float], counted: range) -> dict[str, float]:
    values = [times[s] for s in counted if s in times]
    if not values:
        raise SystemExit(f"no step times for steps {counted.start}..{counted.stop - 1}")
    return {"fast_ms": 1000 * fast_decile(values), "median_ms": 1000 * statistics.median(values), "n": len(values)}


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    common = sorted(set(a) & set(b))
    return max((abs(a[k] - b[k]) / abs(b[k]) for k in common), default=math.nan)


def one_round(args: argparse.Namespace, work: Path, data: Path, r: int, python: str) -> dict[str, Any]:
    order = ("nanochat", "nanolit") if r % 2 == 0 else ("nanolit", "nanochat")
    counted = range(1, args.steps - 1)
    out: dict[str, Any] = {"order": order}
    for side in order:
        base = run_base(work, data, f"r{r}_{side}")
        log = work / f"r{r}_{side}.log"
        if side == "nanochat":
            cmd = nanochat_command(args, python)
            env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "WANDB_MODE": "disabled"}
            text, wall, load = run(cmd, args.nanochat, env, log)
            steps, vals = parse_output(text)
            whole = {s: dt for s, (_, dt) in steps.items()}
        else:
            clock = work / f"r{r}_clock.json"
            cmd = nanolit_command(args, base, work / f"r{r}_nanolit_root")
            path = os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])
            env = {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), CLOCK_ENV: str(clock)}
            text, wall, load = run(cmd, ROOT, env, log)
            steps, vals = parse_output(text)
            whole = {int(k): v for k, v in json.loads(clock.read_text()).items()}
        own = {s: dt for s, (_, dt) in steps.items()}
        out[side] = {"load_before": load, "wall_s": wall, "command": shlex.join(cmd), "log": str(log),
                     "first_step_ms": 1000 * own.get(0, math.nan), "whole": summarize(whole, counted),
                     "own_dt": summarize(own, counted), "loss": {s: l for s, (l, _) in steps.items()}, "val_bpb": vals}
    nc, nl = out["nanochat"], out["nanolit"]
    out["ratio_fast"] = nl["whole"]["fast_ms"] / nc["whole"]["fast_ms"]
    out["ratio_median"] = nl["whole"]["median_ms"] / nc["whole"]["median_ms"]
    out["ratio_fast_own_dt"] = nl["own_dt"]["fast_ms"] / nc["whole"]["fast_ms"]
    out["ratio_median_own_dt"] = nl["own_dt"]["median_ms"] / nc["whole"]["median_ms"]
    out["loss_max_rel_diff"] = max_rel_diff(nl["loss"], nc["loss"])
    out["val_bpb_max_rel_diff"] = max_rel_diff(nl["val_bpb"], nc["val_bpb"])
    return out


def print_round(r: int, res: dict[str, Any]) -> None:
    print(f"round {r + 1} ({' then '.join(res['order'])})")
    for side in res["order"]:
        s = res[side]
        own = (f" | own dt fast {s['own_dt']['fast_ms']:.1f} median {s['own_dt']['median_ms']:.1f}"
               if side == "nanolit" else "")
        print(f"  {side:8s} load {s['load_before']:.2f} | whole step fast {s['whole']['fast_ms']:.1f} ms median "
              f"{s['whole']['median_ms']:.1f} ms ({s['whole']['n']} steps){own} | step 0 {s['first_step_ms']:.0f} ms"
              f" | process {s['wall_s']:.1f} s")
    print(f"  nanolit/nanochat: fast {res['ratio_fast']:.3f}, median {res['ratio_median']:.3f} "
          f"(nanolit's own dt: fast {res['ratio_fast_own_dt']:.3f}, median {res['ratio_median_own_dt']:.3f}) | "
          f"loss curve max rel diff {res['loss_max_rel_diff']:.2e}, val bpb {res['val_bpb_max_rel_diff']:.2e}",
          flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not (args.nanochat / "scripts" / "base_train.py").exists():
        raise SystemExit(f"{args.nanochat} holds no scripts/base_train.py: pass a nanochat checkout (d575940)")
    python = args.nanochat_python
    if python is None:
        venv = args.nanochat / ".venv" / "bin" / "python"
        python = str(venv) if venv.exists() else sys.executable
    with tempfile.TemporaryDirectory(prefix="vs_nanochat_") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        data = args.base_dir.resolve() if args.base_dir else default_base_dir(work)
        print(f"d{args.depth}: T {args.max_seq_len}, B {args.device_batch_size}, {args.total_batch_size:,} "
              f"tokens/step, {args.steps} steps, eval every {args.eval_every}; data {data}; runs in {work}", flush=True)
        rounds = []
        for r in range(args.rounds):
            rounds.append(one_round(args, work, data, r, python))
            print_round(r, rounds[-1])
    keys = ("ratio_fast", "ratio_median", "ratio_fast_own_dt", "ratio_median_own_dt")
    summary = {k: statistics.median(res[k] for res in rounds) for k in keys}
    summary["loss_max_rel_diff"] = max(res["loss_max_rel_diff"] for res in rounds)
    summary["val_bpb_max_rel_diff"] = max(res["val_bpb_max_rel_diff"] for res in rounds)
    print(f"median over {len(rounds)} rounds, nanolit/nanochat: fast decile {summary['ratio_fast']:.3f}, median step "
          f"{summary['ratio_median']:.3f} (nanolit's own dt: {summary['ratio_fast_own_dt']:.3f}, "
          f"{summary['ratio_median_own_dt']:.3f}); curves: loss {summary['loss_max_rel_diff']:.2e}, "
          f"val bpb {summary['val_bpb_max_rel_diff']:.2e}")
    print("commands:")
    for side in ("nanochat", "nanolit"):
        print(f"  {side}: {rounds[0][side]['command']}")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds, "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()

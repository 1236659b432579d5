"""A markdown report of the run, like nanochat's report.md (nanochat d575940 ``nanochat/report.py`` and the
"Base model training" section ``scripts/base_train.py`` writes), when fit ends."""
from __future__ import annotations

import datetime
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as L
import torch

from nanolit.common import atomic_write
from nanolit.lightning_adapter import StepBoundary, is_logging_step, lr_names
from nanolit.runstate import RunState

SPARK_LEVELS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 60


def format_value(value: Any) -> str:
    """nanochat's report formatting: floats ``.4f``, ints >= 10000 with separators, else ``str``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and value >= 10000:
        return f"{value:,}"
    return str(value)


def sparkline(values: list[float], width: int = SPARK_WIDTH) -> str:
    """A one-line text chart: ``values`` averaged into at most ``width`` buckets, scaled to 8 block heights."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    buckets = min(width, len(finite))
    means = []
    for b in range(buckets):
        chunk = finite[b * len(finite) // buckets:(b + 1) * len(finite) // buckets]
        means.append(sum(chunk) / len(chunk))
    low, high = min(means), max(means)
    # a constant series averages to values a rounding error apart: draw it flat, not as full-height noise
    span = high - low if high - low > 1e-9 * max(1.0, abs(high)) else math.inf
    return "".join(SPARK_LEVELS[round((m - low) / span * (len(SPARK_LEVELS) - 1))] for m in means)


def ema_debiased(values: list[float], beta: float = 0.9) -> list[float]:
    """nanochat's smoothed loss curve (debiased EMA, beta 0.9) for plotting a raw loss series."""
    smooth, out = 0.0, []
    for i, value in enumerate(values):
        smooth = beta * smooth + (1 - beta) * value
        out.append(smooth / (1 - beta ** (i + 1)))
    return out


def _bullets(items: dict[str, Any]) -> str:
    return "\n".join(f"- {key}: {format_value(value)}" for key, value in items.items() if value is not None)


class ReportWriter(L.Callback):
    """Write ``report.md`` (and PNG plots when matplotlib is installed) into the run directory when fit ends.

    Sections, as nanochat's "Base model training" report: environment (platform, Python, torch, Lightning, GPUs),
    config (the module's and datamodule's hyperparameters, trainer settings), run facts (parameters, FLOPs per
    token, iterations, tokens, tokens:params, world size), outcomes (min and final val bpb, CORE estimate, MFU of
    the last step, total training FLOPs and time, peak memory), the last CORE table, the last samples, and charts.

    The figures come from the run state (:class:`nanolit.runstate.RunState`). The curves are recorded here after
    every optimizer step and checkpointed, so a resumed run's report has the whole curve: ``train/loss_raw`` (what
    the step returned, summed over its micro-batches; charted with its debiased EMA, which is the logged
    ``train/loss``), and every param group's LR and momentum under ``LearningRateMonitor``'s names
    (``lr-AdamW/lm_head``, ``lr-AdamW/lm_head-momentum``). Optional protocol: ``flops_per_token``,
    ``tokens_per_step``, ``num_iterations`` on the module. A fit that trained no step (a finished run relaunched
    with ``ckpt_path="last"``) writes no report, so the last one stays. Written on global rank zero; ``path``
    overrides ``<trainer.log_dir>/report.md``. Plots: ``pip install nanolit[plots]`` for PNGs, else text charts.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.series: dict[str, list[tuple[int, float]]] = {}
        self.report_path: Path | None = Path(path) if path else None
        self.run_state = RunState()  # replaced by the trainer's in setup
        self._boundary = StepBoundary()
        self._trained = False
        self._step_loss: Any = None  # the current step's returned losses, summed over its micro-batches
        self._pending_loss: list[tuple[int, Any]] = []  # (step, loss) not yet read off the device

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run_state = RunState.of(trainer)
        # trainer.log_dir is a broadcast: read it here, on every rank, never from rank zero alone.
        if stage == "fit" and self.path is None:
            self.report_path = Path(trainer.log_dir or trainer.default_root_dir) / "report.md"

    def _record(self, name: str, step: int, value: float) -> None:
        self.series.setdefault(name, []).append((step, float(value)))

    def _flush_losses(self) -> None:
        """Record the pending train losses, reading the tensors off the device in one go (one host sync)."""
        if not self._pending_loss:
            return
        tensors = [loss.float().reshape(()) for _, loss in self._pending_loss if isinstance(loss, torch.Tensor)]
        read = iter(torch.stack(tensors).tolist() if tensors else [])
        for step, loss in self._pending_loss:
            self._record("train/loss_raw", step, next(read) if isinstance(loss, torch.Tensor) else loss)
        self._pending_loss = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._boundary.start(trainer)
        self._trained = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
            self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        if not self._boundary.batch_ends(trainer):
            return
        self._trained = True
        step = trainer.global_step - 1  # the step just taken, nanochat's index
        if self._step_loss is not None:
            # a per-step .item() would stop the host every step: losses are read on logging steps
            self._pending_loss.append((step, self._step_loss))
            self._step_loss = None
            if is_logging_step(trainer, step):
                self._flush_losses()
        for optimizer, names in zip(trainer.optimizers, lr_names(trainer.optimizers)):
            for group, name in zip(optimizer.param_groups, names):
                self._record(name, step, group["lr"])
                momentum = group.get("momentum", group["betas"][0] if "betas" in group else None)
                if momentum is not None:
                    self._record(f"{name}-momentum", step, momentum)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush_losses()
        if not trainer.is_global_zero or self.report_path is None or not self._trained:
            return
        path = self.report_path
        state = self.run_state.flush()
        if state.val_bpb_history:
            self.series["val/bpb"] = list(state.val_bpb_history)
        sections = [
            f"# nanolit report\n\nGenerated: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
            "## Environment\n\n" + _bullets(environment()),
            "## Config\n\n" + _bullets(self._config(trainer, pl_module)),
            "## Training\n\n" + _bullets(self._facts(trainer, pl_module)),
        ]
        if state.core:
            sections.append(core_table(state.core))
        if state.chat:
            sections.append(chat_table(state.chat))
        if state.samples:
            body = "\n".join(s["sample"] for s in state.samples["samples"])
            sections.append(f"## Samples (step {state.samples['step']:05d})\n\n```text\n{body}\n```")
        sections.append(self._charts(path.parent))
        with atomic_write(path) as tmp:
            tmp.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
        print(f"Report written to {path}")

    def _config(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        # keys starting with "_" are LightningCLI's bookkeeping (_class_path, _instantiator), not settings
        config = {f"model.{k}": v for k, v in pl_module.hparams.items() if not k.startswith("_")}
        datamodule = trainer.datamodule
        if datamodule is not None:
            config.update({f"data.{k}": v for k, v in datamodule.hparams.items() if not k.startswith("_")})
        config.update({"trainer.max_steps": trainer.max_steps, "trainer.precision": trainer.precision,
                       "trainer.accelerator": type(trainer.accelerator).__name__,
                       "trainer.num_devices": trainer.num_devices, "trainer.num_nodes": trainer.num_nodes})
        return config

    def _facts(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        num_params = sum(p.numel() for p in pl_module.parameters())
        flops_per_token = getattr(pl_module, "flops_per_token", None)
        tokens_per_step = getattr(pl_module, "tokens_per_step", None)
        num_iterations = getattr(pl_module, "num_iterations", None)
        total_tokens = tokens_per_step * num_iterations if tokens_per_step and num_iterations else None
        state = self.run_state
        facts: dict[str, Any] = {
            "Number of parameters": num_params,
            "Number of FLOPs per token": f"{flops_per_token:e}" if flops_per_token else None,
            "Calculated number of iterations": num_iterations,
            "Steps completed": trainer.global_step,
            "Number of training tokens": total_tokens,
            "Tokens : Params ratio": total_tokens / num_params if total_tokens and num_params else None,
            "DDP world size": trainer.world_size,
            "Final train loss (EMA)": state.train_loss,
            "Minimum validation bpb": state.min_val_bpb if state.val_bpb is not None else None,
            "Final validation bpb": state.val_bpb,
            "CORE metric estimate": state.core["core_metric"] if state.core else None,
            "Final validation loss": state.val_loss,
        }
        if state.dt is not None:
            facts["MFU %"] = f"{state.mfu:.2f}%" if state.mfu is not None else "n/a (peak FLOP/s unknown)"
            facts["Total training flops"] = f"{state.total_training_flops:e}"
            facts["Total training time"] = f"{state.total_training_time / 60:.2f}m"
        facts.update(peak_memory(trainer.strategy.root_device))
        return facts

    def _charts(self, out_dir: Path) -> str:
        series = {name: points for name, points in self.series.items() if points}
        if not series:
            return "## Charts\n\nNo steps were recorded."
        try:
            import matplotlib  # noqa: F401  (optional extra: nanolit[plots])
        except ImportError:
            lines = []
            for name, points in series.items():
                steps, values = [p[0] for p in points], [p[1] for p in points]
                if name == "train/loss_raw":  # the chart shows what is logged as train/loss
                    name, values = "train/loss (EMA)", ema_debiased(values)
                lines.append(f"{name:<28} {sparkline(values)}  first {values[0]:.4g}, last {values[-1]:.4g}, "
                             f"min {min(values):.4g}, max {max(values):.4g}  (steps {steps[0]}-{steps[-1]})")
            return ("## Charts\n\nText charts (install matplotlib, `pip install nanolit[plots]`, for PNG plots):"
                    "\n\n```text\n" + "\n".join(lines) + "\n```")
        images = [f"![{title}]({file})" for title, file in plot_pngs(series, out_dir)]
        return "## Charts\n\n" + "\n\n".join(images)

    def state_dict(self) -> dict[str, Any]:
        self._flush_losses()
        return {"series": {name: [list(p) for p in points] for name, points in self.series.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.series = {name: [(int(s), float(v)) for s, v in points] for name, points in state_dict["series"].items()}


def environment() -> dict[str, Any]:
    """Platform, versions and GPUs (the parts of nanochat's report header that describe the machine)."""
    env: dict[str, Any] = {
        "Platform": platform.platform(),
        "Python": sys.version.split()[0],
        "PyTorch": torch.__version__,
        "Lightning": lightning.__version__,
        "CPUs": os.cpu_count(),
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        memory = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
        env["GPUs"] = f"{len(names)} x {names[0]} ({memory:.1f} GiB each)"
        env["CUDA"] = torch.version.cuda
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        env["GPUs"] = "Apple MPS"
    else:
        env["GPUs"] = "none"
    return env


def peak_memory(device: torch.device) -> dict[str, str]:
    """Peak GPU memory (nanochat prints ``torch.cuda.max_memory_allocated``), or the process's peak RSS."""
    if device.type == "cuda":
        return {"Peak memory usage": f"{torch.cuda.max_memory_allocated(device) / 1024 ** 2:,.2f}MiB"}
    try:
        import resource
    except ImportError:  # Windows
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 1024 ** 2 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
    return {"Peak host memory (RSS)": f"{rss_mib:,.2f}MiB"}


def core_table(result: dict[str, Any]) -> str:
    """The last CORE evaluation as base_eval's table: Task, Accuracy, Centered, then CORE."""
    rows = [f"| {label} | {acc:.4f} | {result['centered_results'][label]:.4f} |"
            for label, acc in result["results"].items()]
    return (f"## CORE (step {result['step']:05d})\n\n| Task | Accuracy | Centered |\n|---|---|---|\n"
            + "\n".join(rows) + f"\n| CORE | | {result['core_metric']:.4f} |")


def chat_table(chat: dict[str, Any]) -> str:
    """The last chat evaluation: each task's accuracy (correct of total), and ChatCORE when it was computed."""
    rows = [f"| {name} | {accuracy:.4f} | {chat['counts'][name][0]} / {chat['counts'][name][1]} |"
            for name, accuracy in chat["results"].items()]
    if chat.get("chatcore") is not None:
        rows.append(f"| ChatCORE | {chat['chatcore']:.4f} | |")
    return (f"## Chat evaluation (step {chat['step']:05d})\n\n| Task | Accuracy | Correct / total |\n|---|---|---|\n"
            + "\n".join(rows))


def plot_pngs(series: dict[str, list[tuple[int, float]]], out_dir: Path) -> list[tuple[str, str]]:
    """PNG plots of the loss, val bpb, learning rates and momenta; returns ``(title, file name)`` pairs."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    groups = {
        "train loss": ("train_loss.png", [n for n in series if n == "train/loss_raw"]),
        "validation bpb": ("val_bpb.png", [n for n in series if n == "val/bpb"]),
        "learning rate": ("lr.png", [n for n in series if n.startswith("lr-") and not n.endswith("-momentum")]),
        "momentum": ("momentum.png", [n for n in series if n.endswith("-momentum")]),
    }
    written = []
    for title, (file, names) in groups.items():
        if not names:
            continue
        fig = Figure(figsize=(7, 3.5))
        ax = fig.subplots()
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, label=name, linewidth=1)
            if name == "train/loss_raw":
                ax.plot(steps, ema_debiased(list(values)), label="train/loss (EMA 0.9, debiased)", linewidth=1.5)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_write(out_dir / file) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        written.append((title, file))
    return written

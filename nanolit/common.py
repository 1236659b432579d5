"""Small shared helpers: the base directory, device detection, user-facing errors, atomic writes.

Plain Python/torch only: every layer may import this module.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator

import torch


class NanolitError(Exception):
    """A problem with the user's input or environment.

    The message is one line that names the problem and the fix; the CLI prints it without a traceback.
    """


def get_base_dir(base_dir: str | os.PathLike | None = None, create: bool = False) -> Path:
    """The nanochat-layout base directory (``base_data/``, ``tokenizer/``, ``base_checkpoints/``, ...).

    Order: the explicit argument, ``$NANOLIT_BASE_DIR``, ``$NANOCHAT_BASE_DIR``, ``~/.cache/nanolit``.
    An existing nanochat folder (``~/.cache/nanochat``) works as is when pointed at. The environment's or the
    default folder is created, like nanochat's; an explicit argument must exist unless ``create`` (a typo in
    ``--data.base_dir`` must not silently start an empty dir).
    """
    env = os.environ.get("NANOLIT_BASE_DIR") or os.environ.get("NANOCHAT_BASE_DIR")
    path = Path(base_dir or env or Path.home() / ".cache" / "nanolit").expanduser()
    if base_dir and not create and not path.is_dir():
        raise NanolitError(f"base dir {path} does not exist; create it, fix the path (--data.base_dir / "
                           f"--base_dir), or build data there with `nanolit data ...`")
    path.mkdir(parents=True, exist_ok=True)
    return path


def autodetect_device_type() -> str:
    """CUDA, then MPS, then CPU (nanochat's order)."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels so wall-clock timings are real (nanochat skips this on MPS)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    A crash or exception mid-write never clobbers a good file, and readers never see a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def autocast_context(device: torch.device | str):
    """bf16 autocast on CUDA (nanochat d575940 scripts/base_train.py); fp32 elsewhere.

    MPS runs fp32 like nanochat: bf16 autocast on MPS is slower or unsupported for several ops on the torch
    versions we test, and fp32 keeps CPU and MPS numerics identical.
    """
    if torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def download_file(url: str, path: str | os.PathLike, attempts: int = 5, backoff: float = 1.0) -> Path:
    """Fetch ``url`` to ``path`` through a temporary file, retrying with exponential backoff.

    Waits ``backoff * 2**attempt`` s between tries (nanochat retries 5 times). A 4xx answer other than a
    timeout or rate limit is final (a missing shard will not appear on retry).
    """
    path = Path(path)
    for attempt in range(1, attempts + 1):
        try:
            with atomic_write(path) as tmp, urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, length=1 << 20)
            return path
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429) or attempt == attempts:
                raise NanolitError(f"could not download {path.name} from {url} after {attempt} attempt(s): {e}") from None
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, truncated bodies
            if attempt == attempts:
                raise NanolitError(f"could not download {path.name} from {url} after {attempt} attempt(s): {e}; "
                                   f"check the network and run the command again") from None
        time.sleep(backoff * 2**attempt)
    return path


def load_tensors(path: str | os.PathLike, device: torch.device | str = "cpu", mmap: bool = False):
    """``torch.load`` with ``weights_only=True`` and a one-line error for a truncated or foreign file.

    weights_only: a checkpoint is data, and unpickling arbitrary objects would run code. ``mmap`` leaves the
    tensors on disk until used (a check that a file loads costs no memory).
    """
    if not Path(path).exists():
        raise NanolitError(f"{path} does not exist; check the path")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not a checkpoint
        raise NanolitError(f"{path} is not a torch checkpoint (not a zip archive: truncated, or another kind of "
                           "file); re-save it or pick another file")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # a damaged archive, a pickle refused by weights_only
        raise NanolitError(f"cannot read {path} ({short_reason(e)}); it is a damaged torch checkpoint, or holds "
                           "objects other than tensors and plain data (refused: loading them would run code): "
                           "re-save it or pick another file") from None


def short_reason(error: BaseException, limit: int = 160) -> str:
    """The gist of an exception's message for a one-line error: its first sentence of its first line."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    for stop in (". ", " This "):
        if stop in line[20:]:
            line = line[:line.index(stop, 20)]
    return line[:limit]

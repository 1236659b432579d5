"""Run model-written Python in a separate, limited process (nanochat d575940 nanochat/execution.py).

Each program runs in a fresh ``python -I`` interpreter (no inherited state, no user site or environment variables)
in its own empty temporary folder, with a time limit, a memory limit, and no network, process creation or writes
outside that folder (see ``_sandbox.py`` for how). nanochat runs the code in a forked child of the evaluating
process with dangerous functions set to None; a separate interpreter is safe to start from a process with threads
(torch's) and the audit hook also catches the calls that setting attributes to None misses (``_socket``,
``posix.system``).
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SANDBOX = Path(__file__).with_name("_sandbox.py")
TIMEOUT = 5.0  # seconds per program (nanochat's default)
MEMORY = 256 * 1024 * 1024  # bytes of address space (nanochat's default)
_STARTUP = 5.0  # seconds the interpreter may take to start and report, beyond the program's own limit


@dataclass
class ExecutionResult:
    """How one program ran (nanochat's fields)."""

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False


def execute_code(code: str, timeout: float = TIMEOUT, maximum_memory_bytes: int | None = MEMORY) -> ExecutionResult:
    """Run ``code`` as a program; success means it finished without an exception within the limits."""
    marker = f"@@nanolit-result-{secrets.token_hex(8)}@@"
    request = json.dumps({"code": code, "timeout": timeout, "memory": maximum_memory_bytes, "marker": marker})
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}  # nothing of ours leaks in
    with tempfile.TemporaryDirectory(prefix="nanolit-exec-") as folder:
        try:
            proc = subprocess.run([sys.executable, "-I", str(SANDBOX)], input=request, capture_output=True, text=True,
                                  cwd=folder, env=env, timeout=timeout + _STARTUP, start_new_session=True)
        except subprocess.TimeoutExpired:  # the code outlived its alarm (e.g. it caught it): killed
            return ExecutionResult(False, "", "", "Execution timed out (process killed)", timeout=True)
    # The result is the last line that starts with this run's marker; anything the code wrote itself comes before.
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        return ExecutionResult(False, "", proc.stderr[-10000:], f"Execution failed (no result returned: {reason})",
                               memory_exceeded="MemoryError" in proc.stderr)
    return ExecutionResult(**json.loads(lines[-1][len(marker):]))

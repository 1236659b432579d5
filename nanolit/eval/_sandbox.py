"""The child process of :mod:`nanolit.eval.execution`: run one untrusted Python program under limits.

Run as ``python -I _sandbox.py`` with the request ``{"code", "timeout", "memory", "marker"}`` as JSON on stdin, in an
empty temporary folder. It imports the standard library only (so it starts in milliseconds and fits the memory
limit), then:

- caps address space (the memory limit), CPU seconds, file size and core dumps with ``setrlimit``;
- installs an audit hook (PEP 578, which code cannot remove) refusing network sockets, new processes and
  signals, ctypes, destructive file-system calls, and writes outside the folder;
- runs the code with stdout and stderr captured and a wall-clock alarm;
- writes one line, the marker followed by the JSON result, to the real stdout.

Not a security boundary against code written to escape it (it runs as the same user); it stops the accidents that
model-written code makes: endless loops, runaway memory, stray network and process calls, deleted files.
"""
import contextlib
import io
import json
import os
import resource
import signal
import sys

# Audit events refused, by prefix. socket.__new__ is raised by the C socket type itself, so `import _socket`
# gains nothing; the process events cover os.system, the exec/spawn family, fork and subprocess.
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "os.kill", "os.killpg", "pty.", "ctypes.", "os.remove", "os.rmdir", "os.rename", "os.truncate",
            "os.chmod", "os.chown", "os.chflags", "os.link", "os.symlink", "os.putenv", "os.unsetenv", "os.setuid",
            "os.chroot", "shutil.rmtree", "shutil.move", "sys.remote_exec", "webbrowser.open")
_BLOCKED_MODULES = {"_posixsubprocess", "_ctypes", "ctypes", "multiprocessing", "_multiprocessing"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class SandboxViolation(Exception):
    pass


class TimedOut(BaseException):  # not an Exception, so `except Exception` in the code does not swallow it
    pass


def _audit(folder: str):
    def hook(event: str, args) -> None:
        if event.startswith(_BLOCKED) or (event == "import" and args[0] in _BLOCKED_MODULES):
            kind = "network access" if event.startswith("socket.") else f"importing {args[0]}" if event == "import" \
                else event
            raise SandboxViolation(f"{kind} is not allowed in the sandbox")
        if event == "open" and args[0] is not None and _writes(args[1], args[2]):
            path = os.path.realpath(os.fsdecode(args[0])) if not isinstance(args[0], int) else folder
            if not (path == folder or path.startswith(folder + os.sep)):
                raise SandboxViolation(f"writing {path} is not allowed in the sandbox (only the working folder)")
    return hook


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool((flags or 0) & _WRITE_FLAGS)


def _limit(timeout: float, memory: int | None) -> None:
    seconds = int(timeout) + 2  # CPU seconds: stops a busy loop even if the parent is gone
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))  # no file larger than 16 MiB
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))


def _run(code: str, timeout: float) -> dict:
    result = {"success": False, "stdout": "", "stderr": "", "error": None, "timeout": False,
              "memory_exceeded": False}
    out, err = io.StringIO(), io.StringIO()

    def alarm(signum, frame):
        raise TimedOut()

    signal.signal(signal.SIGALRM, alarm)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        result["success"] = True
    except TimedOut:
        result.update(timeout=True, error="Execution timed out")
    except MemoryError as e:
        result.update(memory_exceeded=True, error=f"Memory limit exceeded: {e}")
    except BaseException as e:  # SystemExit and KeyboardInterrupt from the code are failures too
        result["error"] = f"{type(e).__name__}: {e}"
    result.update(stdout=out.getvalue()[-10000:], stderr=err.getvalue()[-10000:])
    return result


def main() -> None:
    request = json.loads(sys.stdin.read())
    real_stdout = sys.stdout
    folder = os.path.realpath(os.getcwd())
    _limit(request["timeout"], request["memory"])
    sys.addaudithook(_audit(folder))
    result = _run(request["code"], request["timeout"])
    real_stdout.write("\n" + request["marker"] + json.dumps(result) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()

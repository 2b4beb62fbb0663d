"""Small shared helpers: paths, free ports, log tails, process stopping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = TESTS_DIR.parent
LOOPBACK = "127.0.0.1"


class HarnessError(Exception):
    """A fixture could not do its job (a server did not start, a binary is missing...)."""


def venv_python() -> str:
    """The interpreter of tests/.venv if it exists, else the one running the tests."""
    candidate = TESTS_DIR / ".venv" / "bin" / "python"
    if candidate.exists():
        return str(candidate)
    return sys.executable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def tail(path: Path | str, lines: int = 60, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of a file, or a note saying why there are none."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return f"<{p} does not exist>"
    text = data.decode("utf-8", errors="replace")
    out = text.splitlines()[-lines:]
    if not out:
        return f"<{p} is empty>"
    return "\n".join(out)


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> int | None:
    """SIGTERM the process we started (by its pid), wait `grace` seconds, then SIGKILL it."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    return proc.returncode


def wait_until(predicate, timeout: float, interval: float = 0.1):
    """Call `predicate` until it returns a truthy value or `timeout` passes; return the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def token_needles(token: str) -> list[bytes]:
    """What a leaked token would look like: the token, the part after `syt_`, and its random
    middle segment."""
    out = {token}
    if token.startswith("syt_"):
        out.add(token[len("syt_"):])
        parts = token.split("_")
        if len(parts) >= 4 and len(parts[2]) >= 16:
            out.add(parts[2])
    return [n.encode() for n in out]

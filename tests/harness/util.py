"""Small shared helpers: paths, free ports, log tails, process stopping."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
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


# Listening ports come from below the kernel's ephemeral range (net.ipv4.ip_local_port_range,
# 32768-60999 by default). A port the kernel handed out with bind(0) is an ephemeral one: in
# the moment between choosing it and a server binding it, any outgoing connection (Synapse's
# own to PostgreSQL, say) can take it as its local port, and the server fails with "Address
# already in use" (seen once in test_fleet, on the replication port).
def _listening_ports() -> tuple[int, int]:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return (10000, max(11000, min(32000, low)))


_PORTS = _listening_ports()
_handed_out: set[int] = set()
_ports_lock = threading.Lock()
_ports_rng = random.SystemRandom()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range, and not
    handed out before by this process."""
    with _ports_lock:
        for _ in range(1000):
            port = _ports_rng.randrange(*_PORTS)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((LOOPBACK, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    raise HarnessError(f"no free TCP port in {_PORTS[0]}-{_PORTS[1]} after 1000 tries")


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


class Actor(threading.Thread):
    """A test's worker thread that keeps what it raised. A plain thread's exception only
    reaches stderr, so a test whose workers died at once could pass on no traffic at all:
    join actors with `join_actors` and assert on its answer."""

    def __init__(self, target, *args, name: str | None = None):
        super().__init__(name=name, daemon=True)
        self._fn, self._args = target, args
        self.error: str | None = None
        self.result = None

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except BaseException:  # noqa: BLE001 - whatever it was, the test must hear of it
            self.error = traceback.format_exc(limit=6)


def join_actors(actors: list[Actor], timeout: float) -> list[str]:
    """Join every actor within `timeout` s in all; what went wrong: actors still running,
    actors that raised (with their traceback). Empty when all ended cleanly."""
    assert actors, "no actor to join: the test started no worker"
    deadline = time.monotonic() + timeout
    for a in actors:
        a.join(max(0.1, deadline - time.monotonic()))
    out = [f"{a.name}: still running {timeout:.0f} s after it was told to stop" for a in actors if a.is_alive()]
    out += [f"{a.name} raised:\n{a.error}" for a in actors if a.error is not None]
    return out


def redacted(token: str) -> str:
    """How a test may name a token in a message or an assertion: never the token itself."""
    return f"{token[:4]}…({len(token)} chars)"


# The homeserver's own database holds its access tokens by design (Synapse stores them): that
# is Synapse's state, not something a test or vigie wrote. Everything else is scanned.
SERVER_STATE = ("homeserver.db", "homeserver.db-wal", "homeserver.db-shm", "homeserver.db-journal")


def token_leaks(tokens: list[str], blobs: dict[str, bytes] | None = None, dirs=(),
                skip_names=SERVER_STATE) -> tuple[list[str], dict[str, int]]:
    """Look for every piece of every token (`token_needles`) in `blobs` (where -> bytes) and in
    every file under `dirs`. Returns (findings, what was scanned); findings name the token
    by its index and the piece by its length, never the token."""
    assert tokens, "no token to look for"
    needles = {n: i for i, t in enumerate(tokens) for n in token_needles(t)}
    pattern = re.compile(b"|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True)))
    found: list[str] = []
    scanned = {"blobs": 0, "files": 0, "bytes": 0}

    def scan(where: str, data: bytes) -> None:
        scanned["bytes"] += len(data)
        for hit in sorted({m.group(0) for m in pattern.finditer(data)}):
            found.append(f"token #{needles[hit]} ({len(hit)}-byte piece) found in {where}")

    for where, data in (blobs or {}).items():
        scanned["blobs"] += 1
        scan(where, data)
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file() and not p.is_symlink() and p.name not in skip_names:
                scanned["files"] += 1
                scan(str(p), p.read_bytes())
    return found, scanned

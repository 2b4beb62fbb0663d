"""Running the vigie agent under test.

Never skips: a missing binary, a BPF load failure or an agent that never becomes ready is a
test failure (HarnessError, turned into pytest.fail by the fixtures) with the agent's stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import metrics as metrics_mod
from .util import LOOPBACK, REPO_ROOT, HarnessError, free_port, stop_process, tail

DEFAULT_BIN = REPO_ROOT / "target" / "release" / "vigie"
READY_METRIC = "vigie_probes_attached"
LABEL_RE = re.compile(r"^[0-9a-f]{16}$")


def vigie_bin() -> Path:
    return Path(os.environ.get("VIGIE_BIN") or DEFAULT_BIN)


def check_binary() -> Path:
    path = vigie_bin()
    if not path.exists():
        raise HarnessError(
            f"vigie binary not found at {path}: build it with `cargo build --release -p vigie` "
            f"(or point VIGIE_BIN at it). These tests never skip: the agent is what they test."
        )
    if not os.access(path, os.X_OK):
        raise HarnessError(f"vigie binary at {path} is not executable")
    return path


class Vigie:
    """One `vigie run` process watching `server_port` (None: no `--server-port`, e.g. an
    agent given only `--tls-target`/`--tls-discover-port` in `extra_args`)."""

    def __init__(self, workdir: Path, server_port: int | None, *, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server_port = server_port
        self.state_dir = self.workdir / "state"
        self.key_file = self.state_dir / "key"
        self.metrics_port = free_port()
        self.metrics_addr = f"{LOOPBACK}:{self.metrics_port}"
        self.metrics_url = f"http://{self.metrics_addr}/metrics"
        self.stdout_path = self.workdir / "vigie.stdout"
        self.stderr_path = self.workdir / "vigie.stderr"
        self.extra_args = list(extra_args or [])
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.bin: Path | None = None

    @property
    def command(self) -> list[str]:
        return [
            str(self.bin or vigie_bin()), "run",
            *(["--server-port", str(self.server_port)] if self.server_port is not None else []),
            "--metrics-addr", self.metrics_addr,
            "--key-file", str(self.key_file),
            *self.extra_args,
        ]

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        self.bin = check_binary()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        if self.env:
            env.update(self.env)
        self._stdout = open(self.stdout_path, "wb")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            self.command, cwd=self.workdir, stdout=self._stdout, stderr=self._stderr,
            stdin=subprocess.DEVNULL, env=env,
        )
        deadline = time.monotonic() + timeout
        last = "no scrape yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"vigie exited with code {self.proc.returncode} before becoming ready "
                    f"(command: {' '.join(self.command)})\n{self.logs(tail_lines=80)}"
                )
            try:
                text = self.scrape_text(timeout=2)
                m = metrics_mod.parse(text)
                attached = m.total(READY_METRIC)
                if attached > 0:
                    return
                last = f"/metrics answered 200 but {READY_METRIC} = {attached} " + (
                    "(metric absent)" if READY_METRIC not in m.names() else ""
                )
            except (OSError, urllib.error.URLError, ValueError) as e:
                last = f"/metrics not ready: {e!r}"
            time.sleep(0.2)
        self.stop()
        raise HarnessError(
            f"vigie did not become ready within {timeout:.0f} s: {last}\n"
            f"(command: {' '.join(self.command)})\n{self.logs(tail_lines=80)}"
        )

    def stop(self, grace: float = 10.0) -> int | None:
        code = stop_process(self.proc, grace=grace)
        for f in (getattr(self, "_stdout", None), getattr(self, "_stderr", None)):
            if f is not None and not f.closed:
                f.close()
        return code

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_running(self) -> None:
        if not self.running:
            code = None if self.proc is None else self.proc.returncode
            raise HarnessError(f"vigie is not running (exit code {code})\n{self.logs(tail_lines=80)}")

    def logs(self, tail_lines: int | None = None) -> str:
        """The agent's stdout and stderr (the last `tail_lines` lines of each if given)."""
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            if tail_lines:
                body = tail(path, tail_lines)
            else:
                try:
                    body = path.read_text(errors="replace")
                except FileNotFoundError:
                    body = f"<{path} does not exist>"
            parts.append(f"--- vigie {label} ({path}) ---\n{body}")
        return "\n".join(parts)

    # -- metrics --------------------------------------------------------------------------
    def scrape_text(self, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as r:
            if r.status != 200:
                raise OSError(f"/metrics answered {r.status}")
            return r.read().decode("utf-8")

    def scrape(self) -> metrics_mod.Metrics:
        """Parsed metrics: `{(name, frozenset(labels.items())): value}` with helpers."""
        return metrics_mod.parse(self.scrape_text())

    # -- token labels ---------------------------------------------------------------------
    def labels(self, tokens: list[str]) -> dict[str, str]:
        """Labels vigie gives these tokens, via `vigie token-hash` (tokens on stdin only)."""
        tokens = list(tokens)
        if not tokens:
            return {}
        for t in tokens:
            if "\n" in t or "\r" in t or not t:
                raise HarnessError("a token cannot be empty or contain a line break")
        if not self.key_file.exists():
            raise HarnessError(f"vigie's key file {self.key_file} does not exist\n{self.logs(tail_lines=40)}")
        cmd = [str(self.bin or check_binary()), "token-hash", "--key-file", str(self.key_file)]
        r = subprocess.run(
            cmd, input="".join(t + "\n" for t in tokens).encode(), capture_output=True, timeout=30
        )
        if r.returncode != 0:
            raise HarnessError(
                f"`vigie token-hash` exited {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}"
            )
        out = r.stdout.decode(errors="replace").splitlines()
        if len(out) != len(tokens):
            raise HarnessError(f"`vigie token-hash` printed {len(out)} lines for {len(tokens)} tokens")
        bad = [line for line in out if not LABEL_RE.match(line.strip())]
        if bad:
            # Lengths only: a broken agent could echo the token back.
            raise HarnessError(
                f"`vigie token-hash` printed {len(bad)} lines that are not 16 lowercase hex chars "
                f"(their lengths: {[len(b) for b in bad[:5]]})"
            )
        return {t: line.strip() for t, line in zip(tokens, out)}

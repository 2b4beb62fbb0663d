"""TLS helpers for the tests: a self-signed certificate, which files a process maps, and the
multi-user scenario driven over HTTPS (through a TLS front such as nginx, or Synapse's own
TLS listener).

The counting itself is in matrix.py (`CountingSSLSocket`, `counting_tls_context()`): over TLS
the client counts the *plaintext* bytes it receives after decryption, which are exactly the
bytes the server's TLS library was asked to write.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .matrix import MatrixClient, counting_tls_context
from .scenario import Scenario
from .util import LOOPBACK, HarnessError

SYSTEM_LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")


def make_self_signed_cert(directory: Path, common_name: str = "test.local") -> tuple[Path, Path]:
    """(certificate, key) PEM files for 127.0.0.1 / localhost / test.local, made by openssl."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    cmd = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={common_name}",
        "-addext", f"subjectAltName=IP:{LOOPBACK},DNS:localhost,DNS:{common_name}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or not cert.exists() or not key.exists():
        raise HarnessError(f"openssl could not make a certificate ({r.returncode}):\n{r.stderr}")
    key.chmod(0o600)
    return cert, key


def mapped_files(pid: int) -> set[str]:
    """Paths of the files a process has mapped (from /proc/PID/maps)."""
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            cols = line.split(maxsplit=5)
            if len(cols) == 6 and cols[5].startswith("/"):
                out.add(cols[5].strip())
    return out


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (every thread's children)."""
    out = []
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir():
        try:
            out.extend(int(x) for x in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return out


def same_file(a: str | Path, b: str | Path) -> bool:
    try:
        sa, sb = Path(a).stat(), Path(b).stat()
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def maps_file(pid: int, path: str | Path) -> bool:
    """Whether the process maps this very file (same inode, whatever the path spelling)."""
    return any(same_file(p, path) for p in mapped_files(pid) if Path(p).name == Path(path).name)


class TLSScenario(Scenario):
    """`Scenario` whose clients speak HTTPS to `host:port` (a TLS front, or Synapse's own TLS
    listener). Accounts, rooms and tokens are still made through `synapse` directly."""

    def __init__(self, synapse, config=None, recorder=None, log=print, *, host: str = LOOPBACK,
                 port: int, cafile: str | Path | None = None):
        super().__init__(synapse, config, recorder=recorder, log=log)
        self.front_host = host
        self.front_port = port
        self.tls_context = counting_tls_context(cafile)

    def _client(self, token: str, user_id: str, index: int, role: str) -> MatrixClient:
        style = ("raw", "encoded", "alternate")[index % 3]
        return MatrixClient(
            self.front_host, self.front_port, token,
            user_id=user_id,
            token_in_query=(index == self.cfg.query_token_session),
            recorder=self.recorder,
            room_id_style=style,
            name=f"s{index:02d}-{role}",
            user_agent=f"vigie-tests/1 (session {index}; {role}; tls)",
            tls=self.tls_context,
        )

    def tls_stats(self) -> dict[str, int]:
        """Plaintext bytes received over all of the scenario's TLS connections."""
        rx = sum(c.conn.rx_total for s in self.sessions for c in (s.sync, s.act))
        return {"plaintext_rx": rx}

"""A throw-away Synapse homeserver for tests: SQLite, plain HTTP on 127.0.0.1 (or HTTPS with
`tls=(cert, key)`: Synapse's own TLS listener), no federation, no rate limits."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import secrets
import ssl
import subprocess
import time
from pathlib import Path

import yaml

from .util import LOOPBACK, HarnessError, free_port, stop_process, tail, venv_python

SERVER_NAME = "test.local"

# Every rate limiter Synapse 1.163 reads, lifted. Values are per-second rates and bursts.
_UNLIMITED = {"per_second": 100000, "burst_count": 1000000}
RATE_LIMITS = {
    "rc_message": _UNLIMITED,
    "rc_registration": _UNLIMITED,
    "rc_registration_token_validity": _UNLIMITED,
    "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
    "rc_admin_redaction": _UNLIMITED,
    "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
    "rc_joins_per_room": _UNLIMITED,
    "rc_3pid_validation": _UNLIMITED,
    "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
    "rc_third_party_invite": _UNLIMITED,
    "rc_key_requests": _UNLIMITED,
    "rc_media_create": _UNLIMITED,
    "rc_room_creation": _UNLIMITED,
    "rc_reports": _UNLIMITED,
    "rc_delayed_event_mgmt": _UNLIMITED,
    "rc_user_directory": _UNLIMITED,
    "rc_profile": _UNLIMITED,
    "rc_presence": {"per_user": _UNLIMITED},
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 100000,
        "sleep_delay": 1,
        "reject_limit": 100000,
        "concurrent": 100000,
    },
}


def _log_config(log_file: Path) -> dict:
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(log_file),
                "encoding": "utf8",
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


class Synapse:
    """One Synapse process in `workdir`. Use `start()`/`stop()`, or the `synapse` fixture."""

    def __init__(self, workdir: Path, *, server_name: str = SERVER_NAME, python: str | None = None,
                 presence: bool = False, extra_config: dict | None = None,
                 tls: tuple[Path, Path] | None = None):
        """tls: (certificate, private key) PEM files: the client listener speaks HTTPS
        (`tls: true`), and the harness's own setup calls (register, login) go over TLS too."""
        self.workdir = Path(workdir)
        self.tls = (Path(tls[0]), Path(tls[1])) if tls else None
        self.server_name = server_name
        self.python = python or venv_python()
        self.port = free_port()
        self.host = LOOPBACK
        self.scheme = "https" if self.tls else "http"
        self.base_url = f"{self.scheme}://{LOOPBACK}:{self.port}"
        self.config_path = self.workdir / "homeserver.yaml"
        self.log_file = self.workdir / "homeserver.log"
        self.stdout_path = self.workdir / "synapse.stdout"
        self.stderr_path = self.workdir / "synapse.stderr"
        self.shared_secret = secrets.token_hex(24)
        self.proc: subprocess.Popen | None = None
        self.passwords: dict[str, str] = {}
        # Presence off by default: on one SQLite Synapse it triples the cost of every join and
        # message, and adds nothing to what the tests measure.
        self.presence = presence
        self.extra_config = dict(extra_config or {})

    # -- config -----------------------------------------------------------------------
    def generate_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.python, "-m", "synapse.app.homeserver",
            "--server-name", self.server_name,
            "--config-path", str(self.config_path),
            "--data-directory", str(self.workdir),
            "--generate-config",
            "--report-stats=no",
        ]
        r = subprocess.run(cmd, cwd=self.workdir, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise HarnessError(
                f"synapse --generate-config failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
            )
        with open(self.config_path) as f:
            cfg = yaml.safe_load(f)

        log_config_path = self.workdir / "log.config.yaml"
        with open(log_config_path, "w") as f:
            yaml.safe_dump(_log_config(self.log_file), f)

        cfg.update(
            {
                "listeners": [
                    {
                        "port": self.port,
                        "bind_addresses": [LOOPBACK],
                        "type": "http",
                        "tls": self.tls is not None,
                        "x_forwarded": False,
                        "resources": [{"names": ["client"], "compress": False}],
                    }
                ],
                "database": {
                    "name": "sqlite3",
                    "args": {"database": str(self.workdir / "homeserver.db")},
                },
                "log_config": str(log_config_path),
                "pid_file": str(self.workdir / "homeserver.pid"),
                "media_store_path": str(self.workdir / "media_store"),
                "registration_shared_secret": self.shared_secret,
                "enable_registration": False,
                "enable_metrics": False,
                "report_stats": False,
                "suppress_key_server_warning": True,
                "trusted_key_servers": [],
                # No federation listener; refuse outbound federation too.
                "federation_domain_whitelist": [],
                "url_preview_enabled": False,
                # Registration with a password hashes it: keep that cheap.
                "bcrypt_rounds": 4,
                "presence": {"enabled": self.presence},
                **RATE_LIMITS,
            }
        )
        if self.tls is not None:
            cfg["tls_certificate_path"] = str(self.tls[0])
            cfg["tls_private_key_path"] = str(self.tls[1])
        cfg.update(self.extra_config)
        with open(self.config_path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)

    # -- lifecycle --------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        if not self.config_path.exists():
            self.generate_config()
        cmd = [self.python, "-m", "synapse.app.homeserver", "--config-path", str(self.config_path)]
        self._stdout = open(self.stdout_path, "wb")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, stdout=self._stdout, stderr=self._stderr, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"Synapse exited with code {self.proc.returncode} during startup\n" + self.log_tail()
                )
            try:
                status, body = self._raw("GET", "/_matrix/client/versions", timeout=2)
                if status == 200 and b"versions" in body:
                    return
                last_error = f"HTTP {status}"
            except OSError as e:
                last_error = repr(e)
            time.sleep(0.1)
        self.stop()
        raise HarnessError(
            f"Synapse did not answer /_matrix/client/versions within {timeout:.0f} s "
            f"(last: {last_error})\n" + self.log_tail()
        )

    def stop(self) -> int | None:
        code = stop_process(self.proc, grace=10.0)
        for f in (getattr(self, "_stdout", None), getattr(self, "_stderr", None)):
            if f is not None and not f.closed:
                f.close()
        return code

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return (
            f"--- Synapse stderr ({self.stderr_path}) ---\n{tail(self.stderr_path, 30)}\n"
            f"--- Synapse log ({self.log_file}) ---\n{tail(self.log_file, lines)}"
        )

    # -- plain HTTP (not counted; for setup) ----------------------------------------------
    def _raw(self, method: str, path: str, body: dict | None = None, timeout: float = 30,
             headers: dict | None = None) -> tuple[int, bytes]:
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.load_verify_locations(cafile=str(self.tls[0]))
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        status, data = self._raw(method, path, body)
        if status != 200:
            raise HarnessError(f"{method} {path} -> {status}: {data[:500]!r}")
        return json.loads(data)

    def register(self, username: str, password: str | None = None, admin: bool = False) -> tuple[str, str, str]:
        """Register through the shared-secret admin API. Returns (user_id, access_token, device_id)."""
        password = password or f"pw-{username}-{secrets.token_hex(4)}"
        nonce = self._json("GET", "/_synapse/admin/v1/register")["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(nonce.encode())
        mac.update(b"\x00")
        mac.update(username.encode())
        mac.update(b"\x00")
        mac.update(password.encode())
        mac.update(b"\x00")
        mac.update(b"admin" if admin else b"notadmin")
        body = {
            "nonce": nonce,
            "username": username,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        r = self._json("POST", "/_synapse/admin/v1/register", body)
        self.passwords[username] = password
        return r["user_id"], r["access_token"], r["device_id"]

    def login(self, username: str, password: str | None = None) -> tuple[str, str, str]:
        """Password login (a new device and token). Returns (user_id, access_token, device_id)."""
        password = password if password is not None else self.passwords[username]
        body = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": password,
        }
        r = self._json("POST", "/_matrix/client/v3/login", body)
        return r["user_id"], r["access_token"], r["device_id"]

    def access_log(self) -> list[dict]:
        """Synapse's 'Processed request' lines: requester, sent body bytes, status, method, uri."""
        import re

        pat = re.compile(
            r" - \{(?P<requester>[^}]*)\} Processed request: .*? (?P<sent>\d+)B (?P<code>\S+) "
            r'"(?P<method>\S+) (?P<uri>\S+) (?P<proto>[^"]+)"'
        )
        out = []
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            m = pat.search(line)
            if m:
                d = m.groupdict()
                d["sent"] = int(d["sent"])
                out.append(d)
        return out

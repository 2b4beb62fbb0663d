"""Synapse in worker mode for the fleet tests: PostgreSQL 15 and Redis 7 started in temp dirs
as their own users, the main process, generic workers, a media worker, and nginx routing
between them as Synapse's docs/workers.md does.

- `/rooms/{id}/messages`: per room (nginx `hash` on the room id), so one room's history is
  always served by the same worker;
- `/context`, `/event`, `/members`, `/state`, `/search`, `/keys/query`: round-robin over the
  generic workers;
- `/sync`: sticky per access token (hashed in nginx, never logged);
- media (`/_matrix/media/`, `/_matrix/client/v1/media/`): the media worker;
- everything else (login, sends, joins, room creation, filters): the main process.

nginx listens in plain HTTP (the agents watch the Synapse processes' own ports, as one agent
per host would) and logs, per request, the client's X-Forwarded-For, the upstream that
served it and the bytes that upstream sent: an account of what each Synapse process sent,
independent of the agents. No access token is ever written to a file here.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from .nginx import Nginx
from .synapse import Synapse, _log_config
from .util import LOOPBACK, HarnessError, free_port, stop_process, tail

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _owned_tempdir(user: str, prefix: str) -> Path:
    """A temp dir the service user owns (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    pw = pwd.getpwnam(user)
    os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


class Postgres:
    """A PostgreSQL 15 cluster of its own, run by user postgres, trust auth on 127.0.0.1."""

    def __init__(self):
        if not (PG_BIN / "initdb").exists():
            raise HarnessError(f"{PG_BIN}/initdb not found: install the Debian package postgresql (cargo xtask setup)")
        self.dir = _owned_tempdir("postgres", "vigie-pg-")
        self.data = self.dir / "data"
        self.port = free_port()
        self.database = "synapse"
        self.url = f"postgresql://postgres@{LOOPBACK}:{self.port}/{self.database}"
        self.log = self.dir / "postgres.log"

    def _run(self, *cmd: str) -> None:
        r = subprocess.run(list(cmd), user="postgres", cwd=self.dir, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise HarnessError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{tail(self.log)}")

    def start(self) -> None:
        # Synapse wants UTF8 and the C collation.
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C")
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses={LOOPBACK} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "start")
        self._run(str(PG_BIN / "createdb"), "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "-T", "template0", self.database)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                           user="postgres", capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    """redis-server on 127.0.0.1, no persistence, run by user redis."""

    def __init__(self):
        binary = shutil.which("redis-server")
        if binary is None:
            raise HarnessError("redis-server not found: install the Debian package redis-server (cargo xtask setup)")
        self.binary = binary
        self.dir = _owned_tempdir("redis", "vigie-redis-")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            user="redis", cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"redis-server exited ({self.proc.returncode}): {tail(self.dir / 'redis.log')}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise HarnessError(f"redis-server did not answer PING in {timeout} s")

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Worker:
    name: str
    kind: str  # "generic" or "media"
    port: int
    config_path: Path
    log_file: Path
    proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class SynapseWorkers:
    """The main process (`main`, a `Synapse` of the harness on PostgreSQL and Redis) and its
    workers, all sharing main's homeserver.yaml."""

    def __init__(self, workdir: Path, pg: Postgres, redis: Redis, *, generic: int = 3):
        self.workdir = Path(workdir)
        self.replication_port = free_port()
        self.main = Synapse(self.workdir / "main")
        self.main.extra_config = {
            "listeners": [
                {"port": self.main.port, "bind_addresses": [LOOPBACK], "type": "http", "tls": False,
                 "x_forwarded": False, "resources": [{"names": ["client"], "compress": False}]},
                {"port": self.replication_port, "bind_addresses": [LOOPBACK], "type": "http",
                 "resources": [{"names": ["replication"]}]},
            ],
            "database": {"name": "psycopg2", "args": {
                "user": "postgres", "host": LOOPBACK, "port": pg.port, "database": pg.database,
                "cp_min": 1, "cp_max": 5}},
            "redis": {"enabled": True, "host": LOOPBACK, "port": redis.port},
            "instance_map": {"main": {"host": LOOPBACK, "port": self.replication_port}},
            # The media worker serves media; the main process must not.
            "enable_media_repo": False,
            "media_instance_running_background_jobs": "media1",
        }
        self.workers = [self._worker(f"generic{i + 1}", "generic") for i in range(generic)]
        self.workers.append(self._worker("media1", "media"))

    @property
    def generic(self) -> list[Worker]:
        return [w for w in self.workers if w.kind == "generic"]

    @property
    def media(self) -> Worker:
        return next(w for w in self.workers if w.kind == "media")

    def _worker(self, name: str, kind: str) -> Worker:
        d = self.workdir / name
        return Worker(name, kind, free_port(), d / "worker.yaml", d / "worker.log")

    def _write_worker(self, w: Worker) -> None:
        w.config_path.parent.mkdir(parents=True, exist_ok=True)
        log_config = w.config_path.parent / "log.config.yaml"
        log_config.write_text(yaml.safe_dump(_log_config(w.log_file)))
        cfg = {
            "worker_app": "synapse.app.generic_worker",
            "worker_name": w.name,
            "worker_listeners": [{
                "type": "http", "port": w.port, "bind_addresses": [LOOPBACK], "x_forwarded": False,
                "resources": [{"names": ["client" if w.kind == "generic" else "media"], "compress": False}],
            }],
            "worker_log_config": str(log_config),
        }
        if w.kind == "media":
            cfg["enable_media_repo"] = True
        w.config_path.write_text(yaml.safe_dump(cfg))

    def start(self, timeout: float = 180.0) -> None:
        # The main process first: it creates the schema the workers read.
        self.main.start(timeout=timeout)
        for w in self.workers:
            self._write_worker(w)
            out = open(w.config_path.parent / "stderr", "wb")
            w.proc = subprocess.Popen(
                [self.main.python, "-m", "synapse.app.generic_worker", "--config-path", str(self.main.config_path),
                 "--config-path", str(w.config_path)],
                cwd=w.config_path.parent, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            while True:
                if w.proc.poll() is not None:
                    raise HarnessError(f"worker {w.name} exited ({w.proc.returncode}):\n"
                                       f"{tail(w.config_path.parent / 'stderr')}\n{tail(w.log_file)}")
                try:
                    with urllib.request.urlopen(f"http://{LOOPBACK}:{w.port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise HarnessError(f"worker {w.name} not healthy in {timeout} s\n{tail(w.log_file)}")
                time.sleep(0.2)

    def stop(self) -> None:
        for w in self.workers:
            stop_process(w.proc)
        self.main.stop()


_FLEET_CONF = """\
user root;
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    # Per request: who (the client's X-Forwarded-For), which Synapse process, what it sent.
    log_format fleet '$http_x_forwarded_for|$upstream_addr|$upstream_bytes_received|$status|$request_method|$uri';
    access_log {workdir}/access.log fleet;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    client_max_body_size 50m;

    map $uri $room_key {{
        "~^/_matrix/client/[^/]+/rooms/(?<room>[^/]+)/messages$" $room;
        default "";
    }}
    upstream main {{ server {main}; keepalive 32; }}
    upstream history {{ hash $room_key; {generic} keepalive 32; }}
    upstream readers {{ {generic} keepalive 32; }}
    upstream syncers {{ hash $http_authorization; {generic} keepalive 32; }}
    upstream media {{ server {media}; keepalive 32; }}

    server {{
        listen {host}:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_buffering off;
        proxy_read_timeout 120s;
        proxy_next_upstream off;

        location ~ ^/_matrix/client/[^/]+/rooms/[^/]+/messages$ {{ proxy_pass http://history; }}
        location ~ ^/_matrix/client/[^/]+/rooms/[^/]+/(context/|event/|members$|joined_members$|state$) {{
            proxy_pass http://readers;
        }}
        location ~ ^/_matrix/client/[^/]+/(search|keys/query)$ {{ proxy_pass http://readers; }}
        location ~ ^/_matrix/client/[^/]+/sync$ {{ proxy_pass http://syncers; }}
        location ~ ^/_matrix/(media/|client/v1/media/) {{ proxy_pass http://media; }}
        location / {{ proxy_pass http://main; }}
    }}
}}
"""


class FleetNginx(Nginx):
    """nginx in plain HTTP in front of `SynapseWorkers`, routing as docs/workers.md does."""

    def __init__(self, workdir: Path, synapse: SynapseWorkers):
        super().__init__(workdir, Path("/nonexistent"), Path("/nonexistent"), synapse.main.port)
        self.synapse = synapse
        self.access_log = self.workdir / "access.log"

    def write_config(self) -> None:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        s = self.synapse
        generic = " ".join(f"server {LOOPBACK}:{w.port};" for w in s.generic)
        self.conf_path.write_text(_FLEET_CONF.format(
            workdir=self.workdir, host=self.host, port=self.port, main=f"{LOOPBACK}:{s.main.port}",
            generic=generic, media=f"{LOOPBACK}:{s.media.port}"))
        r = subprocess.run([shutil.which("nginx") or "/usr/sbin/nginx", "-t", "-p", str(self.workdir), "-e",
                            str(self.error_log), "-c", str(self.conf_path)], capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            raise HarnessError(f"nginx -t refused the fleet config:\n{r.stderr}")

    def _handshake(self) -> None:
        with socket.create_connection((self.host, self.port), timeout=2):
            pass

    def history_worker(self, room_id: str) -> Worker:
        """The worker nginx's `hash $room_key` (crc32, as Cache::Memcached) sends a room's
        `/messages` to: `((crc32(key) >> 16) & 0x7fff) % peers` on the first try."""
        generic = self.synapse.generic
        return generic[((zlib.crc32(room_id.encode()) >> 16) & 0x7FFF) % len(generic)]

    def log_lines(self) -> list[dict]:
        out = []
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            parts = line.split("|")
            if len(parts) != 6:
                continue
            xff, upstream, sent, status, method, uri = parts
            total = sum(int(x) for x in sent.replace(":", ",").split(",") if x.strip().isdigit())
            out.append({"xff": xff, "upstream": upstream, "sent": total, "status": status, "method": method,
                        "uri": uri})
        return out


class Front:
    """The homeserver as clients see it: nginx's address, the main process for everything
    the harness does out of band (registration, logins through the shared secret)."""

    def __init__(self, main: Synapse, nginx: FleetNginx):
        self._main = main
        self.host = nginx.host
        self.port = nginx.port

    def __getattr__(self, name):
        return getattr(self._main, name)

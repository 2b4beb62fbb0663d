"""nginx (Debian's package) terminating TLS in front of a plaintext upstream, all in a temp dir.

One master and one worker, `daemon off` so the master is our child; pid file, error and
access logs, and every temp path live in `workdir`. Stopped with SIGTERM (then SIGKILL).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from .tls import child_pids
from .util import LOOPBACK, HarnessError, free_port, stop_process, tail

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# `user root`: the worker must write request bodies under the test's temp dir, which only
# root can enter (pytest makes it 0700).
_CONF = """\
user root;
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;

events {{
    worker_connections 1024;
}}

http {{
    # No $request, $request_uri or $args: a query string may carry ?access_token=, and raw
    # tokens never reach a file, test artifacts included. $uri is the path alone.
    log_format notoken '$remote_addr [$time_local] "$request_method $uri $server_protocol" '
                       '$status $body_bytes_sent "$http_user_agent"';
    access_log {workdir}/access.log notoken;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    keepalive_timeout 75s;
    keepalive_requests 100000;

    server {{
        listen {host}:{port} ssl{http2};
        server_name test.local localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 50m;

        location / {{
            proxy_pass http://{upstream_host}:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_buffering off;
            proxy_request_buffering on;
            proxy_read_timeout 120s;
            proxy_send_timeout 120s;
        }}
    }}
}}
"""


class Nginx:
    """nginx listening with TLS on `port` (free by default) and proxying to `upstream_port`."""

    def __init__(self, workdir: Path, cert: Path, key: Path, upstream_port: int, *,
                 port: int | None = None, http2: bool = False, upstream_host: str = LOOPBACK):
        self.workdir = Path(workdir)
        self.cert, self.key = Path(cert), Path(key)
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.host = LOOPBACK
        self.port = port or free_port()
        self.http2 = http2
        self.conf_path = self.workdir / "nginx.conf"
        self.error_log = self.workdir / "error.log"
        self.stdout_path = self.workdir / "nginx.stdout"
        self.stderr_path = self.workdir / "nginx.stderr"
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(_CONF.format(
            workdir=self.workdir, host=self.host, port=self.port, http2=" http2" if self.http2 else "",
            cert=self.cert, key=self.key, upstream_host=self.upstream_host, upstream_port=self.upstream_port,
        ))
        cmd = [NGINX, "-t", "-p", str(self.workdir), "-e", str(self.error_log), "-c", str(self.conf_path)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise HarnessError(f"nginx -t refused the config ({r.returncode}):\n{r.stderr}\n{self.conf_path.read_text()}")

    def start(self, timeout: float = 15.0) -> None:
        self.write_config()
        self._stdout = open(self.stdout_path, "wb")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.workdir), "-e", str(self.error_log), "-c", str(self.conf_path)],
            cwd=self.workdir, stdout=self._stdout, stderr=self._stderr, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"nginx exited with code {self.proc.returncode} during startup\n{self.log_tail()}")
            if self.worker_pids():
                try:
                    self._handshake()
                    return
                except OSError as e:
                    last = repr(e)
            time.sleep(0.1)
        self.stop()
        raise HarnessError(f"nginx did not accept TLS on {self.host}:{self.port} within {timeout:.0f} s "
                           f"(last: {last})\n{self.log_tail()}")

    def _handshake(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=str(self.cert))
        with socket.create_connection((self.host, self.port), timeout=2) as raw:
            with ctx.wrap_socket(raw, server_hostname=self.host):
                pass

    @property
    def master_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def worker_pids(self) -> list[int]:
        pid = self.master_pid
        if pid is None:
            return []
        try:
            return child_pids(pid)
        except FileNotFoundError:
            return []

    def stop(self) -> int | None:
        code = stop_process(self.proc, grace=10.0)
        for f in (getattr(self, "_stdout", None), getattr(self, "_stderr", None)):
            if f is not None and not f.closed:
                f.close()
        return code

    def log_tail(self, lines: int = 40) -> str:
        return (f"--- nginx stderr ({self.stderr_path}) ---\n{tail(self.stderr_path, 20)}\n"
                f"--- nginx error log ({self.error_log}) ---\n{tail(self.error_log, lines)}")

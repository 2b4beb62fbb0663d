"""The metrics endpoint's protections, against the real agent (real BPF load: nothing skips).

- TLS and basic auth from an exporter-toolkit `web.yml` (`--web.config.file`): a real
  Prometheus scrapes vigie over https with basic auth; wrong or missing credentials get 401
  with `WWW-Authenticate: Basic`; plain HTTP on the TLS port gets no metrics; successful
  bcrypt checks are cached.
- `RequireAndVerifyClientCert`: no client certificate, or one from another CA, is refused;
  one signed by `client_ca_file` is served.
- `metrics_addr = unix:/path`: a stale socket is replaced, the socket has mode 0660, serves
  /metrics, and is gone after SIGTERM.
- A broken web config refuses the start, naming the problem; on SIGHUP it is refused and the
  agent keeps the config it had, while a good one takes effect at once.

Certificates are made with the openssl CLI; bcrypt hashes with the `bcrypt` module.
"""

from __future__ import annotations

import base64
import http.client
import os
import secrets
import signal
import socket
import ssl
import stat
import subprocess
import time
from pathlib import Path

import bcrypt
import pytest

from harness import metrics as metrics_mod
from harness.prometheus import Prometheus
from harness.util import LOOPBACK, HarnessError, free_port, wait_until
from harness.vigie import Vigie, check_binary

USER = "prometheus"


# -- certificates ---------------------------------------------------------------------------
def openssl(cwd: Path, *args: str) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)} failed: {r.stderr}"


def make_ca(d: Path, name: str) -> None:
    openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}")


def make_client_cert(d: Path, name: str, ca: str) -> None:
    (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    openssl(d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """server.crt (self-signed, for 127.0.0.1), ca.crt and client.crt signed by it, and
    rogue.crt signed by another CA."""
    d = tmp_path_factory.mktemp("pki")
    openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "server.key", "-out", "server.crt", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1")
    make_ca(d, "ca")
    make_client_cert(d, "client", "ca")
    make_ca(d, "otherca")
    make_client_cert(d, "rogue", "otherca")
    return d


# -- clients --------------------------------------------------------------------------------
class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 5.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def tls_context(pki: Path, client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "server.crt"))
    if client:
        ctx.load_cert_chain(str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
    return ctx


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class WebVigie(Vigie):
    """The agent with a web config and/or a Unix socket; scrapes the way a client would then."""

    def __init__(self, workdir: Path, *, web_config: Path | None = None, unix_socket: Path | None = None,
                 ctx: ssl.SSLContext | None = None, headers: dict[str, str] | None = None):
        # Nothing listens on this port: the agent loads and attaches all the same.
        extra = ["--web.config.file", str(web_config)] if web_config else []
        super().__init__(workdir, free_port(), extra_args=extra)
        self.unix_socket = unix_socket
        if unix_socket:
            self.metrics_addr = f"unix:{unix_socket}"
        self.ctx = ctx
        self.headers = headers or {}

    def connection(self, ctx: ssl.SSLContext | None = None, timeout: float = 20.0) -> http.client.HTTPConnection:
        if self.unix_socket:
            return UnixHTTPConnection(str(self.unix_socket), timeout=timeout)
        ctx = ctx or self.ctx
        if ctx:
            return http.client.HTTPSConnection(LOOPBACK, self.metrics_port, context=ctx, timeout=timeout)
        return http.client.HTTPConnection(LOOPBACK, self.metrics_port, timeout=timeout)

    def get(self, path: str = "/metrics", *, headers: dict[str, str] | None = None,
            ctx: ssl.SSLContext | None = None) -> tuple[int, http.client.HTTPMessage, str]:
        conn = self.connection(ctx)
        try:
            conn.request("GET", path, headers=self.headers if headers is None else headers)
            r = conn.getresponse()
            return r.status, r.headers, r.read().decode("utf-8", errors="replace")
        except http.client.HTTPException as e:  # Vigie.start() retries on OSError
            raise OSError(f"bad HTTP answer: {e!r}") from e
        finally:
            conn.close()

    def scrape_text(self, timeout: float = 5.0) -> str:
        status, _, body = self.get()
        if status != 200:
            raise OSError(f"/metrics answered {status}")
        return body


@pytest.fixture
def start_agent(tmp_path_factory):
    started: list[WebVigie] = []

    def start(**kwargs) -> WebVigie:
        agent = WebVigie(tmp_path_factory.mktemp("vigie"), **kwargs)
        started.append(agent)
        try:
            agent.start(timeout=30)
        except HarnessError as e:
            agent.stop()
            pytest.fail(f"vigie failed to start (a BPF load failure fails, never skips): {e}", pytrace=False)
        return agent

    yield start
    for agent in started:
        print(f"vigie stopped (exit code {agent.stop()}); files in {agent.workdir}")


def write_web_config(path: Path, pki: Path, *, users: dict[str, str] | None = None,
                     client_auth: bool = False, cost: int = 10) -> Path:
    lines = ["tls_server_config:", f"  cert_file: {pki / 'server.crt'}", f"  key_file: {pki / 'server.key'}"]
    if client_auth:
        lines += ["  client_auth_type: RequireAndVerifyClientCert", f"  client_ca_file: {pki / 'ca.crt'}"]
    if users:
        lines.append("basic_auth_users:")
        for user, password in users.items():
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
            lines.append(f"  {user}: '{hashed}'")
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_no_metrics(agent: WebVigie, **kwargs) -> str:
    """The request must not be answered with metrics: either no HTTP answer at all (TLS
    refused) or an error status. Returns what happened."""
    try:
        status, _, body = agent.get(**kwargs)
    except (OSError, ssl.SSLError) as e:
        return f"refused: {e!r}"
    assert status != 200 and "vigie_" not in body, f"answered {status} with metrics"
    return f"status {status}"


# -- TLS and basic auth ---------------------------------------------------------------------
def test_prometheus_scrapes_over_tls_with_basic_auth(pki, tmp_path, start_agent):
    password = secrets.token_urlsafe(18)
    web = write_web_config(tmp_path / "web.yml", pki, users={USER: password})
    agent = start_agent(web_config=web, ctx=tls_context(pki), headers=basic(USER, password))
    (tmp_path / "password").write_text(password)
    prom = Prometheus(tmp_path / "prometheus", agent.metrics_addr, scrape_options={
        "scheme": "https",
        "tls_config": {"ca_file": str(pki / "server.crt")},
        "basic_auth": {"username": USER, "password_file": str(tmp_path / "password")},
    })
    try:
        def scraped():
            up = prom.query('up{job="vigie"}')
            attached = prom.query('vigie_probes_attached{job="vigie"}')
            return (up, attached) if up and float(up[0]["value"][1]) == 1 and attached else None

        got = wait_until(scraped, timeout=30, interval=0.5)
        assert got, (f"Prometheus never scraped vigie over https: up={prom.query('up')} "
                     f"targets log: {prom.log.read_text()[-2000:]}")
        up, attached = got
        assert float(attached[0]["value"][1]) > 0, attached
        assert prom.query('vigie_build_info{job="vigie"}'), "vigie_build_info missing in Prometheus"
    finally:
        prom.stop()
    agent.assert_running()
    logs = agent.logs()
    assert password not in logs, "the password reached the agent's logs"
    assert "clear text" not in logs, "TLS is on: no clear-text warning expected"


def test_wrong_or_missing_credentials_get_401_and_successes_are_cached(pki, tmp_path, start_agent):
    password = secrets.token_urlsafe(18)
    cost = 11  # a tenth of a second per bcrypt check or more: cached or not is plain to see
    web = write_web_config(tmp_path / "web.yml", pki, users={USER: password, "other": "x" + password}, cost=cost)
    agent = start_agent(web_config=web, ctx=tls_context(pki), headers=basic(USER, password))

    for headers, what in [({}, "no credentials"), (basic(USER, password + "x"), "wrong password"),
                          (basic("nobody", password), "unknown user"), (basic("other", password), "another user's password"),
                          ({"Authorization": "Bearer " + password}, "not basic"),
                          ({"Authorization": "Basic !!!"}, "not base64")]:
        status, h, body = agent.get(headers=headers)
        assert status == 401, f"{what}: {status}"
        assert (h.get("WWW-Authenticate") or "").startswith("Basic"), f"{what}: {h.items()}"
        assert "vigie_" not in body
    status, _, body = agent.get("/", headers={})
    assert status == 401, "every path needs credentials"

    status, _, body = agent.get()
    assert status == 200
    assert metrics_mod.parse(body).total("vigie_probes_attached") > 0

    # bcrypt at this cost, measured here; cached checks must not pay it per scrape.
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost))
    t0 = time.monotonic()
    assert bcrypt.checkpw(password.encode(), hashed)
    one_bcrypt = time.monotonic() - t0
    t0 = time.monotonic()
    for _ in range(10):
        assert agent.get()[0] == 200
    ten_scrapes = time.monotonic() - t0
    print(f"one bcrypt (cost {cost}): {one_bcrypt:.3f} s; ten authenticated scrapes: {ten_scrapes:.3f} s")
    assert ten_scrapes < 5 * one_bcrypt, "successful checks are not cached"
    assert password not in agent.logs()


def test_plain_http_on_the_tls_port_gets_no_metrics(pki, tmp_path, start_agent):
    password = secrets.token_urlsafe(18)
    web = write_web_config(tmp_path / "web.yml", pki, users={USER: password})
    agent = start_agent(web_config=web, ctx=tls_context(pki), headers=basic(USER, password))
    conn = http.client.HTTPConnection(LOOPBACK, agent.metrics_port, timeout=5)
    try:
        conn.request("GET", "/metrics", headers=basic(USER, password))
        r = conn.getresponse()
        status, body = r.status, r.read().decode(errors="replace")
    finally:
        conn.close()
    assert status == 400 and "TLS" in body and "vigie_" not in body, (status, body)
    # And a client that does not trust the certificate does not get through either.
    untrusting = ssl.create_default_context()
    print(assert_no_metrics(agent, ctx=untrusting))
    agent.assert_running()


def test_client_certificates_are_required_and_verified(pki, tmp_path, start_agent):
    web = write_web_config(tmp_path / "web.yml", pki, client_auth=True)
    agent = start_agent(web_config=web, ctx=tls_context(pki, client="client"))
    status, _, body = agent.get()
    assert status == 200 and metrics_mod.parse(body).total("vigie_probes_attached") > 0
    print("no certificate:", assert_no_metrics(agent, ctx=tls_context(pki)))
    print("certificate of another CA:", assert_no_metrics(agent, ctx=tls_context(pki, client="rogue")))
    # Both refusals happen in the handshake: no HTTP answer at all.
    for ctx in (tls_context(pki), tls_context(pki, client="rogue")):
        with pytest.raises((OSError, ssl.SSLError)):
            agent.get(ctx=ctx)
    agent.assert_running()


def test_basic_auth_without_tls_works_but_warns_on_tcp_only(tmp_path, start_agent):
    password = secrets.token_urlsafe(18)
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  {USER}: '{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}'\n")
    tcp = start_agent(web_config=web, headers=basic(USER, password))
    assert tcp.get()[0] == 200
    assert tcp.get(headers=basic(USER, "nope"))[0] == 401
    assert "clear text" in tcp.logs(), tcp.logs(tail_lines=20)
    unix = start_agent(web_config=web, headers=basic(USER, password), unix_socket=tmp_path / "m.sock")
    assert unix.get()[0] == 200
    assert unix.get(headers={})[0] == 401
    assert "clear text" not in unix.logs(), "a Unix socket does not cross the network"
    assert password not in tcp.logs() + unix.logs()


# -- Unix socket ----------------------------------------------------------------------------
def test_unix_socket_mode_0660_and_removed_on_sigterm(tmp_path, start_agent):
    path = tmp_path / "run" / "metrics.sock"
    path.parent.mkdir()
    # What a crashed agent leaves: a socket file nobody accepts on.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    agent = start_agent(unix_socket=path)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode), "not a socket"
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(stat.S_IMODE(st.st_mode))
    status, _, body = agent.get()
    assert status == 200
    assert metrics_mod.parse(body).total("vigie_probes_attached") > 0
    # Nothing listens on TCP for it: the address was the socket.
    assert "metrics=unix:" in agent.logs(), agent.logs(tail_lines=20)

    agent.proc.send_signal(signal.SIGTERM)
    code = agent.proc.wait(timeout=20)
    assert code == 0, agent.logs(tail_lines=40)
    assert not path.exists(), "the socket file is left after SIGTERM"


# -- broken configs -------------------------------------------------------------------------
def run_agent_once(tmp_path: Path, *args: str, metrics_addr: str | None = None) -> subprocess.CompletedProcess:
    """`vigie run` expected to refuse to start (60 s at most, in case it does start)."""
    return subprocess.run(
        [str(check_binary()), "run", "--server-port", str(free_port()), "--key-file", str(tmp_path / "key"),
         "--metrics-addr", metrics_addr or f"{LOOPBACK}:{free_port()}", *args],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", ["unknown_key", "missing_cert", "bad_bcrypt", "missing_file", "no_ca"])
def test_a_broken_web_config_refuses_start(case, pki, tmp_path):
    web = tmp_path / "web.yml"
    secret_value = "clear-text-" + secrets.token_hex(8)
    expected: list[str]
    if case == "unknown_key":
        web.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n"
                       "  client_auth: RequireAndVerifyClientCert\n")
        expected = ["client_auth"]
    elif case == "missing_cert":
        web.write_text(f"tls_server_config:\n  cert_file: {tmp_path / 'nope.crt'}\n  key_file: {pki / 'server.key'}\n")
        expected = [str(tmp_path / "nope.crt"), "cert_file"]
    elif case == "bad_bcrypt":
        web.write_text(f"basic_auth_users:\n  alice: {secret_value}\n")
        expected = ["alice", "bcrypt"]
    elif case == "missing_file":
        web = tmp_path / "absent.yml"
        expected = [str(web)]
    else:
        web.write_text(f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n  key_file: {pki / 'server.key'}\n"
                       "  client_auth_type: RequireAndVerifyClientCert\n")
        expected = ["client_ca_file"]
    r = run_agent_once(tmp_path, "--web.config.file", str(web))
    print(r.stderr)
    assert r.returncode != 0, "started with a broken web config"
    for needle in expected + ([str(web)] if case != "missing_file" else []):
        assert needle in r.stderr, f"{needle!r} not named: {r.stderr}"
    assert secret_value not in r.stderr + r.stdout, "a value that may be a password was printed"
    assert "vigie is watching" not in r.stderr


def test_a_busy_or_foreign_socket_path_refuses_start(tmp_path):
    regular = tmp_path / "not-a-socket"
    regular.write_text("precious")
    r = run_agent_once(tmp_path, metrics_addr=f"unix:{regular}")
    assert r.returncode != 0 and "not a socket" in r.stderr, r.stderr
    assert regular.read_text() == "precious"
    live = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live))
    listener.listen(1)
    try:
        r = run_agent_once(tmp_path, metrics_addr=f"unix:{live}")
        assert r.returncode != 0 and "in use" in r.stderr, r.stderr
        assert live.exists()
    finally:
        listener.close()


def test_sighup_rereads_the_web_config(pki, tmp_path, start_agent):
    old, new = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    web = write_web_config(tmp_path / "web.yml", pki, users={USER: old}, cost=4)
    agent = start_agent(web_config=web, ctx=tls_context(pki), headers=basic(USER, old))
    write_web_config(web, pki, users={USER: new}, cost=4)
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "configuration reloaded" in agent.logs(), timeout=10), agent.logs(tail_lines=20)
    # From the very next connection on.
    assert agent.get(headers=basic(USER, new))[0] == 200, "the new password does not work after reload"
    assert agent.get(headers=basic(USER, old))[0] == 401, "the old password still works after reload"
    # A broken file is refused: the agent keeps the config it had.
    web.write_text("basic_auth_users:\n  prometheus: not-a-hash\n")
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "configuration not reloaded" in agent.logs(), timeout=10), agent.logs(tail_lines=20)
    agent.assert_running()
    assert agent.get(headers=basic(USER, new))[0] == 200
    assert old not in agent.logs() and new not in agent.logs()

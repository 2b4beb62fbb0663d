"""vigie at the TLS vantage point: plaintext read inside OpenSSL with uprobes.

- the counting client over TLS counts plaintext bytes exactly (local TLS server, no agent);
- nginx (Debian's, libssl.so.3) terminating TLS in front of Synapse: per token and per endpoint
  class, requests and response bytes (the plaintext the client received) exact;
- Synapse's own TLS listener (OpenSSL linked statically in cryptography's _rust.abi3.so);
- a TLS server started after the agent (`--tls-discover-port`, and `--tls-target` of the
  library), with a keep-alive connection that predates the attachment;
- HTTP/2 through nginx (curl --http2): recognised and counted per connection;
- connection-level edge cases over TLS (Connection: close, HTTP/1.0, pipelining, request heads
  trickled a few bytes per TLS record, Expect: 100-continue, large uploads), both fronts;
- last, no raw token on /metrics, in the agent's output or state after all those TLS runs.

Nothing skips. Environment: VIGIE_TEST_SEED, VIGIE_TLS_TEST_DURATION (seconds of concurrent
traffic in the two big scenarios, default 12).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import metrics as metrics_mod
from harness.compare import BYTES, REQUESTS, client_figures, compare, poll_settled, poll_until_stable, run_and_read
from harness.matrix import CLIENT_V3, MatrixClient, Recorder, counting_tls_context
from harness.nginx import Nginx
from harness.scenario import DECOY_BODY, DECOY_TOKEN, ScenarioConfig
from harness.synapse import Synapse
from harness.tls import SYSTEM_LIBSSL, TLSScenario, make_self_signed_cert, mapped_files, maps_file
from harness.util import HarnessError, free_port, token_leaks
from test_harness import ScriptedServer, _wait_log

DURATION = float(os.environ.get("VIGIE_TLS_TEST_DURATION", "12"))
CRYPTOGRAPHY_RUST = "cryptography/hazmat/bindings/_rust.abi3.so"

# What the TLS runs leave behind for the leak check: (name, vigie, tokens, /metrics text).
_RUNS: list[tuple[str, object, list[str], str]] = []
# Every directory these tests write to (nginx's logs, Synapse's, the client's request log):
# the leak check scans them all for the runs' raw tokens.
_ARTIFACTS: set[Path] = set()


@pytest.fixture(autouse=True)
def _artifact_dirs(request, tmp_path):
    _ARTIFACTS.add(tmp_path)
    if "synapse" in request.fixturenames:
        _ARTIFACTS.add(Path(request.getfixturevalue("synapse").workdir))


# -- helpers -------------------------------------------------------------------------------


class VantageView:
    """The agent seen through one vantage: `scrape()` keeps only the per-token series with
    `vantage=<vantage>` (other metrics untouched), so harness.compare sums that vantage only."""

    def __init__(self, vigie, vantage: str = "tls"):
        self.vigie = vigie
        self.vantage = vantage

    def assert_running(self):
        self.vigie.assert_running()

    def scrape(self):
        m = self.vigie.scrape()
        keep = {k: v for k, v in m.items()
                if k[0] not in (REQUESTS, BYTES) or dict(k[1]).get("vantage") == self.vantage}
        return metrics_mod.Metrics(keep, text=m.text)


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    return make_self_signed_cert(tmp_path_factory.mktemp("cert"))


@contextmanager
def running_nginx(workdir: Path, cert, upstream_port: int, **kw):
    n = Nginx(workdir, cert[0], cert[1], upstream_port, **kw)
    error = None
    try:
        n.start()
    except HarnessError as e:
        error = str(e)
    if error is not None:
        n.stop()
        pytest.fail(f"nginx failed to start: {error}", pytrace=False)
    try:
        yield n
    finally:
        code = n.stop()
        print(f"nginx stopped (exit code {code}); files in {n.workdir}")


@contextmanager
def running_synapse(workdir: Path, **kw):
    s = Synapse(workdir, **kw)
    _ARTIFACTS.add(Path(workdir))
    error = None
    try:
        s.start(timeout=60)
    except HarnessError as e:
        error = str(e)
    if error is not None:
        s.stop()
        pytest.fail(f"Synapse failed to start: {error}", pytrace=False)
    try:
        yield s
    finally:
        code = s.stop()
        print(f"synapse stopped (exit code {code}); files in {s.workdir}")


def tls_health(m) -> str:
    keys = ("vigie_tls_records_total", "vigie_tls_client_connections_total", "vigie_events_lost_total",
            "vigie_unattributed_response_bytes_total", "vigie_pipelined_requests_total",
            "vigie_parse_failures_total", "vigie_capture_incomplete_total", "vigie_http2_connections_total",
            "vigie_probes_attached")
    parts = []
    for k in keys:
        series = m.series(k)
        if not series:
            continue
        parts.append(f"{k}: " + ", ".join(
            (",".join(f"{a}={b}" for a, b in sorted(lbl.items())) or "-") + f"={v:.0f}" for lbl, v in series))
    return "\n".join(parts)


def socket_vantage_series(m, labels: set[str]) -> list:
    return [(lbl, v) for name in (REQUESTS, BYTES) for lbl, v in m.series(name, vantage="socket")
            if lbl.get("token") in labels and v]


def run_scenario_and_compare(name: str, vigie, sc: TLSScenario, rec: Recorder, tmp_path: Path, *,
                             duration: float | None = None, check_foreign: bool = True,
                             extra_labels: set[str] = frozenset()):
    """Set up and run the scenario, then compare vigie's `vantage="tls"` figures with the
    client's; print the table. Returns (problems, client totals, labels, full metrics): the
    caller fails the test on problems once its servers are stopped."""
    view = VantageView(vigie, "tls")
    t0 = time.monotonic()
    r = run_and_read(sc, rec, vigie, view, tmp_path, DECOY_TOKEN, run=lambda: sc.run(duration))
    tokens, totals, labels, decoy_label = r.tokens, r.totals, r.labels, r.decoy_label
    m, fig, waited = r.metrics, r.figures, r.waited
    full = vigie.scrape()
    print(f"[{name}] {len(tokens)} tokens, {len(rec.records)} requests, "
          f"{sum(r.wire_bytes for r in rec.records)} plaintext bytes received by the clients, "
          f"{time.monotonic() - t0:.1f} s; figures read after {waited:.1f} s of polling; "
          f"connections: {sc.connection_stats()}")
    print(f"[{name}] client requests log: {tmp_path / 'client_requests.jsonl'}")
    if sc.errors:
        print(f"[{name}] {len(sc.errors)} Matrix errors answered (still requests): "
              f"{sorted({(a, s, c) for _, a, s, c in sc.errors})}")
    names = {s.token: f"s{s.index:02d}" + ("(q)" if s.index == sc.cfg.query_token_session else "")
             + ("(m)" if s.index == sc.cfg.media_session else "") for s in sc.sessions}
    result = compare(m, fig, totals, names, labels, check_foreign=check_foreign, extra_labels_allowed=extra_labels,
                     forbidden_labels={"the token inside an uploaded body": decoy_label})
    print(result.report())
    print(tls_health(full))
    _RUNS.append((name, vigie, list(tokens), full.text))
    problems = list(result.problems)
    sock = socket_vantage_series(full, set(labels.values()))
    if sock:
        problems.append(f"vantage=\"socket\" series for our tokens, though no server port is watched: {sock[:5]}")
    vigie.assert_running()
    return problems, totals, labels, full


# -- 1. the counting client over TLS ------------------------------------------------------------


class TLSScriptedServer(ScriptedServer):
    """test_harness's scripted server behind TLS: it logs the plaintext bytes it writes."""

    def __init__(self, cert):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        super().__init__()

    def _serve(self, conn: socket.socket):
        try:
            conn.settimeout(10)
            tls = self.ctx.wrap_socket(conn, server_side=True)
            tls.settimeout(None)
        except OSError:
            conn.close()
            return
        super()._serve(tls)


def test_tls_counting_client_counts_plaintext(cert):
    server = TLSScriptedServer(cert)
    rec = Recorder()
    ctx = counting_tls_context(cert[0])
    c = MatrixClient("127.0.0.1", server.port, "tok_tls", recorder=rec, name="tls1", tls=ctx)
    try:
        plan = [
            ("GET", "/len/0", None, {}),
            ("GET", "/len/5000", None, {}),
            ("GET", "/chunked/100000/37", None, {}),
            ("GET", "/204", None, {}),
            ("POST", "/len/10", b"a" * 300_000, {}),
            ("POST", "/continue/123", b"{}", {"Expect": "100-continue"}),
            ("GET", "/close/777", None, {}),  # server closes: reconnect
            ("GET", "/chunked/5/1", None, {}),
            ("GET", "/eof/4096", None, {}),  # close-delimited body (TLS ragged EOF)
            ("GET", "/len/40000", None, {}),  # bigger than a TLS record
            ("GET", "/drop/321", None, {}),  # then the server closes the idle connection
        ]
        for method, path, body, headers in plan:
            c.request(method, path, "other", body=body, ok=(200, 204), headers=headers,
                      content_type="application/octet-stream" if body else None)
        time.sleep(0.3)
        c.request("GET", "/kill-next/50", "other")  # after an idle close: reconnect (EOF drained)
        c.request("GET", "/len/60", "other")  # dropped unanswered: retried on a new connection
        log = _wait_log(server, len(plan) + 3)
        answered = [n for _, n in log if n]
        counted = [r.wire_bytes for r in rec.records]
        assert counted == answered, (counted, answered)
        assert rec.totals()["tok_tls"]["bytes"] == sum(answered)
        assert c.conn.rx_total == sum(answered)
        assert c.conn.retries == 1 and c.conn.reconnects_eof == 1
        assert c.conn.connects == 5, c.conn.connects  # /close, /eof, /drop, kill-next
        sock = c.conn._sock
        assert isinstance(sock, ssl.SSLSocket) and sock.version() in ("TLSv1.2", "TLSv1.3")
        print(f"counted {sum(counted)} plaintext bytes over {len(rec.records)} requests and "
              f"{c.conn.connects} TLS connections ({sock.version()}); server wrote {sum(answered)}")
        # Pipelining over TLS too.
        responses = c.pipeline([("GET", "/chunked/20000/7", "sync", None), ("GET", "/len/333", "members", None)])
        log = _wait_log(server, len(plan) + 5)
        assert [r.wire_bytes for r in responses] == [n for _, n in log[-2:]]
    finally:
        c.close()
        server.close()


# -- 2. nginx in front of Synapse -----------------------------------------------------------


def test_nginx_tls_front_per_token_accounting(synapse, vigie_factory, cert, seed, tmp_path):
    with running_nginx(tmp_path / "nginx", cert, synapse.port) as nginx:
        for pid in [nginx.master_pid, *nginx.worker_pids()]:
            libs = sorted(p for p in mapped_files(pid) if "libssl" in p)
            assert maps_file(pid, SYSTEM_LIBSSL), f"nginx pid {pid} does not map {SYSTEM_LIBSSL}: {libs}"
        print(f"nginx {nginx.master_pid} (workers {nginx.worker_pids()}) maps {SYSTEM_LIBSSL}; "
              f"TLS on {nginx.port} -> Synapse {synapse.port}")
        # Only the TLS side is watched: no --server-port.
        vigie = vigie_factory(None, extra_args=["--tls-target", str(SYSTEM_LIBSSL)])
        cfg = ScenarioConfig(users=12, extra_logins=1, rooms=3, prefill=20, duration=DURATION, seed=seed)
        rec = Recorder()
        sc = TLSScenario(synapse, cfg, recorder=rec, port=nginx.port, cafile=cert[0])
        problems, totals, labels, full = run_scenario_and_compare("nginx", vigie, sc, rec, tmp_path)
        assert full.total("vigie_tls_client_connections_total") > 0, \
            "the test clients' own TLS connections (they map libssl too) were not recognised as clients"
        # nginx's own log agrees with the client on what was asked of it.
        logged = [line for line in (nginx.workdir / "access.log").read_text().splitlines()
                  if '"vigie-tests/1 (session' in line]
        print(f"nginx access log: {len(logged)} requests from the scenario's clients")
        assert len(logged) == len(rec.records), (len(logged), len(rec.records))
    if problems:
        pytest.fail(f"{len(problems)} mismatches:\n" + "\n".join(problems[:60]), pytrace=False)


# -- 3. Synapse's own TLS listener ------------------------------------------------------------


def _cryptography_rust_so(synapse: Synapse) -> Path:
    r = subprocess.run([synapse.python, "-c", "import cryptography.hazmat.bindings._rust as m; print(m.__file__)"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip()).resolve()
    assert path.is_file() and str(path).endswith(CRYPTOGRAPHY_RUST), path
    return path


def test_synapse_own_tls_listener_per_token_accounting(vigie_factory, cert, seed, tmp_path_factory, tmp_path):
    with running_synapse(tmp_path_factory.mktemp("synapse-tls"), tls=cert) as synapse:
        rust_so = _cryptography_rust_so(synapse)
        assert maps_file(synapse.proc.pid, rust_so), \
            f"Synapse (pid {synapse.proc.pid}) does not map {rust_so}"
        libssl = maps_file(synapse.proc.pid, SYSTEM_LIBSSL)
        print(f"Synapse {synapse.proc.pid} serves HTTPS on {synapse.port} and maps {rust_so} "
              f"(static OpenSSL); it {'also maps' if libssl else 'does not map'} {SYSTEM_LIBSSL} (not probed here)")
        vigie = vigie_factory(None, extra_args=["--tls-target", str(rust_so)])
        cfg = ScenarioConfig(users=12, extra_logins=1, rooms=3, prefill=20, duration=DURATION, seed=seed)
        rec = Recorder()
        sc = TLSScenario(synapse, cfg, recorder=rec, port=synapse.port, cafile=cert[0])
        problems, totals, labels, full = run_scenario_and_compare("synapse-tls", vigie, sc, rec, tmp_path)
    if problems:
        pytest.fail(f"{len(problems)} mismatches:\n" + "\n".join(problems[:60]), pytrace=False)


# -- 4. a TLS server started after the agent -------------------------------------------------


def test_tls_server_started_after_the_agent(vigie_factory, cert, seed, tmp_path_factory, tmp_path):
    port = free_port()
    # Two agents, both started while nothing listens on `port` and no nginx runs:
    # one finds the library through the port, the other is given it.
    discover = vigie_factory(None, extra_args=["--tls-discover-port", str(port)])
    target = vigie_factory(None, extra_args=["--tls-target", str(SYSTEM_LIBSSL)])
    base = discover.scrape().total("vigie_probes_attached")
    print(f"agents ready with nothing on port {port}: discover agent probes={base:.0f}, "
          f"target agent probes={target.scrape().total('vigie_probes_attached'):.0f}")

    with running_synapse(tmp_path_factory.mktemp("synapse-late")) as synapse:
        _, early_tok, _ = synapse.register("early")
        # The discover agent is stopped (SIGSTOP) from before nginx exists until the early
        # connection has been opened and used: it cannot attach in between, so that connection
        # is for certain one that predates the attachment (discovery runs every ~10 s and on
        # SIGHUP; without the stop it could win the race and the case would not be tested).
        os.kill(discover.proc.pid, signal.SIGSTOP)
        try:
            with running_nginx(tmp_path / "nginx", cert, synapse.port, port=port) as nginx:
                ctx = counting_tls_context(cert[0])
                early_pre = Recorder()
                early = MatrixClient(nginx.host, nginx.port, early_tok, recorder=early_pre, name="early", tls=ctx)
                early.whoami()
                state = Path(f"/proc/{discover.proc.pid}/stat").read_text().split(")")[1].split()[0]
                assert state == "T", f"the discover agent was not stopped while the early connection was used ({state})"
                os.kill(discover.proc.pid, signal.SIGCONT)
                t_listen = time.monotonic()
                attached = base
                while time.monotonic() - t_listen < 25:
                    discover.assert_running()
                    attached = discover.scrape().total("vigie_probes_attached")
                    if attached > base:
                        break
                    time.sleep(0.2)
                took = time.monotonic() - t_listen
                print(f"discovery: vigie_probes_attached {base:.0f} -> {attached:.0f}, "
                      f"{took:.1f} s after the agent was let go (SIGCONT) with nginx listening on {port}; "
                      f"the early connection predates the attachment")
                assert attached > base, f"--tls-discover-port {port} found nothing within {took:.0f} s\n{discover.logs(40)}"
                early_labels = {discover.labels([early_tok])[early_tok], target.labels([early_tok])[early_tok]}

                cfg = ScenarioConfig(users=5, extra_logins=1, rooms=2, prefill=8, duration=6.0, seed=seed,
                                     media_interval=(0.5, 1.5))
                rec = Recorder()
                sc = TLSScenario(synapse, cfg, recorder=rec, port=nginx.port, cafile=cert[0])
                problems_d, totals, labels, _ = run_scenario_and_compare("late/discover", discover, sc, rec, tmp_path,
                                                                         extra_labels=early_labels)
                problems_t = []
                # The same traffic, seen by the agent given the library path before nginx existed
                # (its own key: its own labels).
                t_labels = target.labels(sc.tokens)
                m, fig, _ = poll_until_stable(VantageView(target), list(t_labels.values()),
                                              client_figures(totals, sc.tokens, t_labels))
                names = {s.token: f"s{s.index:02d}" for s in sc.sessions}
                r = compare(m, fig, totals, names, t_labels, extra_labels_allowed=early_labels)
                print("[late/target]\n" + r.report())
                problems_t = r.problems

                # ...and the early connection, reused once the discover agent is attached.
                early.recorder = early_post = Recorder()
                early.conn.idle_reconnect = 600
                for _ in range(3):
                    early.whoami()
                    early.joined_rooms()
                assert early.conn.connects == 1, "the early connection was not kept alive"
                early.close()
                label = discover.labels([early_tok])[early_tok]
                et = early_post.totals()[early_tok]
                exp = {label: client_figures({early_tok: et}, [early_tok], {early_tok: label})[label]}
                m, fig, _ = poll_until_stable(VantageView(discover), [label], exp)
                print(f"[late/discover] connection opened before attachment: client {et['requests']} requests "
                      f"{et['bytes']} bytes after attachment (+{early_pre.totals()[early_tok]['requests']} before); "
                      f"vigie {fig[label][0]:.0f} requests {fig[label][1]:.0f} bytes {dict(fig[label][2])}")
                early_problems = []
                # The target agent was attached before the early connection existed: it saw all of it.
                t_label = target.labels([early_tok])[early_tok]
                t_all = early_pre.totals()[early_tok]["requests"] + et["requests"]
                # The discover agent's figures may be complete at its first scrape, a few ms after
                # the last response: the target agent's are polled too, as every other figure here.
                def target_count():
                    mt = VantageView(target).scrape()
                    return mt, mt.sum_by(REQUESTS, "token").get(t_label, 0)
                _, t_seen, waited = poll_settled(target, target_count, t_all)
                print(f"[late/target] early connection: vigie {t_seen:.0f} requests, client {t_all} "
                      f"(read after {waited:.1f} s)")
                if t_seen != t_all:
                    early_problems.append(f"target agent: early connection counted {t_seen:.0f} requests, client sent {t_all}")
                if fig[label][0] != et["requests"] or dict(fig[label][2]) != {k: float(v) for k, v in et["by_endpoint"].items()}:
                    early_problems.append(f"connection predating attachment: vigie {fig[label][0]:.0f} requests "
                                          f"{dict(fig[label][2])}, client {et['requests']} {et['by_endpoint']} after attachment")
                if fig[label][1] != et["bytes"]:
                    early_problems.append(f"connection predating attachment: vigie {fig[label][1]:.0f} bytes, client {et['bytes']}")
                _RUNS.append(("late/discover", discover, sc.tokens + [early_tok], discover.scrape_text()))
                _RUNS.append(("late/target", target, sc.tokens + [early_tok], target.scrape_text()))
        finally:
            os.kill(discover.proc.pid, signal.SIGCONT)
    problems = ([f"discover: {p}" for p in problems_d] + [f"target: {p}" for p in problems_t] + early_problems)
    if problems:
        pytest.fail(f"{len(problems)} mismatches:\n" + "\n".join(problems[:60]), pytrace=False)


# -- 4b. discovery probes the server only, and follows its forks ---------------------------------


def test_discovered_tls_probes_follow_a_reloaded_servers_new_workers(synapse, vigie_factory, cert, tmp_path):
    """With --tls-discover-port the probes are in nginx's processes only (the test's own
    clients map the same libssl and are not probed), and after `nginx -s reload` the new
    workers, forks of the master, get theirs as soon as they appear (the kernel reports the
    fork), not at the next discovery 10 s later."""
    with running_nginx(tmp_path / "nginx", cert, synapse.port) as nginx:
        vigie = vigie_factory(None, extra_args=["--tls-discover-port", str(nginx.port)])
        before = vigie.scrape().total("vigie_probes_attached")
        assert before > 0, f"discovery attached nothing at start\n{vigie.logs(40)}"
        old = set(nginx.worker_pids())
        os.kill(nginx.master_pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while True:
            workers = set(nginx.worker_pids())
            if workers and not workers & old:
                break
            assert time.monotonic() < deadline, f"nginx did not replace its workers {old} (now {workers})"
            time.sleep(0.05)
        t_new = time.monotonic()
        _, tok, _ = synapse.register("reloaded")
        rec = Recorder()
        client = MatrixClient(nginx.host, nginx.port, tok, recorder=rec, name="reloaded",
                              tls=counting_tls_context(cert[0]))
        for _ in range(5):
            client.whoami()
            client.joined_rooms()
        client.close()
        used_within = time.monotonic() - t_new
        label = vigie.labels([tok])[tok]
        et = rec.totals()[tok]
        exp = {label: client_figures({tok: et}, [tok], {tok: label})[label]}
        m, fig, _ = poll_until_stable(VantageView(vigie), [label], exp)
        logs = vigie.logs()
        followed = [pid for pid in workers if f"child={pid}" in logs and "followed a fork" in logs]
        print(f"nginx workers {sorted(old)} -> {sorted(workers)}; new workers used within {used_within:.1f} s; "
              f"vigie {fig.get(label, (0, 0))[0]:.0f} requests {fig.get(label, (0, 0))[1]:.0f} bytes, "
              f"client {et['requests']} requests {et['bytes']} bytes; probes {before:.0f} -> "
              f"{vigie.scrape().total('vigie_probes_attached'):.0f}; forks followed for {sorted(followed)}")
        assert sorted(followed) == sorted(workers), \
            f"vigie did not follow the fork of every new worker {sorted(workers)}:\n{vigie.logs(30)}"
        assert fig[label][0] == et["requests"], (fig[label], et)
        assert fig[label][1] == et["bytes"], (fig[label], et)
        clients_seen = m.total("vigie_tls_client_connections_total")
        assert clients_seen == 0, \
            f"{clients_seen:.0f} client-side TLS connections were probed: discovery should probe nginx only"


# -- 5. HTTP/2 through nginx -----------------------------------------------------------------------


def test_http2_through_nginx_is_recognised(synapse, vigie_factory, cert, tmp_path):
    curl = shutil.which("curl")
    assert curl, "curl (Debian package) is needed for the HTTP/2 client"
    _, token, _ = synapse.register("h2user")
    with running_nginx(tmp_path / "nginx", cert, synapse.port, http2=True) as nginx:
        vigie = vigie_factory(None, extra_args=["--tls-target", str(SYSTEM_LIBSSL)])
        m0 = vigie.scrape()
        base = f"https://{nginx.host}:{nginx.port}"
        urls = ([f"{base}/_matrix/client/versions"] * 3 + [f"{base}/_matrix/client/v3/account/whoami"] * 2
                + [f"{base}/_matrix/client/v3/joined_rooms"])
        cmd = [curl, "--http2", "--silent", "--show-error", "--cacert", str(cert[0]), "--config", "-",
               "-w", "%{http_version} %{response_code} %{num_connects} %{size_header} %{size_download}\\n"]
        for u in urls:
            cmd += ["-o", "/dev/null", u]
        # The token goes to curl on stdin (as a config line): never on a command line, never
        # in a file the test leaves behind.
        r = subprocess.run(cmd, input=f'header = "Authorization: Bearer {token}"\n', capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split()
        rows = [lines[i:i + 5] for i in range(0, len(lines), 5)]
        print("curl (http_version code new_connections header_bytes body_bytes):\n"
              + "\n".join(" ".join(x) for x in rows))
        assert len(rows) == len(urls) and all(x[0] == "2" and x[1] == "200" for x in rows), rows
        connections = sum(int(x[2]) for x in rows)
        assert connections == 1, f"curl opened {connections} connections"
        n = len(urls)

        def h2(m, name):
            return m.total(name, vantage="tls")

        deadline = time.monotonic() + 10
        while True:
            m = vigie.scrape()
            d_req = h2(m, "vigie_http2_requests_total") - h2(m0, "vigie_http2_requests_total")
            d_conn = h2(m, "vigie_http2_connections_total") - h2(m0, "vigie_http2_connections_total")
            if (d_req >= n and d_conn >= 1) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        time.sleep(1.0)
        m = vigie.scrape()
        d_req = h2(m, "vigie_http2_requests_total") - h2(m0, "vigie_http2_requests_total")
        d_conn = h2(m, "vigie_http2_connections_total") - h2(m0, "vigie_http2_connections_total")
        d_bytes = h2(m, "vigie_http2_response_bytes_total") - h2(m0, "vigie_http2_response_bytes_total")
        per_token = m.sum_by(REQUESTS, "token")
        label = vigie.labels([token])[token]
        def delta(name):
            return m.total(name) - m0.total(name)

        # curl maps the same libssl: its (client) end of the connection must be recognised by
        # the server's SETTINGS frame and ignored, not parsed as requests.
        client_side = (f"curl's own (client) end of the HTTP/2 connection: tls_client_connections "
                       f"+{delta('vigie_tls_client_connections_total'):.0f}, "
                       f"parse_failures +{delta('vigie_parse_failures_total'):.0f}, "
                       f"unattributed_response_bytes +{delta('vigie_unattributed_response_bytes_total'):.0f}")
        print(client_side)
        assert delta("vigie_tls_client_connections_total") >= 1, client_side
        assert delta("vigie_parse_failures_total") == 0, client_side
        assert delta("vigie_unattributed_response_bytes_total") == 0, client_side
        print(f"vigie: http2 connections +{d_conn:.0f}, requests +{d_req:.0f} (curl made {n}), "
              f"response bytes +{d_bytes:.0f} (curl: {sum(int(x[3]) + int(x[4]) for x in rows)} decoded "
              f"header+body bytes)\nper-token series: {per_token}\n{tls_health(m)}")
        _RUNS.append(("http2", vigie, [token], m.text))
        assert d_conn >= 1, "the HTTP/2 connection was not recognised at the TLS vantage"
        assert d_req == n, f"vigie counted {d_req:.0f} HTTP/2 requests, curl made {n}"
        assert d_bytes > 0, "no HTTP/2 response bytes counted"
        assert per_token.get(label, 0) == 0, "HTTP/2 requests were attributed to the token (they are per connection)"


# -- 6. connection-level edge cases over TLS ---------------------------------------------------


def _edge_traffic(synapse, host, port, cafile, rec: Recorder, seed: int) -> tuple[list[str], dict[str, str]]:
    """Connection: close, HTTP/1.0, pipelining, request heads trickled across TLS records,
    Expect: 100-continue and large uploads, over HTTPS to host:port. Returns (tokens, names)."""
    rng = random.Random(seed)
    ctx = counting_tls_context(cafile)
    tag = f"{os.getpid()}{int(time.monotonic() * 1000) % 100000}"
    creds = {n: synapse.register(f"tlsedge{tag}_{n}") for n in ("closer", "http10", "piper", "trickler", "uploader")}
    clients = {}

    def client(n, **kw):
        uid, tok, _ = creds[n]
        c = MatrixClient(host, port, tok, user_id=uid, recorder=rec, name=n, tls=ctx, **kw)
        clients[n] = c
        return c

    closer = client("closer", extra_headers={"Connection": "close"})
    http10 = client("http10", http10=True, room_id_style="encoded")
    piper = client("piper", room_id_style="alternate")
    trickler = client("trickler", token_in_query=True)
    uploader = client("uploader")
    room = closer.create_room(name="tls edge", preset="public_chat")
    for c in (http10, piper, trickler, uploader):
        c.join(room)
    for i in range(15):
        closer.send_message(room, f"edge {i} " + "word " * rng.randint(1, 60))
    for i in range(6):
        for c in (closer, http10):
            c.joined_rooms()
            c.sync(timeout_ms=0)
            c.messages(room, limit=rng.randint(10, 40))
            c.members(room)
    for i in range(4):
        piper.pipeline([
            ("GET", f"{CLIENT_V3}/joined_rooms", "joined_rooms", None),
            ("GET", f"{CLIENT_V3}/rooms/{piper._enc(room)}/members", "members", None),
            ("GET", f"{CLIENT_V3}/rooms/{piper._enc(room)}/messages", "messages", {"dir": "b", "limit": 30}),
            ("GET", f"{CLIENT_V3}/sync", "sync", {"timeout": 0}),
        ])
        piper.send_message(room, f"between batches {i}")
    for i in range(4):
        trickler.pipeline([("GET", f"{CLIENT_V3}/rooms/{room}/messages", "messages", {"dir": "b", "limit": 20})],
                          trickle=7)
        trickler.pipeline([("GET", f"{CLIENT_V3}/joined_rooms", "joined_rooms", None)], trickle=3)
    for size, expect in ((50, True), (300_000, True), (2_000_000, False), (70_000, True)):
        data = rng.randbytes(size)
        mxc = uploader.upload(data, "application/octet-stream", "x.bin", expect_continue=expect)
        assert uploader.download(mxc) == data
        uploader.joined_rooms()
    mxc = uploader.upload(DECOY_BODY * 50, "text/plain", "decoy.txt")
    uploader.download(mxc)
    for c in clients.values():
        c.close()
    assert closer.conn.connects > 20 and piper.conn.connects == 1
    return [cred[1] for cred in creds.values()], {cred[1]: n for n, cred in creds.items()}


@pytest.mark.parametrize("front", ["nginx", "synapse-tls"])
def test_tls_connection_edge_cases(front, vigie_factory, cert, seed, tmp_path_factory, tmp_path):
    with running_synapse(tmp_path_factory.mktemp("synapse-edge"), tls=cert if front == "synapse-tls" else None) as synapse:
        rec = Recorder()
        if front == "nginx":
            with running_nginx(tmp_path / "nginx", cert, synapse.port) as nginx:
                vigie = vigie_factory(None, extra_args=["--tls-target", str(SYSTEM_LIBSSL)])
                tokens, names = _edge_traffic(synapse, nginx.host, nginx.port, cert[0], rec, seed)
        else:
            vigie = vigie_factory(None, extra_args=["--tls-target", str(_cryptography_rust_so(synapse))])
            tokens, names = _edge_traffic(synapse, synapse.host, synapse.port, cert[0], rec, seed)
        labels = vigie.labels(tokens + [DECOY_TOKEN])
        decoy_label = labels.pop(DECOY_TOKEN)
        totals = rec.totals()
        m, fig, waited = poll_until_stable(VantageView(vigie), [labels[t] for t in tokens],
                                           client_figures(totals, tokens, labels))
        # Pipelined batches are among these: bytes exact per token, not per endpoint class
        # (see test_capture_edges.test_pipelined_requests).
        result = compare(m, fig, totals, names, labels, bytes_per_endpoint=False,
                         forbidden_labels={"the token inside an uploaded body": decoy_label})
        print(f"[{front}] figures read after {waited:.1f} s")
        print(result.report())
        print(tls_health(vigie.scrape()))
        _RUNS.append((f"edge/{front}", vigie, tokens, vigie.scrape_text()))
    if result.problems:
        pytest.fail(f"{len(result.problems)} mismatches:\n" + "\n".join(result.problems), pytrace=False)


# -- 7. no raw token on the TLS paths -----------------------------------------------------------


def test_no_raw_token_leaks_on_tls_paths(request, cert, seed, tmp_path):
    if not _RUNS:
        # Run alone (-k): make a TLS run of its own, nginx in front of Synapse.
        synapse = request.getfixturevalue("synapse")
        vigie = request.getfixturevalue("vigie_factory")(None, extra_args=["--tls-target", str(SYSTEM_LIBSSL)])
        with running_nginx(tmp_path / "nginx", cert, synapse.port) as nginx:
            cfg = ScenarioConfig(users=5, extra_logins=1, rooms=2, prefill=10, duration=6.0, seed=seed,
                                 media_interval=(0.5, 1.5))
            rec = Recorder()
            sc = TLSScenario(synapse, cfg, recorder=rec, port=nginx.port, cafile=cert[0])
            run_scenario_and_compare("leak/nginx", vigie, sc, rec, tmp_path)
    assert _RUNS, "no TLS run to check"
    found, checked = [], []
    for name, vigie, tokens, metrics_text in _RUNS:
        if vigie.running:
            metrics_text = vigie.scrape_text()
            vigie.stop()
        assert vigie.stderr_path.is_file(), "the agent's stderr is missing"
        assert [p for p in Path(vigie.state_dir).rglob("*") if p.is_file()], "the agent's state dir holds no file"
        assert "vigie_token_requests_total" in metrics_text
        leaks, scanned = token_leaks(tokens, {f"{name}: /metrics": metrics_text.encode()}, [vigie.workdir])
        found += [f"{name}: {x}" for x in leaks]
        checked.append(f"{name}: {len(tokens)} tokens x {scanned['files']} files of the agent and /metrics "
                       f"({scanned['bytes']} bytes)")
    # nginx's access and error logs, Synapse's logs, the clients' request logs, curl's input:
    # whatever the tests left, against every token any run used.
    every_token = sorted({t for _, _, tokens, _ in _RUNS for t in tokens})
    leaks, scanned = token_leaks(every_token, dirs=sorted(_ARTIFACTS))
    found += [f"artifacts: {x}" for x in leaks]
    checked.append(f"artifacts: {len(every_token)} tokens x {scanned['files']} files in {len(_ARTIFACTS)} "
                   f"directories ({scanned['bytes']} bytes)")
    print("\n".join(checked))
    assert scanned["files"] > 0
    assert not found, "raw token material leaked:\n" + "\n".join(found)

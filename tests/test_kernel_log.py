"""Kernel diagnostics (`kernel_log`): off by default and silent, on they reach the agent's
stderr at target `vigie::kernel`, and either way the agent counts the same.

Two agents watch one real Synapse at once (tracepoints are global, each agent has its own
maps and ring), one with `kernel_log = true`, one with the default. The rare path is taken
for real: both agents are stopped (SIGSTOP) while a client uploads more than their 16 MiB
event rings can hold, so the kernel's ring reserve fails in both.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time

from harness.util import token_leaks, wait_until

KERNEL_LINE = "vigie::kernel"
RING_FULL = "EVENTS ring buffer full"
# Shaped like a Synapse token; Synapse refuses it, which is fine: vigie attributes requests by
# the header, and this is what must never reach a log line.
TOKEN = "syt_a2VybmVsbG9n_" + secrets.token_urlsafe(15) + "_0abcde"


def _request(port: int, path: str, body: bytes = b"") -> None:
    """One HTTP/1.1 request on its own connection, answer read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        head = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        s.sendall(head + body)
        while s.recv(65536):
            pass


def _counts(agent) -> dict[str, float]:
    m = agent.scrape()
    return {
        "requests": m.total("vigie_token_requests_total"),
        "response_bytes": m.total("vigie_token_response_bytes_total"),
        "recv_events": m.total("vigie_events_total", kind="recv"),
    }


def test_kernel_log_reports_a_full_ring_only_when_on(synapse, vigie_factory, tmp_path):
    config = tmp_path / "kernel_log.toml"
    config.write_text("kernel_log = true\n")
    on = vigie_factory(synapse.port, extra_args=["--config", str(config)])
    off = vigie_factory(synapse.port)

    # Ordinary traffic, both agents awake: exact same counts.
    before = {"on": _counts(on), "off": _counts(off)}
    for _ in range(20):
        _request(synapse.port, "/_matrix/client/v3/user/%40a%3Alocalhost/filter", b'{"room":{}}')
    wait_until(lambda: all(_counts(a)["requests"] - before[k]["requests"] >= 20
                           for k, a in (("on", on), ("off", off))), timeout=20)
    time.sleep(1.5)  # the send-total poll and the tick: counts settle
    delta = {k: {n: _counts(a)[n] - before[k][n] for n in before[k]} for k, a in (("on", on), ("off", off))}
    print("ordinary traffic:", delta)
    assert delta["on"]["requests"] == 20, delta
    assert delta["on"] == delta["off"], f"kernel_log changed what the agent counts: {delta}"
    assert delta["on"]["response_bytes"] > 0, delta

    # The rare path: neither agent drains while 96 MiB arrive in 64 KiB receives, each
    # captured up to 16 KiB, so each 16 MiB ring fills.
    for agent in (on, off):
        os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        chunk = os.urandom(8 << 20)
        for _ in range(12):
            try:
                _request(synapse.port, "/_matrix/media/v3/upload", chunk)
            except OSError as e:  # Synapse may refuse the upload early; its receives happened
                print("upload ended early:", e)
    finally:
        for agent in (on, off):
            os.kill(agent.proc.pid, signal.SIGCONT)

    def logged() -> bool:
        return RING_FULL in on.stderr_path.read_text(errors="replace")

    wait_until(logged, timeout=20)
    time.sleep(2)  # the off agent has had as long to say anything
    on_err = on.stderr_path.read_text(errors="replace")
    off_err = off.stderr_path.read_text(errors="replace")
    lines = [l for l in on_err.splitlines() if KERNEL_LINE in l]
    print(f"{len(lines)} kernel log lines from the agent with kernel_log on, e.g. {lines[:3]}")
    assert any(RING_FULL in l for l in lines), on_err[-3000:]
    lost = {k: a.scrape().total("vigie_events_lost_total") for k, a in (("on", on), ("off", off))}
    print("records lost:", lost)
    assert lost["on"] > 0 and lost["off"] > 0, f"the ring did not fill in both agents: {lost}"
    assert KERNEL_LINE not in off_err, "kernel_log is off by default, yet a kernel line was logged"
    on.assert_running()
    off.assert_running()
    findings, scanned = token_leaks([TOKEN], {"on stderr": on_err.encode(), "off stderr": off_err.encode()})
    assert scanned["bytes"] > 0 and not findings, findings

"""Unit tests of the harness itself (no Synapse, no agent): the counting client must count
exactly the bytes a server wrote, and the metrics parser must read both exposition formats."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from harness.matrix import CountingSocket, MatrixClient, Recorder
from harness.metrics import parse


class ScriptedServer:
    """A tiny HTTP/1.1 server on 127.0.0.1 that logs every byte it writes, per request.

    Paths: /len/N (Content-Length body), /chunked/N/K (N bytes in K chunk writes, with a
    trailer), /close/N (Connection: close), /eof/N (close-delimited body), /drop/N (answer,
    then close the idle connection), /kill-next/N (answer, then close the connection on the
    next request without answering), /continue/N (an interim 100 Continue first), /204,
    /echo (the request head as the body).
    """

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.log: list[tuple[str, int]] = []  # (request line, bytes written for it)
        self.connections = 0
        self.lock = threading.Lock()
        self._stop = False
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self):
        self._stop = True
        self.sock.close()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket):
        buf = b""
        kill_next = False
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(7)  # small reads on purpose
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                request_line = lines[0]
                headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
                length = int(headers.get("content-length", "0"))
                if kill_next:
                    with self.lock:
                        self.log.append((request_line, 0))
                    return
                written = 0

                def w(data: bytes):
                    nonlocal written
                    conn.sendall(data)
                    written += len(data)

                if headers.get("expect", "").lower() == "100-continue":
                    w(b"HTTP/1.1 100 Continue\r\n\r\n")
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                path = request_line.split(" ")[1].split("?")[0]
                parts = path.strip("/").split("/")
                kind = parts[0]
                n = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
                body = bytes((i * 7 + 3) % 251 for i in range(n))
                close_after = False
                if kind in ("len", "drop", "kill-next", "continue"):
                    w(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                      b"Content-Length: %d\r\n\r\n" % n)
                    if n:
                        w(body)
                elif kind == "chunked":
                    k = int(parts[2])
                    w(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n")
                    step = max(1, -(-n // k))
                    for i in range(0, n, step):
                        piece = body[i:i + step]
                        w(b"%x\r\n" % len(piece) + piece + b"\r\n")
                        time.sleep(0.002)
                    w(b"0\r\nX-Trailer: yes\r\n\r\n")
                elif kind == "close":
                    w(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % n + body)
                    close_after = True
                elif kind == "eof":
                    w(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                    time.sleep(0.01)
                    w(body)
                    close_after = True
                elif kind == "204":
                    w(b"HTTP/1.1 204 No Content\r\nServer: scripted\r\n\r\n")
                elif kind == "echo":
                    w(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(head) + head)
                else:
                    w(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                with self.lock:
                    self.log.append((request_line, written))
                if close_after:
                    conn.shutdown(socket.SHUT_WR)
                    return
                if kind == "drop":
                    time.sleep(0.1)
                    conn.shutdown(socket.SHUT_WR)
                    return
                if kind == "kill-next":
                    kill_next = True
        except OSError:
            return
        finally:
            conn.close()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def _wait_log(server: ScriptedServer, n: int, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with server.lock:
            if len(server.log) >= n:
                return list(server.log)
        time.sleep(0.01)
    raise AssertionError(f"server logged {len(server.log)} requests, expected {n}")


def test_counting_socket_counts_recv_variants():
    a, b = socket.socketpair()
    cs = CountingSocket(a.family, a.type, a.proto, fileno=a.detach())
    try:
        payload = b"x" * 1000
        b.sendall(payload)
        assert cs.recv(10, socket.MSG_PEEK) == payload[:10]
        assert cs.rx == 0, "MSG_PEEK must not count"
        assert len(cs.recv(100)) == 100
        buf = bytearray(200)
        assert cs.recv_into(buf, 200) == 200
        data, _ = cs.recvfrom(100)
        assert len(data) == 100
        n, _ = cs.recvfrom_into(buf, 100)
        assert n == 100
        msg = cs.recvmsg(100)
        assert len(msg[0]) == 100
        n = cs.recvmsg_into([bytearray(50), bytearray(50)])[0]
        assert n == 100
        f = cs.makefile("rb")
        rest = f.read(300)
        assert len(rest) == 300
        assert cs.rx == 1000
        cs.sendall(b"abc")
        assert b.recv(10) == b"abc" and cs.tx == 3
    finally:
        cs.close()
        b.close()


def test_client_counts_every_byte_the_server_wrote(server):
    rec = Recorder()
    c = MatrixClient("127.0.0.1", server.port, "tok_header", recorder=rec, name="t1")
    plan = [
        ("GET", "/len/0", None, {}),
        ("GET", "/len/5000", None, {}),
        ("GET", "/chunked/100000/37", None, {}),
        ("GET", "/204", None, {}),
        ("POST", "/len/10", b"a" * 300_000, {}),  # a request body the server must read first
        ("POST", "/continue/123", b"{}", {"Expect": "100-continue"}),
        ("GET", "/close/777", None, {}),  # server closes: the client must reconnect
        ("GET", "/chunked/5/1", None, {}),
        ("GET", "/eof/4096", None, {}),  # close-delimited body
        ("GET", "/len/1", None, {}),
        ("GET", "/chunked/1000000/3", None, {}),
    ]
    for method, path, body, headers in plan:
        c.request(method, path, "other", body=body, ok=(200, 204), headers=headers,
                  content_type="application/octet-stream" if body else None)
    log = _wait_log(server, len(plan))
    # Per request and in total, the client counted exactly what the server wrote.
    counted = [r.wire_bytes for r in rec.records]
    written = [n for _, n in log]
    assert counted == written
    assert rec.totals()["tok_header"]["bytes"] == sum(written)
    assert rec.totals()["tok_header"]["requests"] == len(plan)
    assert c.conn.rx_total == sum(written)
    assert c.conn.connects == 3  # after /close and /eof
    assert rec.in_flight == 0
    print(f"counted {sum(counted)} bytes over {len(plan)} requests, server wrote {sum(written)}")
    c.close()


def test_client_reconnects_after_idle_close_and_counts_once(server):
    rec = Recorder()
    c = MatrixClient("127.0.0.1", server.port, "tok", recorder=rec, name="idle")
    c.request("GET", "/drop/321", "other")
    time.sleep(0.4)  # the server closes the idle connection meanwhile
    c.request("GET", "/len/99", "other")
    log = _wait_log(server, 2)
    assert [r.wire_bytes for r in rec.records] == [n for _, n in log]
    assert c.conn.connects == 2 and c.conn.reconnects_eof == 1 and c.conn.retries == 0
    assert len(rec.records) == 2
    c.close()


def test_client_retries_when_the_server_drops_a_reused_connection(server):
    rec = Recorder()
    c = MatrixClient("127.0.0.1", server.port, "tok", recorder=rec, name="retry")
    c.request("GET", "/kill-next/50", "other")
    # The server closes the connection when the next request arrives, without answering:
    # the client sends it again on a new connection and records it once.
    c.request("GET", "/len/60", "other")
    log = _wait_log(server, 3)
    answered = [n for _, n in log if n]
    assert [r.wire_bytes for r in rec.records] == answered
    assert len(rec.records) == 2 and rec.records[1].attempts == 2
    assert c.conn.retries == 1
    c.close()


def test_pipelined_requests_are_counted_per_response(server):
    rec = Recorder()
    c = MatrixClient("127.0.0.1", server.port, "tok", recorder=rec, name="pipe")
    c.request("GET", "/len/10", "other")
    responses = c.pipeline([
        ("GET", "/chunked/20000/7", "sync", None),
        ("GET", "/len/333", "members", {"x": "1"}),
        ("GET", "/204", "state", None),
        ("GET", "/len/70000", "messages", None),
    ])
    assert [r.status for r in responses] == [200, 200, 204, 200]
    c.request("GET", "/len/11", "other")
    log = _wait_log(server, 6)
    assert [r.wire_bytes for r in rec.records] == [n for _, n in log]
    assert [r.endpoint for r in rec.records] == ["other", "sync", "members", "state", "messages", "other"]
    assert c.conn.connects == 1
    c.close()


def test_token_placement_and_endpoint_recording(server):
    rec = Recorder()
    hdr = MatrixClient("127.0.0.1", server.port, "syt_header_tok", recorder=rec)
    qry = MatrixClient("127.0.0.1", server.port, "syt_query_tok", recorder=rec, token_in_query=True)
    anon = MatrixClient("127.0.0.1", server.port, None, recorder=rec)
    h = hdr.request("GET", "/echo", "members", query={"a": "1"}).body.decode()
    q = qry.request("GET", "/echo", "send", query={"a": "1"}).body.decode()
    a = anon.request("GET", "/echo", "other").body.decode()
    assert "Authorization: Bearer syt_header_tok" in h and "access_token" not in h
    assert "GET /echo?a=1&access_token=syt_query_tok HTTP/1.1" in q and "Authorization" not in q
    assert "Authorization" not in a and "access_token" not in a
    t = rec.totals()
    assert t["syt_header_tok"]["by_endpoint"] == {"members": 1}
    assert t["syt_query_tok"]["by_endpoint"] == {"send": 1}
    assert t[None]["requests"] == 1
    # Recorded paths never hold the token.
    assert all("syt_query_tok" not in r.path for r in rec.records)
    for cl in (hdr, qry, anon):
        cl.close()


def test_room_ids_raw_and_encoded(server):
    rec = Recorder()
    seen = []
    for style in ("raw", "encoded", "alternate"):
        c = MatrixClient("127.0.0.1", server.port, "t", recorder=rec, room_id_style=style)
        seen.append(c._enc("!abc:test.local"))
        seen.append(c._enc("!abc:test.local"))
        c.close()
    assert seen == ["!abc:test.local"] * 2 + ["%21abc%3Atest.local"] * 2 + [
        "!abc:test.local", "%21abc%3Atest.local"]


PROM_TEXT = """# HELP vigie_token_requests_total Requests.
# TYPE vigie_token_requests_total counter
vigie_token_requests_total{token="00112233aabbccdd",endpoint="sync"} 5
vigie_token_requests_total{token="00112233aabbccdd",endpoint="send"} 2
vigie_token_requests_total{token="overflow",endpoint="sync"} 1
# TYPE vigie_probes_attached gauge
vigie_probes_attached 6
"""

OM_TEXT = """# HELP vigie_token_requests Requests.
# TYPE vigie_token_requests counter
vigie_token_requests_total{token="00112233aabbccdd",endpoint="sync"} 5
vigie_token_requests_total{token="00112233aabbccdd",endpoint="send"} 2
vigie_token_requests_total{token="overflow",endpoint="sync"} 1
# TYPE vigie_probes_attached gauge
vigie_probes_attached 6
# EOF
"""


@pytest.mark.parametrize("text", [PROM_TEXT, OM_TEXT], ids=["prometheus", "openmetrics"])
def test_metrics_parser(text):
    m = parse(text)
    assert m[("vigie_token_requests_total", frozenset({"token": "00112233aabbccdd", "endpoint": "sync"}.items()))] == 5
    assert m.sum_by("vigie_token_requests_total", "token") == {"00112233aabbccdd": 7, "overflow": 1}
    assert m.sum_by("vigie_token_requests_total", "endpoint", token="00112233aabbccdd") == {"sync": 5, "send": 2}
    assert m.total("vigie_probes_attached") == 6
    assert m.get_value("vigie_probes_attached") == 6


def test_a_seed_reads_rooms_in_the_same_order_whatever_ids_and_listing_order_synapse_gives():
    import random

    from harness.draws import RoomOrder
    from harness.world import World

    def order(ids: list[str], listed: list[int]) -> list[int]:
        """The build indices of the rooms in the order a seed-7 scrape reads them, in a world
        whose rooms got `ids` and whose `/joined_rooms` lists them in `listed` order."""
        w = World.__new__(World)
        w.rooms, w.archive = ids[:4], {ids[4]: 10, ids[5]: 20}
        opened = []
        o = RoomOrder(w.in_build_order([ids[i] for i in listed]), random.Random(7), 1, lambda r: None)
        while turn := o.turn():
            opened.append(ids.index(turn[0][0]))
            o.finish(turn[0])
        return opened

    first = order(["!q1", "!a2", "!m3", "!c4", "!z5", "!b6"], [0, 1, 2, 3, 4, 5])
    again = order(["!x9", "!k8", "!d7", "!w6", "!e5", "!r4"], [5, 3, 1, 0, 4, 2])
    assert sorted(first) == list(range(6)) and first == again, (first, again)


def test_drawn_scrapes_page_rooms_turn_about_each_from_where_it_was_opened():
    import random

    from harness.draws import RoomOrder

    opened = []

    def start(room):
        opened.append(room)
        return f"prev-{room}"

    order = RoomOrder(["a", "b", "c"], random.Random(1), 2, start)
    pages = []
    while turn := order.turn():
        for cur in turn:
            pages.append(tuple(cur))
            cur[1] = None if cur[1] is None else (cur[1] + "+" if len(cur[1]) < 7 else None)
            if cur[1] is None:
                order.finish(cur)
    rooms = [p[0] for p in pages]
    assert sorted(set(rooms)) == ["a", "b", "c"] and len(opened) == 3, (rooms, opened)
    # Two rooms at a time, turn about: the first two pages are of two different rooms, each
    # room started from its own `start`, and a third room opens only once one is finished.
    assert rooms[0] != rooms[1] and pages[0][1] == f"prev-{rooms[0]}"
    assert opened.index(rooms[-1]) == 2


class _Syncs:
    """A sync endpoint that answers at once and sets `stop` after `n` calls."""

    def __init__(self, stop, n: int):
        self.stop, self.n, self.calls = stop, n, 0

    def sync(self, since=None, timeout_ms=0, filter_id=None):
        self.calls += 1
        if self.calls >= self.n:
            self.stop.set()
        return {"next_batch": f"s{self.calls}"}


def test_a_sync_loop_draws_nothing_from_the_generator_its_owner_draws_its_actions_from():
    """What a legitimate reader or a population session does (its rooms, pages, pauses)
    follows from the seed alone. Its sync loop runs on a thread of its own: drawing its
    timeouts from the same generator made the rest follow thread timing instead (one run of
    a seed had the key-backup reader read 10 pages, the next 8)."""
    import random
    from types import SimpleNamespace

    from harness.draws import Reader
    from harness.population import NORMAL, ElementSession

    reader = Reader(None, Recorder(), seed=3)
    drawn = reader.rng.getstate()
    stop = threading.Event()
    syncs = _Syncs(stop, 5)
    reader.sync_loop(stop, syncs, None, None)
    assert syncs.calls == 5 and reader.rng.getstate() == drawn

    account = SimpleNamespace(user_id="@a:test.local", user_agent="Element/1.0", token="t", name="a",
                              rooms=["!r:test.local"], address="10.0.0.1", since=None, filter_id=None, prev_batch={})
    world = SimpleNamespace(synapse=SimpleNamespace(host="127.0.0.1", port=9), media_snapshot=lambda: [])
    stop = threading.Event()
    pop = SimpleNamespace(world=world, recorder=Recorder(), stop=stop, call=lambda s, what, fn: fn())
    session = ElementSession(pop, account, NORMAL, random.Random(5))
    syncs = session.sync = _Syncs(stop, 5)
    drawn = session.rng.getstate()
    session.sync_loop()
    assert syncs.calls == 5 and session.rng.getstate() == drawn


def test_an_attacks_page_count_opens_each_room_once_and_counts_empty_pages():
    from harness.attacks import AttackStats

    st = AttackStats()
    assert st.page("!a", 20) is True
    assert st.page("!a", 0) is False
    assert st.page("!b", 5) is True
    assert (st.pages, st.events, st.empty_pages, st.rooms) == (3, 25, 1, {"!a", "!b"})
    assert len(st.opened_at) == 2 and st.opened_at[0] <= st.opened_at[1]


def test_a_late_draw_is_the_detectors_miss_unless_it_was_narrow_at_its_target_and_caught_once_broad():
    from harness.draws import verdict

    # Flagged by its target: met, whatever it read.
    assert verdict(59.0, 60.0, [0.0], 300.0) == "met"
    # Three rooms open by the target and flagged after it: the detector's miss.
    assert verdict(63.9, 60.0, [0.0, 20.0, 42.0], 600.0) == "missed"
    assert verdict(None, 300.0, [0.0, 100.0, 268.0], 300.0) == "missed"
    # One small room, then the 1,500-event room for two minutes: narrow at its target (what
    # requirement 1 keeps below 1.0), and flagged a second after its third room.
    assert verdict(141.7, 60.0, [0.0, 14.0, 140.7], 600.0) == "narrow"
    # ... but still unflagged a whole target after its third room: a miss all the same.
    assert verdict(210.0, 60.0, [0.0, 14.0, 140.7], 600.0) == "missed"
    assert verdict(None, 60.0, [0.0, 14.0, 140.7], 600.0) == "missed"
    # Never broad while it was watched, or not watched a whole target after it turned broad.
    assert verdict(None, 60.0, [0.0, 14.0], 300.0) == "narrow"
    assert verdict(None, 60.0, [0.0, 14.0, 280.0], 300.0) == "narrow"
    # The order rooms were recorded in does not matter.
    assert verdict(63.9, 60.0, [42.0, 0.0, 20.0], 600.0) == "missed"


def test_seeds_pool_into_one_distribution_with_each_miss_judged_as_the_test_judges_it(tmp_path):
    import json

    from harness.draws_pool import _peak, main, pool

    def d(name, library, target, ttd, opened):
        return {"name": name, "library": library, "pace": 1.0 if target == 60.0 else 5.0, "params": "p",
                "ttd_s": ttd, "target_s": target, "opened_s": opened, "max": 1.1 if ttd else 0.9}

    seed2 = {"seed": 2, "horizon_s": 600.0, "population_worst": 0.6,
             "readers": {"key_backup_restore": 0.91, "browser_catch_up": 0.35, "bridge_reader": 0.0},
             "draws": [d("draw00", "harness", 60.0, 28.0, [0.0, 9.0, 20.0]),
                       d("web02", "browser", 60.0, 60.1, [0.0, 20.0, 54.0])]}
    seed21 = {"seed": 21, "horizon_s": 600.0, "population_worst": 0.4,
              "readers": {"key_backup_restore": 0.2, "browser_catch_up": 0.53, "bridge_reader": 0.0},
              "draws": [d("web00", "browser", 60.0, 144.4, [0.0, 14.0, 143.2]),
                        d("nio01", "nio", 300.0, 108.0, [0.0, 50.0, 90.0]),
                        d("draw03", "harness", 300.0, None, [0.0, 200.0])]}
    text = pool([seed2, seed21])
    lines = text.splitlines()
    assert lines[0] == "==== drawn scrapes over 2 seed(s) (2, 21): 5 draws ===="
    # Both seeds' fast draws in one distribution: 28.0, 60.1 and 144.4 s.
    assert "target 60 s (pace <= 3 s): 3 draws, median 60.1 s, p90 144.4 s, worst 144.4 s; 1 within target" in lines
    assert "target 300 s (pace 3-10 s): 2 draws, median 108.0 s, p90 never, worst never; 1 within target" in lines
    assert "made in a browser: 2 draws, median 60.1 s, p90 144.4 s, worst 144.4 s; 0 within target" in lines
    assert "made with matrix-nio: 1 draw, median 108.0 s, p90 108.0 s, worst 108.0 s; 1 within target" in lines
    # web00 was narrow at its target and flagged a second after its third room; draw03 never
    # opened a third room in 600 s: narrow too. web02 had three rooms by its target: missed.
    narrow = text.split("narrow (")[1].split("missed (")[0]
    missed = text.split("missed (")[1].split("from room")[0]
    assert "seed 21 web00 144.4 s" in narrow and "seed 21 draw03 never" in narrow and "): 2\n" in narrow
    assert "seed 2 web02 60.1 s" in missed and "): 1\n" in missed
    # Readers: the highest peak over the seeds, and which seed it came from.
    assert "  key_backup_restore    0.91 (seed 2)" in lines
    assert "  browser_catch_up      0.53 (seed 21)" in lines
    assert lines[-1] == "worst population peak 0.60 (seed 2)"
    # A peak several seeds share names them all, not whichever was pooled last.
    assert "  bridge_reader         0.00 (every seed)" in lines
    assert _peak([(0.6, 2), (0.4, 21), (0.6, 33)]) == "0.60 (seeds 2, 33)"
    # From the files a run leaves, as `cargo xtask detect --seeds` calls it.
    paths = []
    for r in (seed2, seed21):
        p = tmp_path / f"draws-seed{r['seed']}.json"
        p.write_text(json.dumps(r))
        paths.append(str(p))
    assert main(paths) == 0
    assert main([]) == 2

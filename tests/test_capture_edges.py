"""Connection-level edge cases of per-request attribution, against a real Synapse.

One Synapse and one agent for the module; each test uses its own fresh users (tokens) and
checks only those. Per token, vigie must count exactly the client's requests and response
bytes, overall and per endpoint class (pipelined batches: per token only, see that test).
"""

from __future__ import annotations

import itertools
import random
import time

import pytest

from harness.compare import client_figures, compare, poll_until_stable
from harness.matrix import CLIENT_V3, MatrixClient, Recorder
from harness.scenario import DECOY_BODY, DECOY_TOKEN
from harness.util import Actor, join_actors

_serial = itertools.count()


class Edge:
    """Fresh users on the module's Synapse, a recorder, and the final comparison."""

    def __init__(self, synapse, vigie, names: list[str], seed: int = 1):
        self.synapse = synapse
        self.vigie = vigie
        self.rec = Recorder()
        self.rng = random.Random(seed)
        n = next(_serial)
        self.creds = {name: synapse.register(f"edge{n}_{name}") for name in names}
        self.clients: list[MatrixClient] = []

    def client(self, name: str, **kw) -> MatrixClient:
        uid, tok, _ = self.creds[name]
        c = MatrixClient(self.synapse.host, self.synapse.port, tok, user_id=uid, recorder=self.rec,
                         name=name, **kw)
        self.clients.append(c)
        return c

    def token(self, name: str) -> str:
        return self.creds[name][1]

    def room(self, owner: MatrixClient, members: list[MatrixClient], messages: int = 25) -> str:
        room = owner.create_room(name="edge", preset="public_chat")
        for m in members:
            m.join(room)
        for i in range(messages):
            owner.send_message(room, f"edge message {i} " + "word " * self.rng.randint(1, 50))
        return room

    def mix(self, c: MatrixClient, room: str, i: int) -> None:
        kind = i % 5
        if kind == 0:
            c.joined_rooms()
        elif kind == 1:
            c.sync(timeout_ms=0)
        elif kind == 2:
            c.send_message(room, f"msg {i} " + "x" * self.rng.randint(0, 3000))
        elif kind == 3:
            c.messages(room, limit=self.rng.randint(10, 60))
        else:
            c.members(room)

    def check(self, forbidden: dict[str, str] | None = None, bytes_per_endpoint: bool = True) -> None:
        for c in self.clients:
            c.close()
        assert self.rec.in_flight == 0
        tokens = [cred[1] for cred in self.creds.values()]
        names = {cred[1]: name for name, cred in self.creds.items()}
        labels = self.vigie.labels(tokens + list((forbidden or {}).values()))
        forbidden_labels = {what: labels.pop(tok) for what, tok in (forbidden or {}).items()}
        totals = self.rec.totals()
        expected = client_figures(totals, tokens, labels)
        m, fig, waited = poll_until_stable(self.vigie, [labels[t] for t in tokens], expected)
        print(f"vigie figures read after {waited:.1f} s; connections opened: "
              f"{ {c.conn.name: c.conn.connects for c in self.clients} }")
        result = compare(m, fig, totals, names, labels, bytes_per_endpoint=bytes_per_endpoint, check_foreign=False,
                         forbidden_labels=forbidden_labels)
        print(result.report())
        self.vigie.assert_running()
        if result.problems:
            pytest.fail(f"{len(result.problems)} mismatches:\n" + "\n".join(result.problems), pytrace=False)


@pytest.fixture
def edge(synapse_module, vigie_module, seed):
    def make(names: list[str]) -> Edge:
        return Edge(synapse_module, vigie_module, names, seed)

    return make


def test_connection_close_on_every_request(edge):
    """`Connection: close`: a new connection per request; Synapse closes after each response."""
    e = edge(["closer"])
    c = e.client("closer", extra_headers={"Connection": "close"})
    room = e.room(c, [])
    for i in range(20):
        e.mix(c, room, i)
    assert c.conn.connects > 20
    e.check()


def test_http10_close_delimited_responses(edge):
    """HTTP/1.0: no chunking, the body ends when Synapse closes the connection."""
    e = edge(["http10"])
    c = e.client("http10", http10=True, room_id_style="encoded")
    room = e.room(c, [])
    for i in range(20):
        e.mix(c, room, i)
    e.check()


def test_two_tokens_alternating_on_one_connection(edge):
    """A reverse proxy's pooled upstream connection: consecutive requests of different users
    (one token in the header, the other in the query string) on one keep-alive connection."""
    e = edge(["proxy_a", "proxy_b"])
    a = e.client("proxy_a")
    b = e.client("proxy_b", token_in_query=True)
    room = e.room(a, [b])
    b.close()
    proxy = a
    for i in range(40):
        if i % 3 == 0:
            proxy.access_token, proxy.token_in_query = e.token("proxy_b"), True
        else:
            proxy.access_token, proxy.token_in_query = e.token("proxy_a"), False
        e.mix(proxy, room, i)
    assert proxy.conn.connects == 1
    e.check()


def test_pipelined_requests(edge):
    """HTTP/1.1 pipelining: five requests in one send before any response; Synapse answers in
    order. Every request is counted with its endpoint class and every byte reaches the token,
    but which request of a batch a byte belongs to is not known without parsing responses
    (documented in README): the agent says so in vigie_pipelined_requests_total."""
    e = edge(["pipeliner"])
    p = e.client("pipeliner", room_id_style="alternate")
    room = e.room(p, [])
    for i in range(5):
        p.pipeline([
            ("GET", f"{CLIENT_V3}/joined_rooms", "joined_rooms", None),
            ("GET", f"{CLIENT_V3}/rooms/{p._enc(room)}/members", "members", None),
            ("GET", f"{CLIENT_V3}/rooms/{p._enc(room)}/state", "state", None),
            ("GET", f"{CLIENT_V3}/rooms/{p._enc(room)}/messages", "messages", {"dir": "b", "limit": 30}),
            ("GET", f"{CLIENT_V3}/sync", "sync", {"timeout": 0}),
        ])
        p.send_message(room, f"between batches {i}")
    assert p.conn.connects == 1
    # Bytes exact per token; per endpoint class they cannot be (which request of a batch a
    # byte answers is unknown without parsing responses), so only requests are compared there.
    e.check(bytes_per_endpoint=False)
    flagged = e.vigie.scrape().total("vigie_pipelined_requests_total")
    assert flagged >= 5 * 4, f"20 requests came before the previous one was answered; flagged {flagged}"


def test_request_heads_split_across_receives(edge):
    """A slow client: request heads arrive a few bytes at a time, so the request line and the
    Authorization header (or the query's access_token) are split across many receives."""
    e = edge(["trickler", "trickler_q"])
    t = e.client("trickler")
    q = e.client("trickler_q", token_in_query=True)
    room = e.room(t, [q])
    for i in range(5):
        t.pipeline([("GET", f"{CLIENT_V3}/rooms/{room}/messages", "messages", {"dir": "b", "limit": 20})],
                   trickle=7)
        t.pipeline([("GET", f"{CLIENT_V3}/joined_rooms", "joined_rooms", None)], trickle=3)
        q.pipeline([("GET", f"{CLIENT_V3}/rooms/{room}/members", "members", None)], trickle=5)
    e.check()


def test_expect_100_continue_uploads(edge):
    """`Expect: 100-continue` (as curl sends for large bodies): Synapse writes an interim
    `HTTP/1.1 100 Continue` before the final response. Both belong to the upload."""
    e = edge(["expecter"])
    u = e.client("expecter")
    for size in (50, 300_000, 2_000_000, 1_000_000):
        u.upload(e.rng.randbytes(size), "application/octet-stream", "x.bin", expect_continue=True)
        u.joined_rooms()
    e.check()


def test_large_request_bodies(edge):
    """Upload bodies far larger than one receive, one of them full of request-like text with
    a token in it: body bytes are never request heads."""
    e = edge(["uploader"])
    u = e.client("uploader")
    for size in (300_000, 2_000_000, 70_000):
        data = e.rng.randbytes(size)
        mxc = u.upload(data, "application/octet-stream", "x.bin")
        assert u.download(mxc) == data
        u.joined_rooms()
    for _ in range(3):
        mxc = u.upload(DECOY_BODY * 50, "text/plain", "decoy.txt")
        u.download(mxc)
        u.joined_rooms()
    e.check(forbidden={"the token inside an uploaded body": DECOY_TOKEN})


def test_long_polls_that_time_out(edge):
    """Long-polls with nothing to return: the response comes seconds after the request, on a
    connection that is otherwise idle, while other requests flow on other connections."""
    e = edge(["idler", "talker"])
    idler = e.client("idler")
    talker = e.client("talker")
    room = e.room(talker, [])
    flt = idler.create_filter({"room": {"rooms": []}, "presence": {"not_types": ["*"]}})
    since = idler.sync(timeout_ms=0, filter_id=flt)["next_batch"]

    def idle_loop():
        s = since
        waited = []
        for _ in range(3):
            t0 = time.monotonic()
            s = idler.sync(since=s, timeout_ms=1500, filter_id=flt)["next_batch"]
            waited.append(time.monotonic() - t0)
        return waited

    th = Actor(idle_loop, name="idler")
    th.start()
    i = 0
    while th.is_alive():
        e.mix(talker, room, i)
        i += 1
    problems = join_actors([th], timeout=5)
    assert not problems, "\n".join(problems)
    # Each long-poll must really have been held open (nothing to return): otherwise this is
    # just another keep-alive test.
    print(f"long-polls answered after {[f'{w:.2f}' for w in th.result]} s; talker made {i} requests meanwhile")
    assert len(th.result) == 3 and min(th.result) >= 1.4, th.result
    assert i >= 3, f"the talker made {i} requests while the idler waited"
    e.check()

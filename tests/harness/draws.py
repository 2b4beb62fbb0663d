"""Randomized scrapes and legitimate heavy readers, for judging detection on traffic drawn from
ranges rather than written to pass (issue 11).

- `DrawnScrape`: a fresh login of the hijacked account pages every joined room back to its
  start. Each draw takes its parameters from ranges: pace 0-10 s between requests (even draws
  0-3 s, odd draws 3-10 s, so that a few draws cover both targets), page size 10-1000
  (log-uniform), rooms shuffled and sometimes interleaved (two or three rooms paged turn about),
  `/members` and/or `/state` after each room or not, a `/sync` long-poll kept alive beside the
  scrape or not (and, with one, half the time each room's paging started from that sync's
  `prev_batch` as Element's is), an Element user agent or a script's, and in a quarter of the
  draws each room's private read marker (`m.fully_read`) moved to its newest event when the
  room is opened, as a scraper would to dodge the *silent sync* mark (a token that writes to no
  room). The scripts send no browser headers whatever user agent they claim.
- Legitimate heavy readers, each on its own token:
  - `OneRoomExport`: a member's own Element session (its population token, user agent and
    address; its sync loop keeps going) exports the big room as Element's "Export chat" does:
    `/messages` dir=b, limit 1000, no `from` first, then following `end` to the room's start;
  - `ModerationBot`: a bot account in every room, on its own device: an initial sync, `/state`
    and `/joined_members` of every room, then a `/sync` long-poll, looking at reported events
    (`/event`, now and then `/context`) and a recent page (`/messages` from the sync's
    `prev_batch`) of a busy room;
  - `KeyBackupRestore`: a new login of a normal user: an initial full sync, the key backup
    (all at once, or room by room), then a sync loop and a few rooms' scrollback from the
    sync's `prev_batch`, as Element does after "Verify this device";
  - `BridgeReader`: a bridge-like account in every room reading everything through `/sync`
    only (an inline filter of 50 events a room, a 1-3 s long-poll), relaying a message now
    and then.

Every actor keeps counts of what it did, so that a test can assert it really did its work.
"""

from __future__ import annotations

import json
import random
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace

from .attacks import Attack, AttackStats
from .matrix import CLIENT_V3, MatrixClient, MatrixError, Recorder
from .world import ELEMENT_FILTER, ELEMENT_USER_AGENTS, Account, World, browser_headers, prev_batches, sentence

SCRIPT_AGENTS = (
    "python-requests/2.32.3",
    "python-httpx/0.28.1",
    "curl/8.11.1",
    "Go-http-client/1.1",
    "mautrix-python/0.20.6 aiohttp/3.10.10 Python/3.12.3",
    "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
)


# Issue 11's targets: a draw with pace up to 3 s is flagged within 60 s, up to 10 s within 5 min.
FAST_TARGET_S = 60.0
SLOW_TARGET_S = 300.0
# vigie's default `breadth_rooms` (docs/detection.md): a token that has read history in fewer
# rooms is a narrow reader, whose depth alone is never an alert (issue 11, requirement 1).
BREADTH_ROOMS = 3


def verdict(ttd: float | None, target: float, opened: list[float], horizon: float) -> str:
    """How a draw did against issue 11's target: "met", "narrow" or "missed".

    `ttd` is when its token reached 1.0 (None: not within `horizon`), `opened` when it
    opened each room, all in seconds from its first request.

    A draw flagged after its target that had opened `BREADTH_ROOMS` rooms by then is the
    detector's miss. One that had opened fewer was, at its target, what requirement 1 says
    must stay below 1.0 (one or two rooms, however deep): its miss is reported ("narrow"),
    and it is held to the same target counted from the room that made it broad, so that a
    scrape that stays unflagged long after reading its third room is still a miss. One never
    watched that long (its third room too close to `horizon`, or never opened) stays narrow.
    """
    if ttd is not None and ttd <= target:
        return "met"
    if rooms_by(opened, target) >= BREADTH_ROOMS:
        return "missed"
    broad = breadth_s(opened)
    if broad is None:
        return "narrow"
    deadline = broad + target
    if ttd is not None:
        return "narrow" if ttd <= deadline else "missed"
    return "narrow" if horizon < deadline else "missed"


def rooms_by(opened: list[float], seconds: float) -> int:
    """Rooms opened (times in `opened`) within `seconds`."""
    return sum(1 for s in opened if s <= seconds)


def breadth_s(opened: list[float]) -> float | None:
    """When the `BREADTH_ROOMS`-th room was opened, if one was."""
    return sorted(opened)[BREADTH_ROOMS - 1] if len(opened) >= BREADTH_ROOMS else None


def percentile(xs: list[float], q: float) -> float:
    """The `q` quantile of `xs`, by nearest rank (a draw never flagged counts as infinity)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


@dataclass(frozen=True)
class Draw:
    index: int
    pace: float  # mean seconds between requests
    limit: int
    interleave: int  # rooms paged turn about (1: one room after the other)
    after_room: tuple[str, ...]  # requests after each room's history: "members", "state"
    sync_loop: bool
    user_agent: str
    from_sync: bool = False  # with a sync loop: start each room from the sync's prev_batch, as Element does
    # Move each room's private read marker to its newest event when opening it: a write to
    # the room, which every person's client makes and a scraper makes to look attended.
    marks_read: bool = False
    # Who makes the requests: the tests' client, "nio" (harness/nio_draws.py) or "browser"
    # (harness/browser_draws.py).
    library: str = "harness"

    @property
    def element_agent(self) -> bool:
        return self.user_agent in ELEMENT_USER_AGENTS

    @property
    def target_s(self) -> float:
        return FAST_TARGET_S if self.pace <= 3.0 else SLOW_TARGET_S

    def describe(self) -> str:
        return (f"pace {self.pace:4.1f}s limit {self.limit:4d} interleave {self.interleave} "
                f"after {'+'.join(self.after_room) or '-':13} "
                f"sync {'prev' if self.from_sync else 'yes' if self.sync_loop else 'no':4} "
                f"ua {self.library if self.library != 'harness' else 'element' if self.element_agent else 'script'}"
                + (" marks read" if self.marks_read else ""))


def draw(seed: int, index: int) -> Draw:
    rng = random.Random(f"draw-{seed}-{index}")
    pace = rng.uniform(0.0, 3.0) if index % 2 == 0 else rng.uniform(3.0, 10.0)
    limit = int(round(10 ** rng.uniform(1.0, 3.0)))
    interleave = 1 if rng.random() < 0.6 else rng.choice([2, 3])
    after = rng.choice([(), (), ("members",), ("state",), ("members", "state")])
    sync_loop = rng.random() < 0.5
    ua = rng.choice(ELEMENT_USER_AGENTS) if rng.random() < 0.5 else rng.choice(SCRIPT_AGENTS)
    from_sync = sync_loop and rng.random() < 0.5  # drawn after the rest: the earlier draws stay what they were
    marks_read = rng.random() < 0.25  # drawn last, for the same reason
    return Draw(index, pace, limit, interleave, after, sync_loop, ua, from_sync, marks_read)


NIO_INDEX = 1000


def nio_draw(seed: int, index: int) -> Draw:
    """The parameters of the `index`-th matrix-nio scrape: drawn from the same ranges as
    `draw`'s (other draws: indices from `NIO_INDEX` up), with nio's own user agent."""
    return replace(draw(seed, NIO_INDEX + index), user_agent="matrix-nio (aiohttp)", library="nio")


class RoomOrder:
    """The order a drawn scrape reads rooms in, whoever makes its requests: shuffled, then
    `interleave` rooms paged turn about, each started from `start(room)` (a `prev_batch`, or
    None for the live end) when it is opened."""

    def __init__(self, rooms: list[str], rng: random.Random, interleave: int, start):
        # The same order in, the same order out: pass `World.in_build_order(rooms)`.
        self.todo = list(rooms)
        rng.shuffle(self.todo)
        self.interleave = interleave
        self.start = start
        self.open: list[list] = []  # [room, from]

    def turn(self) -> list[list]:
        """The rooms to page once each now, in order (empty when every room is read)."""
        while self.todo and len(self.open) < self.interleave:
            room = self.todo.pop()
            self.open.append([room, self.start(room)])
        return list(self.open)

    def finish(self, cur: list) -> None:
        self.open.remove(cur)


class ThirdPartyScrape:
    """What `run_draws` reads from a drawn scrape made by another client than the harness's
    (matrix-nio, a browser): the same fields `Attack` keeps."""

    prefix = "ext"

    def __init__(self, world: World, seed: int, *, params: Draw):
        self.name = f"{self.prefix}{params.index % 1000:02d}"
        self.world = world
        self.params = params
        self.seed = seed
        self.rng = random.Random(f"{self.name}-{seed}")
        self.account = world.owner
        self.stats = AttackStats()
        self.token: str | None = None
        self.t_first: float | None = None
        self.outcome = "not run"
        self.failure: str | None = None
        self.syncs = 0
        self.sync_failure: str | None = None


class DrawnScrape(Attack):
    """One drawn scrape (see the module docstring)."""

    def __init__(self, world: World, recorder: Recorder, seed: int, *, address: str, params: Draw):
        self.name = f"draw{params.index:02d}"
        self.user_agent = params.user_agent
        self.pace = (0.7 * params.pace, 1.3 * params.pace)
        super().__init__(world, recorder, seed, address=address)
        self.params = params
        self.syncs = 0
        self.sync_failure: str | None = None
        self.prev: dict[str, str] = {}
        self.first_sync = threading.Event()

    def _sync_loop(self, stop: threading.Event) -> None:
        c = self._client(self.token)
        try:
            since = None
            while not stop.is_set() and (self.t_first is None or time.monotonic() < self._deadline):
                r = c.sync(since=since, timeout_ms=0 if since is None else 30000)
                if since is None:
                    self.prev.update(prev_batches(r))
                    self.first_sync.set()
                since = r["next_batch"]
                self.syncs += 1
        except Exception:  # noqa: BLE001
            if not stop.is_set():
                self.sync_failure = traceback.format_exc(limit=2)
        finally:
            c.close()

    def run(self, stop: threading.Event, max_seconds: float = 90.0) -> None:
        done = threading.Event()
        either = _Either(stop, done)
        th = None
        if self.params.sync_loop:
            th = threading.Thread(target=self._sync_loop, args=(either,), daemon=True, name=f"{self.name}-sync")
            th.start()
        try:
            super().run(stop, max_seconds)
        finally:
            done.set()
            if th is not None:
                th.join(40)

    def _page(self, room: str, from_token: str | None) -> tuple[bool, str | None]:
        """One page of `room`; returns (more to read, next from)."""
        c = self.client
        r = self.call("messages", lambda: c.messages(room, dir="b", from_token=from_token, limit=self.params.limit))
        if r is None:
            return False, None
        chunk = r.get("chunk") or []
        opened = self.stats.page(room, len(chunk))
        if self.params.marks_read and opened and chunk and chunk[0].get("event_id"):
            self.call("read_markers", lambda: c.read_markers(room, chunk[0]["event_id"]))
        if not chunk or not r.get("end"):
            return False, None
        return True, r["end"]

    def _after(self, room: str) -> None:
        for what in self.params.after_room:
            if what == "members":
                self.list_members(room)
            else:
                self.call("state", lambda: self.client.state(room))

    def script(self) -> None:
        p = self.params
        order = RoomOrder(self.world.in_build_order(self.joined_rooms()), self.rng, p.interleave,
                          lambda room: self.prev.get(room) if p.from_sync else None)
        if p.from_sync:
            self.first_sync.wait(20)
        while turn := order.turn():
            for cur in turn:
                more, nxt = self._page(cur[0], cur[1])
                if more:
                    cur[1] = nxt
                else:
                    order.finish(cur)
                    self._after(cur[0])


class _Either:
    """A stop event set when either of two events is (the reader threads' `wait`)."""

    def __init__(self, a: threading.Event, b: threading.Event):
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.b.wait(min(left, 0.5))
        return True


# -- legitimate heavy readers ----------------------------------------------------------------------


@dataclass
class ReaderStats:
    requests: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    events: int = 0
    rooms: set = field(default_factory=set)

    def summary(self) -> str:
        return (f"{sum(self.requests.values())} requests {dict(sorted(self.requests.items()))}, "
                f"{self.events} events, {len(self.rooms)} rooms, {len(self.errors)} errors")


class Reader:
    """A legitimate heavy reader: `prepare()` gives its token, `run(stop)` works until `stop`."""

    name = "reader"
    user_agent = "vigie-tests/1"

    def __init__(self, world: World, recorder: Recorder, seed: int):
        self.world = world
        self.recorder = recorder
        self.rng = random.Random(f"{self.name}-{seed}")
        # `sync_loop` runs on a thread of its own; sharing `rng` with it would make what the
        # reader draws (rooms, pages, pauses) depend on thread timing, not on the seed.
        self.sync_rng = random.Random(f"{self.name}-sync-{seed}")
        self.stats = ReaderStats()
        self.token: str | None = None
        self.account: Account | None = None
        self.address = f"10.40.{seed % 200}.{self.rng.randint(2, 250)}"
        self.t_first: float | None = None
        self.failure: str | None = None
        self._clients: list[MatrixClient] = []

    def client(self, name: str) -> MatrixClient:
        s = self.world.synapse
        assert self.account is not None
        c = MatrixClient(s.host, s.port, self.token, user_id=self.account.user_id, recorder=self.recorder,
                         user_agent=self.user_agent, name=f"{self.name}-{name}",
                         extra_headers={**browser_headers(self.user_agent), "X-Forwarded-For": self.address})
        self._clients.append(c)
        return c

    def login(self, account: Account, device: str) -> str:
        s = self.world.synapse
        c = MatrixClient(s.host, s.port, None, user_id=account.user_id, recorder=self.recorder,
                         user_agent=self.user_agent, name=f"{self.name}-login",
                         extra_headers={**browser_headers(self.user_agent), "X-Forwarded-For": self.address})
        try:
            return c.login(account.name, account.password, device_id=device)["access_token"]
        finally:
            c.close()

    def call(self, what: str, fn):
        if self.t_first is None:
            self.t_first = time.monotonic()
        self.stats.requests[what] += 1
        try:
            return fn()
        except MatrixError as e:
            self.stats.errors.append(f"{what}: {e}"[:200])
            return None

    def run(self, stop: threading.Event) -> None:
        try:
            self.script(stop)
        except Exception:  # noqa: BLE001
            if not stop.is_set():
                self.failure = traceback.format_exc()
        finally:
            for c in self._clients:
                c.close()

    def script(self, stop: threading.Event) -> None:
        raise NotImplementedError

    def busy(self) -> bool:
        """Whether it still has work it means to finish before it is stopped."""
        return False

    def sync_loop(self, stop: threading.Event, c: MatrixClient, since: str | None, filter_id: str | None,
                  timeout: tuple[int, int] = (2000, 10000), on=None) -> None:
        while not stop.is_set():
            r = self.call("sync", lambda: c.sync(since=since, timeout_ms=self.sync_rng.randint(*timeout),
                                                 filter_id=filter_id))
            if r is None:
                stop.wait(1.0)
                continue
            since = r["next_batch"]
            if on:
                on(r)

    def problems(self) -> list[str]:
        """What shows the reader did not do its work."""
        p = [f"{self.name}: {e}" for e in self.stats.errors[:3]]
        if self.failure:
            p.append(f"{self.name}: failed: {self.failure.strip().splitlines()[-1]}")
        return p


def _timelines(r: dict) -> dict[str, dict]:
    return (r or {}).get("rooms", {}).get("join") or {}


class OneRoomExport(Reader):
    name = "one_room_export"

    def prepare(self) -> str:
        room = self.world.big_room
        assert room, "the world has no big room to export"
        self.room = room
        self.account = next(a for a in self.world.normal if room in a.rooms)
        self.user_agent = self.account.user_agent
        self.address = self.account.address
        self.token = self.account.token  # the member's own Element session
        self.delay = self.rng.uniform(20.0, 60.0)
        self.pages = 0
        self.reached_start = False
        return self.token

    def script(self, stop: threading.Event) -> None:
        if stop.wait(self.delay):
            return
        c = self.client("export")
        from_token = None
        while not stop.is_set():
            r = self.call("messages", lambda: c.messages(self.room, dir="b", from_token=from_token, limit=1000))
            if r is None:
                return
            chunk = r.get("chunk") or []
            self.pages += 1
            self.stats.events += len(chunk)
            self.stats.rooms.add(self.room)
            if not chunk or not r.get("end"):
                self.reached_start = True
                return
            from_token = r["end"]

    def problems(self) -> list[str]:
        p = super().problems()
        want = self.world.messages.get(self.room, 0)
        if not self.reached_start or self.stats.events < want:
            p.append(f"{self.name}: {self.pages} pages, {self.stats.events} events of {want}, "
                     f"start reached: {self.reached_start}")
        return p


class ModerationBot(Reader):
    name = "moderation_bot"
    user_agent = "Draupnir/2.0.1 matrix-bot-sdk/0.7.1"

    def prepare(self) -> str:
        self.account = self.world.extras["modbot"]
        self.token = self.login(self.account, f"MODBOT{self.rng.randrange(10**6)}")
        self.prev: dict[str, str] = {}
        self.latest: dict[str, list[str]] = {}
        return self.token

    def _harvest(self, r: dict) -> None:
        for room_id, room in _timelines(r).items():
            tl = room.get("timeline") or {}
            if tl.get("prev_batch"):
                self.prev[room_id] = tl["prev_batch"]
            ids = [e["event_id"] for e in tl.get("events") or [] if "event_id" in e]
            if ids:
                self.latest.setdefault(room_id, []).extend(ids)
                self.latest[room_id] = self.latest[room_id][-20:]

    def script(self, stop: threading.Event) -> None:
        c = self.client("main")
        s = self.client("sync")
        flt = {"room": {"timeline": {"limit": 50}, "state": {"lazy_load_members": True}}}
        filter_id = self.call("filter", lambda: c.create_filter(flt))
        r = self.call("initial_sync", lambda: s.sync(filter_id=filter_id, timeout_ms=0))
        if r is None:
            return
        self._harvest(r)
        since = r["next_batch"]
        rooms = self.call("joined_rooms", c.joined_rooms) or []
        for room in rooms:  # protections load every protected room's state and members
            if stop.is_set():
                return
            self.call("state", lambda: c.state(room))
            self.call("members", lambda: c.request("GET", f"{CLIENT_V3}/rooms/{c._enc(room)}/joined_members",
                                                   "members").json())
            self.stats.rooms.add(room)
        th = threading.Thread(target=self.sync_loop, args=(stop, s, since, filter_id, (10000, 30000),
                                                            self._harvest), daemon=True)
        th.start()
        while not stop.wait(self.rng.uniform(15.0, 45.0)):
            room = self.rng.choice(rooms)
            ids = self.latest.get(room) or []
            roll = self.rng.random()
            if ids and roll < 0.5:  # a report: look at the event
                self.call("event", lambda: c.event(room, self.rng.choice(ids)))
            elif ids and roll < 0.65:
                self.call("context", lambda: c.context(room, self.rng.choice(ids), limit=5))
            elif self.prev.get(room):  # a burst in a room: the recent page, from the sync's prev_batch
                r = self.call("messages", lambda: c.messages(room, dir="b", from_token=self.prev[room], limit=25))
                self.stats.events += len((r or {}).get("chunk") or [])
        th.join(40)

    def problems(self) -> list[str]:
        p = super().problems()
        if self.stats.requests["state"] < len(self.world.rooms) or self.stats.requests["sync"] < 3:
            p.append(f"{self.name}: did not do its work: {self.stats.summary()}")
        return p


class KeyBackupRestore(Reader):
    name = "key_backup_restore"

    def prepare(self) -> str:
        rooms_of = sorted(self.world.normal, key=lambda a: -len(a.rooms))
        self.account = self.rng.choice(rooms_of[:4])
        self.user_agent = self.account.user_agent
        self.address = self.account.address
        # The backup the new device restores, made by another of the user's devices beforehand.
        setup_token = self.login(self.account, f"OLD{self.rng.randrange(10**6)}")
        s = self.world.synapse
        c = MatrixClient(s.host, s.port, setup_token, user_id=self.account.user_id, recorder=self.recorder,
                         user_agent=self.user_agent, name=f"{self.name}-setup")
        try:
            self.version = c.request("POST", f"{CLIENT_V3}/room_keys/version", "room_keys", json_body={
                "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2",
                "auth_data": {"public_key": "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo"}}).json()["version"]
            sessions = {}
            for room in self.account.rooms:
                sessions[room] = {"sessions": {f"s{room[1:9]}{i}": {
                    "first_message_index": 0, "forwarded_count": 0, "is_verified": True,
                    "session_data": {"ephemeral": "x" * 43, "ciphertext": "y" * 400, "mac": "z" * 11}}
                    for i in range(self.rng.randint(5, 40))}}
            c.request("PUT", f"{CLIENT_V3}/room_keys/keys", "room_keys", query={"version": self.version},
                      json_body={"rooms": sessions})
        finally:
            c.close()
        self.per_room = self.rng.random() < 0.5
        self.token = self.login(self.account, f"NEW{self.rng.randrange(10**6)}")
        self.delay = self.rng.uniform(5.0, 40.0)
        return self.token

    def script(self, stop: threading.Event) -> None:
        if stop.wait(self.delay):
            return
        c = self.client("main")
        s = self.client("sync")
        filter_id = self.call("filter", lambda: c.create_filter(ELEMENT_FILTER))
        r = self.call("initial_sync", lambda: s.sync(filter_id=filter_id, timeout_ms=0))
        if r is None:
            return
        prev = {k: (v.get("timeline") or {}).get("prev_batch") for k, v in _timelines(r).items()}
        self.call("room_keys", c.room_keys_version)
        keys = 0
        if self.per_room:
            for room in self.account.rooms:
                got = self.call("room_keys", lambda: c.request(
                    "GET", f"{CLIENT_V3}/room_keys/keys/{c._enc(room)}", "room_keys",
                    query={"version": self.version}).json())
                keys += len((got or {}).get("sessions") or {})
        else:
            got = self.call("room_keys", lambda: c.request("GET", f"{CLIENT_V3}/room_keys/keys", "room_keys",
                                                           query={"version": self.version}).json())
            keys = sum(len(v.get("sessions") or {}) for v in ((got or {}).get("rooms") or {}).values())
        self.keys = keys
        th = threading.Thread(target=self.sync_loop, args=(stop, s, r["next_batch"], filter_id), daemon=True)
        th.start()
        # Catching up: the rooms now readable, a few pages back each, a person's pace.
        for room in self.rng.sample(self.account.rooms, k=min(len(self.account.rooms), self.rng.randint(2, 4))):
            frm = prev.get(room)
            for _ in range(self.rng.randint(1, 3)):
                if stop.wait(self.rng.uniform(3.0, 12.0)) or not frm:
                    break
                lim = self.rng.randint(20, 50)
                page = self.call("messages", lambda: c.messages(room, dir="b", from_token=frm, limit=lim))
                self.stats.events += len((page or {}).get("chunk") or [])
                self.stats.rooms.add(room)
                frm = (page or {}).get("end")
        stop.wait()
        th.join(15)

    def problems(self) -> list[str]:
        p = super().problems()
        if getattr(self, "keys", 0) < 1 or self.stats.requests["initial_sync"] < 1:
            p.append(f"{self.name}: restored {getattr(self, 'keys', 0)} keys: {self.stats.summary()}")
        return p


class BridgeReader(Reader):
    name = "bridge_reader"
    user_agent = "mautrix-whatsapp/0.11.2 mautrix-go/0.22.1"

    def prepare(self) -> str:
        self.account = self.world.extras["bridge"]
        self.token = self.login(self.account, f"BRIDGE{self.rng.randrange(10**6)}")
        self.sync_events = 0
        return self.token

    def _count(self, r: dict) -> None:
        for room in _timelines(r).values():
            n = len((room.get("timeline") or {}).get("events") or [])
            self.sync_events += n
            self.stats.events += n

    def script(self, stop: threading.Event) -> None:
        c = self.client("main")
        s = self.client("sync")
        inline = json.dumps({"room": {"timeline": {"limit": 50}}, "presence": {"not_types": ["*"]}})
        r = self.call("initial_sync", lambda: s.sync(filter_id=inline, timeout_ms=0))
        if r is None:
            return
        self._count(r)
        th = threading.Thread(target=self.sync_loop, args=(stop, s, r["next_batch"], inline, (1000, 3000),
                                                            self._count), daemon=True)
        th.start()
        rooms = list(self.account.rooms)
        while not stop.wait(self.rng.uniform(20.0, 60.0)):  # a message from the other side
            room = self.rng.choice(rooms)
            self.call("send", lambda: c.send_message(room, sentence(self.rng, 2, 12)))
        th.join(10)

    def problems(self) -> list[str]:
        p = super().problems()
        if self.stats.requests["sync"] < 10 or self.sync_events < 1:
            p.append(f"{self.name}: {self.sync_events} events through sync: {self.stats.summary()}")
        return p


READERS = (OneRoomExport, ModerationBot, KeyBackupRestore, BridgeReader)

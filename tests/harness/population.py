"""Normal traffic for the detection tests: Element-like sessions of the world's accounts.

Each account runs one Element session (its access token) with two keep-alive connections, as
Element does: one for the `/sync` long-poll (with `since`, a 2-10 s timeout instead of
Element's 30 s so that the test moves), one for everything else:

- a message every 10-60 s (sometimes preceded by a typing notification, rarely an image or
  file upload instead), in the room the user is "in";
- now and then the user enters another room: a read receipt, and occasionally 1-2 pages of
  scrollback (`/messages` dir=b, limit 20-50), rarely the member list, occasionally the
  thumbnail or download of a recent media item of that room;
- a read receipt when the sync brings new events into the current room; a `/keys/query` now
  and then.

The heavy user sends about five times as often, switches rooms more, scrolls back 3-5 pages,
uploads and downloads media and searches once in a while: heavy, but what a person does in
Element. Everything goes through one shared `Recorder`.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

from .matrix import MatrixClient, MatrixError, Recorder
from .world import Account, MediaItem, World, browser_headers, noise_png, post_media, prev_batches, sentence, WORDS


@dataclass(frozen=True)
class Profile:
    send_every: tuple[float, float]
    switch_every: tuple[float, float]  # seconds between entering rooms
    scrollback_p: float  # on entering a room
    scrollback_pages: tuple[int, int]
    page_limit: tuple[int, int]
    members_p: float
    media_p: float  # on entering a room: look at a recent media item of it
    full_download_p: float  # ...downloading it rather than its thumbnail (images)
    upload_p: float  # a send is an upload instead
    upload_every: tuple[float, float] | None
    download_every: tuple[float, float] | None
    search_every: tuple[float, float] | None
    typing_p: float = 0.5
    keys_every: tuple[float, float] = (120.0, 400.0)
    sync_timeout_ms: tuple[int, int] = (2000, 10000)
    cold_start_p: float = 0.15  # the session starts with an initial sync (Element just opened)


NORMAL = Profile(
    send_every=(10.0, 60.0), switch_every=(40.0, 150.0), scrollback_p=0.35, scrollback_pages=(1, 2),
    page_limit=(20, 50), members_p=0.05, media_p=0.15, full_download_p=0.3, upload_p=0.03,
    upload_every=None, download_every=None, search_every=None,
)
HEAVY = Profile(
    send_every=(2.0, 12.0), switch_every=(12.0, 40.0), scrollback_p=0.8, scrollback_pages=(3, 5),
    page_limit=(20, 50), members_p=0.1, media_p=0.4, full_download_p=0.6, upload_p=0.0,
    upload_every=(45.0, 120.0), download_every=(25.0, 70.0), search_every=(60.0, 180.0),
)


@dataclass
class SessionStats:
    syncs: int = 0
    full_syncs: int = 0
    sync_events: int = 0
    actions: Counter = field(default_factory=Counter)


class ElementSession:
    def __init__(self, pop: "Population", account: Account, profile: Profile, rng: random.Random):
        self.pop = pop
        self.a = account
        self.p = profile
        self.rng = rng
        # The sync loop runs on its own thread: drawing from `rng` there too would make the
        # session's actions depend on how the two threads happen to interleave.
        self.sync_rng = random.Random(rng.random())
        self.address = account.address
        w = pop.world
        common = dict(user_id=account.user_id, recorder=pop.recorder, user_agent=account.user_agent)
        headers = {**browser_headers(account.user_agent), "X-Forwarded-For": self.address}
        self.sync = MatrixClient(w.synapse.host, w.synapse.port, account.token, name=f"{account.name}-sync",
                                 extra_headers=dict(headers), **common)
        self.act = MatrixClient(w.synapse.host, w.synapse.port, account.token, name=f"{account.name}-act",
                                extra_headers=dict(headers), **common)
        self.current = rng.choice(account.rooms)
        self.lock = threading.Lock()
        self.latest: dict[str, str] = {}  # room -> latest event id seen
        self.recent_media: dict[str, list[MediaItem]] = {}
        self.unread = False
        self.stats = SessionStats()
        for m in w.media_snapshot():
            if m.room in account.rooms:
                self.recent_media.setdefault(m.room, []).append(m)

    # -- helpers ------------------------------------------------------------------------------
    def move(self, address: str) -> None:
        """The device changes network (wifi to 4G): a new X-Forwarded-For on both connections."""
        self.address = address
        self.sync.extra_headers["X-Forwarded-For"] = address
        self.act.extra_headers["X-Forwarded-For"] = address

    def _harvest(self, r: dict) -> None:
        by_mxc = None
        with self.lock:
            self.a.prev_batch.update(prev_batches(r))
            for room_id, room in (r.get("rooms", {}).get("join") or {}).items():
                events = room.get("timeline", {}).get("events", [])
                if not events:
                    continue
                self.stats.sync_events += len(events)
                self.latest[room_id] = events[-1]["event_id"]
                if room_id == self.current:
                    self.unread = True
                for e in events:
                    url = (e.get("content") or {}).get("url")
                    if isinstance(url, str) and url.startswith("mxc://"):
                        by_mxc = by_mxc or self.pop.world.by_mxc()
                        item = by_mxc.get(url)
                        if item is not None:
                            lst = self.recent_media.setdefault(room_id, [])
                            if item not in lst:
                                lst.append(item)

    # -- loops --------------------------------------------------------------------------------
    def sync_loop(self) -> None:
        a, rng, stop = self.a, self.sync_rng, self.pop.stop
        if a.since is None or rng.random() < self.p.cold_start_p:
            r = self.pop.call(self, "initial_sync", lambda: self.sync.sync(filter_id=a.filter_id, timeout_ms=0))
            self.stats.full_syncs += 1
            if r:
                a.since = r["next_batch"]
                self._harvest(r)
        while not stop.is_set():
            r = self.pop.call(self, "sync", lambda: self.sync.sync(
                since=a.since, timeout_ms=rng.randint(*self.p.sync_timeout_ms), filter_id=a.filter_id))
            if r is None:
                stop.wait(1.0)
                continue
            self.stats.syncs += 1
            a.since = r["next_batch"]
            self._harvest(r)

    def act_loop(self) -> None:
        p, rng, stop = self.p, self.rng, self.pop.stop
        now = time.monotonic()
        due = {
            "send": now + rng.uniform(0, p.send_every[1]),
            "switch": now + rng.uniform(0, p.switch_every[1]),
            "keys": now + rng.uniform(*p.keys_every),
            "receipt": now + 2.0,
        }
        for name, every in (("upload", p.upload_every), ("download", p.download_every), ("search", p.search_every)):
            if every:
                due[name] = now + rng.uniform(every[0] / 2, every[1])
        while True:
            what = min(due, key=due.get)
            if stop.wait(max(0.0, due[what] - time.monotonic())):
                return
            if what == "send":
                if rng.random() < p.upload_p:
                    self.upload()
                else:
                    self.send()
                due[what] = time.monotonic() + rng.uniform(*p.send_every)
            elif what == "switch":
                self.enter_room()
                due[what] = time.monotonic() + rng.uniform(*p.switch_every)
            elif what == "receipt":
                self.receipt_if_unread()
                due[what] = time.monotonic() + rng.uniform(3.0, 8.0)
            elif what == "keys":
                self.keys()
                due[what] = time.monotonic() + rng.uniform(*p.keys_every)
            elif what == "upload":
                self.upload()
                due[what] = time.monotonic() + rng.uniform(*p.upload_every)
            elif what == "download":
                self.look_at_media(self.current, full=True)
                due[what] = time.monotonic() + rng.uniform(*p.download_every)
            elif what == "search":
                self.search()
                due[what] = time.monotonic() + rng.uniform(*p.search_every)

    # -- actions ------------------------------------------------------------------------------
    def send(self) -> None:
        c, rng = self.act, self.rng
        room = self.current
        if rng.random() < self.p.typing_p:
            self.pop.call(self, "typing", lambda: c.typing(room, True, 30000))
        text = sentence(rng, 1, 25)
        eid = self.pop.call(self, "send", lambda: c.send_message(room, text))
        if eid:
            with self.lock:
                self.latest[room] = eid

    def enter_room(self) -> None:
        c, rng, p = self.act, self.rng, self.p
        others = [r for r in self.a.rooms if r != self.current] or self.a.rooms
        room = self.current = rng.choice(others)
        with self.lock:
            ev = self.latest.get(room)
        if ev:
            self.pop.call(self, "receipt", lambda: c.read_receipt(room, ev))
        if rng.random() < p.scrollback_p:
            # Element scrolls back from its timeline: the latest sync's prev_batch for the room.
            with self.lock:
                from_token = self.a.prev_batch.get(room)
            for _ in range(rng.randint(*p.scrollback_pages)):
                limit = rng.randint(*p.page_limit)
                r = self.pop.call(self, "messages", lambda: c.messages(room, dir="b", from_token=from_token,
                                                                      limit=limit))
                if not r or not r.get("chunk") or not r.get("end"):
                    break
                from_token = r["end"]
        if rng.random() < p.members_p:
            self.pop.call(self, "members", lambda: c.members(room))
        if rng.random() < p.media_p:
            self.look_at_media(room)

    def look_at_media(self, room: str, full: bool = False) -> None:
        c, rng = self.act, self.rng
        with self.lock:
            items = list(self.recent_media.get(room, []))[-8:]
        if not items:
            return
        m = rng.choice(items)
        if m.image and not full and rng.random() >= self.p.full_download_p:
            self.pop.call(self, "thumbnail", lambda: c.thumbnail(m.mxc, 800, 600, "scale"))
            return
        data = self.pop.call(self, "download", lambda: c.download(m.mxc))
        if data is not None and hashlib.sha256(data).hexdigest() != m.sha256:
            self.pop.fail(self, f"download of {m.mxc}: {len(data)} bytes, not the {m.size} uploaded")

    def upload(self) -> None:
        c, rng = self.act, self.rng
        room = self.current
        if rng.random() < 0.6:
            data = noise_png(rng, rng.randint(80, 300))
            ctype, fname, image = "image/png", f"IMG_{rng.randrange(10**4):04d}.png", True
        else:
            data = rng.randbytes(rng.randint(20_000, 300_000))
            ctype, fname, image = "application/pdf", f"{rng.choice(WORDS)}.pdf", False
        mxc = self.pop.call(self, "upload", lambda: c.upload(data, ctype, fname))
        if not mxc:
            return
        self.pop.call(self, "send", lambda: post_media(c, room, mxc, fname, ctype, len(data), image))
        self.pop.world.add_media(MediaItem(mxc, len(data), hashlib.sha256(data).hexdigest(), ctype, room,
                                           image, self.a.user_id))

    def receipt_if_unread(self) -> None:
        with self.lock:
            room, ev, unread = self.current, self.latest.get(self.current), self.unread
            self.unread = False
        if unread and ev:
            self.pop.call(self, "receipt", lambda: self.act.read_receipt(room, ev))

    def keys(self) -> None:
        rng = self.rng
        others = rng.sample(self.pop.world.members[self.current], k=min(4, len(self.pop.world.members[self.current])))
        self.pop.call(self, "keys", lambda: self.act.keys_query(others))

    def search(self) -> None:
        rng = self.rng
        term = rng.choice(WORDS)
        rooms = [self.current] if rng.random() < 0.5 else None
        self.pop.call(self, "search", lambda: self.act.search(term, rooms=rooms))

    def close(self) -> None:
        self.sync.close()
        self.act.close()


class Population:
    """Every account's Element session, running until `stop()`."""

    def __init__(self, world: World, seed: int, recorder: Recorder | None = None):
        self.world = world
        self.seed = seed
        self.recorder = recorder or Recorder()
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.errors: Counter = Counter()  # (action, status) -> count
        self._lock = threading.Lock()
        self.sessions: list[ElementSession] = []
        self.threads: list[threading.Thread] = []
        self.started = 0.0
        self.stopped = 0.0
        rng = random.Random(f"population-{seed}")
        for a in world.accounts:
            profile = HEAVY if a.role == "heavy" else NORMAL
            self.sessions.append(ElementSession(self, a, profile, random.Random(rng.random())))
        # One normal user's phone goes from wifi to 4G some time into the run.
        self.mover = rng.choice([s for s in self.sessions if s.a.role == "normal"])
        self.move_after = rng.uniform(100.0, 250.0)

    def session(self, account: Account) -> ElementSession:
        return next(s for s in self.sessions if s.a is account)

    @property
    def tokens(self) -> dict[str, Account]:
        return {s.a.token: s.a for s in self.sessions}

    def call(self, s: ElementSession, action: str, fn):
        """Run one client call; Matrix errors are counted, anything else is a failure."""
        s.stats.actions[action] += 1
        try:
            return fn()
        except MatrixError as e:
            with self._lock:
                self.errors[(action, e.status)] += 1
            return None
        except Exception:  # noqa: BLE001 - transport errors fail the run, the loop goes on
            self.fail(s, f"{action}: {traceback.format_exc(limit=3)}")
            self.stop.wait(1.0)
            return None

    def fail(self, s: ElementSession, what: str) -> None:
        with self._lock:
            self.failures.append(f"{s.a.label}: {what}")

    def _guard(self, s: ElementSession, fn) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001
            self.fail(s, f"loop died: {traceback.format_exc()}")

    def _mover(self) -> None:
        if not self.stop.wait(self.move_after):
            self.mover.move(f"100.{64 + self.seed % 60}.{self.mover.a.index}.{random.Random(self.seed).randint(2, 250)}")

    def start(self) -> None:
        self.stop.clear()
        self.started = time.monotonic()
        for s in self.sessions:
            for role, fn in (("sync", s.sync_loop), ("act", s.act_loop)):
                t = threading.Thread(target=self._guard, args=(s, fn), name=f"{s.a.name}-{role}", daemon=True)
                self.threads.append(t)
        self.threads.append(threading.Thread(target=self._mover, name="mover", daemon=True))
        for t in self.threads:
            t.start()

    def stop_all(self, timeout: float = 30.0) -> list[str]:
        """Stop every loop and wait for them; returns the names of loops still running."""
        self.stop.set()
        self.stopped = time.monotonic()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        for s in self.sessions:
            s.close()
        return [t.name for t in self.threads if t.is_alive()]

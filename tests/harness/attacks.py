"""Bulk-read attacks for the detection tests, each a script on its own access token.

- `fast_scrape`: a fresh login of the hijacked account pages `/messages` backwards with a
  large limit through every joined room, to the start of each, and lists its members;
- `slow_scrape`: the same, throttled to one request every few seconds;
- `stolen_token`: the victim's own token, replayed by a script (another User-Agent, another
  X-Forwarded-For) while the victim's Element keeps going: it pages the victim's rooms and
  downloads the media it finds in them;
- `context_walk`: a fresh login takes each room's latest event from one sync, then walks
  `/context/{event}` with a large limit back to the room's start, room after room;
- `media_spree`: a fresh login downloads every media item through
  `/_matrix/client/v1/media/download`, checking each one's size and hash;
- `search_sweep`: a fresh login searches for one term after another, paging some results.

`Attack.run()` performs the script until `stop` is set (detection), `max_seconds` have
passed since its first request, or it runs out of work, and keeps what it saw for checks:
statuses, pages and events received, media verified, search hits.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .matrix import CLIENT_V3, MatrixClient, MatrixError, Recorder
from .world import WORDS, Account, World


class _Stop(Exception):
    pass


@dataclass
class AttackStats:
    requests: Counter = field(default_factory=Counter)  # endpoint -> requests
    statuses: Counter = field(default_factory=Counter)  # status -> requests
    errors: list[str] = field(default_factory=list)
    rooms: set = field(default_factory=set)
    # When each room's first page was answered (monotonic), in the order rooms were opened.
    opened_at: list = field(default_factory=list)
    pages: int = 0
    empty_pages: int = 0
    events: int = 0
    members_lists: int = 0
    contexts: int = 0
    media_ok: int = 0
    media_bad: list[str] = field(default_factory=list)
    media_bytes: int = 0
    searches: int = 0
    search_terms: int = 0
    search_terms_with_hits: int = 0
    search_results: int = 0

    def page(self, room: str, events: int) -> bool:
        """Count one `/messages` page of `events` events from `room`; whether it opened the room."""
        opened = room not in self.rooms
        if opened:
            self.rooms.add(room)
            self.opened_at.append(time.monotonic())
        self.pages += 1
        self.events += events
        if not events:
            self.empty_pages += 1
        return opened

    def summary(self) -> str:
        parts = [f"{sum(self.requests.values())} requests " + str(dict(sorted(self.requests.items())))]
        parts.append(f"statuses {dict(sorted(self.statuses.items()))}")
        if self.pages:
            parts.append(f"{self.pages} pages ({self.empty_pages} empty) with {self.events} events from "
                         f"{len(self.rooms)} rooms")
        if self.members_lists:
            parts.append(f"{self.members_lists} member lists")
        if self.contexts:
            parts.append(f"{self.contexts} contexts with {self.events} events from {len(self.rooms)} rooms")
        if self.media_ok or self.media_bad:
            parts.append(f"{self.media_ok} media verified ({self.media_bytes / 1e6:.1f} MB), "
                         f"{len(self.media_bad)} bad")
        if self.searches:
            parts.append(f"{self.searches} searches for {self.search_terms} terms, {self.search_terms_with_hits} "
                         f"with hits, {self.search_results} results")
        return "; ".join(parts)


class Attack:
    """One attack script. Subclasses implement `script()`, calling `self.call()` for every
    request with the token."""

    name = "attack"
    description = ""
    user_agent = "python-requests/2.32.3"
    pace: tuple[float, float] = (0.0, 0.0)  # pause between requests

    def __init__(self, world: World, recorder: Recorder, seed: int, *, address: str):
        self.world = world
        self.recorder = recorder
        self.rng = random.Random(f"{self.name}-{seed}")
        self.address = address
        self.account: Account = world.owner
        self.token: str | None = None
        self.client: MatrixClient | None = None
        self.stats = AttackStats()
        self.t_first: float | None = None  # monotonic time of the first request with the token
        self.wall_first: float | None = None
        self.t_last: float | None = None
        self.outcome = "not run"
        self.failure: str | None = None
        self._next_at = 0.0
        self._stop: threading.Event | None = None
        self._deadline = 0.0

    # -- setup ------------------------------------------------------------------------------
    def _client(self, token: str | None) -> MatrixClient:
        s = self.world.synapse
        return MatrixClient(s.host, s.port, token, user_id=self.account.user_id, recorder=self.recorder,
                            user_agent=self.user_agent, name=self.name,
                            extra_headers={"X-Forwarded-For": self.address})

    def prepare(self) -> str:
        """Get the token (default: a fresh password login to the hijacked account, an
        anonymous request). Returns the token."""
        c = self._client(None)
        r = c.login(self.account.name, self.account.password)
        c.access_token = r["access_token"]
        self.client = c
        self.token = r["access_token"]
        return self.token

    # -- running ----------------------------------------------------------------------------
    def call(self, endpoint: str, fn: Callable[[], object], ok_statuses: tuple[int, ...] = (200,)):
        """One request of the script: honours the pace, the stop event and the deadline."""
        assert self._stop is not None
        if self._stop.is_set():
            raise _Stop("detected")
        now = time.monotonic()
        if self.t_first is not None:
            if now >= self._deadline:
                raise _Stop("deadline")
            wait = self._next_at - now
            if wait > 0 and self._stop.wait(min(wait, max(0.0, self._deadline - now))):
                raise _Stop("detected")
            if time.monotonic() >= self._deadline:
                raise _Stop("deadline")
        else:
            self.t_first = time.monotonic()
            self.wall_first = time.time()
            self._deadline = self.t_first + self.max_seconds
        self.stats.requests[endpoint] += 1
        try:
            out = fn()
            self.stats.statuses[200] += 1
        except MatrixError as e:
            self.stats.statuses[e.status] += 1
            if e.status not in ok_statuses:
                self.stats.errors.append(str(e)[:300])
            out = None
        self.t_last = time.monotonic()
        self._next_at = self.t_last + self.rng.uniform(*self.pace)
        return out

    def run(self, stop: threading.Event, max_seconds: float = 90.0) -> None:
        assert self.client is not None, "prepare() first"
        self._stop = stop
        self.max_seconds = max_seconds
        try:
            self.script()
            self.outcome = "exhausted"
        except _Stop as s:
            self.outcome = str(s)
        except Exception:  # noqa: BLE001
            self.outcome = "error"
            self.failure = traceback.format_exc()
        finally:
            self.client.close()

    def script(self) -> None:
        raise NotImplementedError

    # -- building blocks --------------------------------------------------------------------
    def joined_rooms(self) -> list[str]:
        r = self.call("joined_rooms", self.client.joined_rooms)
        return list(r or [])

    def page_room(self, room: str, limit: int, media_found: list[str] | None = None) -> None:
        """/messages dir=b from the end of the room to its start."""
        c = self.client
        from_token = None
        while True:
            r = self.call("messages", lambda: c.messages(room, dir="b", from_token=from_token, limit=limit))
            if r is None:
                return
            chunk = r.get("chunk") or []
            self.stats.page(room, len(chunk))
            if media_found is not None:
                for e in chunk:
                    url = (e.get("content") or {}).get("url")
                    if isinstance(url, str) and url.startswith("mxc://") and url not in media_found:
                        media_found.append(url)
            if not chunk or not r.get("end"):
                return
            from_token = r["end"]

    def list_members(self, room: str) -> None:
        r = self.call("members", lambda: self.client.members(room))
        if r is not None and r.get("chunk"):
            self.stats.members_lists += 1

    def download(self, mxc: str) -> None:
        item = self.world.by_mxc().get(mxc)
        data = self.call("media_download", lambda: self.client.download(mxc))
        if data is None:
            self.stats.media_bad.append(f"{mxc}: error")
        elif item is not None and (len(data) != item.size or hashlib.sha256(data).hexdigest() != item.sha256):
            self.stats.media_bad.append(f"{mxc}: {len(data)} bytes, {item.size} uploaded")
        else:
            self.stats.media_ok += 1
            self.stats.media_bytes += len(data)


class FastScrape(Attack):
    name = "fast_scrape"
    description = "fresh login pages /messages back through every joined room, lists members"
    user_agent = "mautrix-python/0.20.6 aiohttp/3.10.10 Python/3.12.3"
    pace = (0.0, 0.05)

    def limit(self) -> int:
        return self.rng.choice([200, 250, 500, 1000])

    def script(self) -> None:
        limit = self.limit()
        self.description += f" (limit {limit})"
        for room in self.joined_rooms():
            self.page_room(room, limit)
            self.list_members(room)


class SlowScrape(FastScrape):
    name = "slow_scrape"
    description = "the same, one request every 2.5-4.5 s"
    user_agent = "python-requests/2.32.3"
    pace = (2.5, 4.5)

    def limit(self) -> int:
        return self.rng.choice([100, 200, 250])


class StolenToken(Attack):
    name = "stolen_token"
    description = "the victim's token replayed by a script while the victim works: pages its rooms, gets their media"
    user_agent = "python-httpx/0.28.1"
    pace = (0.1, 0.6)

    def __init__(self, world: World, recorder: Recorder, seed: int, *, address: str, victim: Account):
        super().__init__(world, recorder, seed, address=address)
        self.account = victim

    def prepare(self) -> str:
        self.token = self.account.token
        self.client = self._client(self.token)
        return self.token

    def script(self) -> None:
        limit = self.rng.choice([100, 200, 500])
        self.description += f" (limit {limit})"
        media: list[str] = []
        for room in self.joined_rooms():
            self.page_room(room, limit, media_found=media)
            self.list_members(room)
        for mxc in media:
            self.download(mxc)


class ContextWalk(Attack):
    name = "context_walk"
    description = "fresh login, one sync for each room's latest event, /context walks back through every room"
    user_agent = "curl/8.11.1"
    pace = (0.05, 0.4)

    def script(self) -> None:
        c = self.client
        limit = self.rng.choice([100, 200, 300])
        self.description += f" (limit {limit})"
        inline = json.dumps({"room": {"timeline": {"limit": 1}}, "presence": {"not_types": ["*"]}})
        r = self.call("sync", lambda: c.sync(filter_id=inline, timeout_ms=0))
        start = {}
        for room_id, room in ((r or {}).get("rooms", {}).get("join") or {}).items():
            events = room.get("timeline", {}).get("events") or []
            if events:
                start[room_id] = events[-1]["event_id"]
        for room, event_id in start.items():
            while event_id:
                ctx = self.call("context", lambda: c.context(room, event_id, limit=limit))
                if ctx is None:
                    break
                before = ctx.get("events_before") or []
                after = ctx.get("events_after") or []
                self.stats.contexts += 1
                self.stats.events += len(before) + len(after) + (1 if ctx.get("event") else 0)
                self.stats.rooms.add(room)
                # events_before is newest first: hop to the oldest one.
                event_id = before[-1]["event_id"] if before else None


class MediaSpree(Attack):
    name = "media_spree"
    description = "fresh login downloads every media item through /_matrix/client/v1/media/download"
    user_agent = "Wget/1.25.0"
    pace = (0.02, 0.25)

    def script(self) -> None:
        items = [m.mxc for m in self.world.media_snapshot()]
        self.rng.shuffle(items)
        self.description += f" ({len(items)} items)"
        for mxc in items:
            self.download(mxc)


class SearchSweep(Attack):
    name = "search_sweep"
    description = "fresh login searches term after term, paging some results"
    user_agent = "Python/3.12 aiohttp/3.11.11"
    pace = (0.2, 0.8)

    def terms(self) -> Iterator[str]:
        words = list(WORDS)
        self.rng.shuffle(words)
        yield from words
        while True:
            yield " ".join(self.rng.sample(WORDS, 2))

    def script(self) -> None:
        c = self.client
        for term in self.terms():
            body = {"search_categories": {"room_events": {
                "search_term": term, "keys": ["content.body"], "order_by": "recent"}}}
            batch = None
            for _ in range(1 + (self.rng.random() < 0.4)):
                query = {"next_batch": batch} if batch else None
                r = self.call("search", lambda: c.request("POST", f"{CLIENT_V3}/search", "search",
                                                          query=query, json_body=body).json())
                self.stats.searches += 1
                if batch is None:
                    self.stats.search_terms += 1
                if r is None:
                    break
                ev = r.get("search_categories", {}).get("room_events", {})
                results = ev.get("results") or []
                self.stats.search_results += len(results)
                if results and batch is None:
                    self.stats.search_terms_with_hits += 1
                batch = ev.get("next_batch")
                if not batch:
                    break


ATTACKS = (FastScrape, SlowScrape, StolenToken, ContextWalk, MediaSpree, SearchSweep)

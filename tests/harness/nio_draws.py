"""Drawn scrapes written with matrix-nio, a real third-party Matrix client library (issue 11:
detection judged on traffic the suite did not write).

`DrawnScrape` speaks HTTP through the tests' own client, so every header, query string and
connection habit of its requests is ours, and a detector could end up fitted to them.
`NioScrape` takes the same drawn parameters (pace, page size, room order, requests after each
room, a sync loop beside the scrape and `prev_batch` starts) but makes every request through
matrix-nio's `AsyncClient`: its login, its HTTP stack (aiohttp, with aiohttp's own user agent
and connection pool), its headers, its query encoding, its sync. It is what an attacker writing
Python would most likely use. Its user agent is nio's, whatever the draw says.

The interface is `DrawnScrape`'s (what `test_detection_draws.run_draws` reads): `prepare()`
logs in and returns the token; `run(stop, max_seconds)` scrapes until `stop` is set, the
deadline, or the last room's start; `t_first`, `stats`, `syncs`, `outcome` and `failure` say
what it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import traceback

from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinedRoomsResponse,
    LoginResponse,
    RoomMessagesResponse,
    SyncResponse,
)

from .draws import Draw, RoomOrder, ThirdPartyScrape
from .util import HarnessError
from .world import World


class _Stop(Exception):
    pass


def _status(response) -> int:
    """The HTTP status of a nio response (nio keeps the aiohttp response it was made from)."""
    transport = getattr(response, "transport_response", None)
    return int(getattr(transport, "status", 0) or 0)


class NioScrape(ThirdPartyScrape):
    """One drawn scrape, every request made by matrix-nio (see the module docstring)."""

    prefix = "nio"

    def __init__(self, world: World, seed: int, *, params: Draw):
        super().__init__(world, seed, params=params)
        self.prev: dict[str, str] = {}
        self._pace = (0.7 * params.pace, 1.3 * params.pace)
        self._next_at = 0.0
        self._deadline = float("inf")
        self._stop: threading.Event | None = None
        # One event loop for the actor's life: `prepare()` and `run()` are called from
        # different threads, one after the other, never at once.
        self._loop = asyncio.new_event_loop()
        s = world.synapse
        # No end-to-end store: the scrape reads what the server sends, as a script would.
        self.client = AsyncClient(f"http://{s.host}:{s.port}", self.account.user_id,
                                  config=AsyncClientConfig(store_sync_tokens=False, encryption_enabled=False))

    def describe(self) -> str:
        return self.params.describe()

    # -- setup ----------------------------------------------------------------------------------
    def prepare(self) -> str:
        r = self._loop.run_until_complete(self.client.login(self.account.password, device_name="nio"))
        if not isinstance(r, LoginResponse):
            raise HarnessError(f"{self.name}: matrix-nio login failed: {r}")
        self.token = r.access_token
        return self.token

    # -- running --------------------------------------------------------------------------------
    def run(self, stop: threading.Event, max_seconds: float = 90.0) -> None:
        self._stop = stop
        self.max_seconds = max_seconds
        try:
            self._loop.run_until_complete(self._main())
        except _Stop as s:
            self.outcome = str(s)
        except Exception:  # noqa: BLE001
            self.outcome = "error"
            self.failure = traceback.format_exc()
        finally:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self.client.close())
            self._loop.close()

    async def _main(self) -> None:
        self._first_sync = asyncio.Event()
        syncing = asyncio.create_task(self._sync_loop()) if self.params.sync_loop else None
        try:
            await self._script()
            self.outcome = "exhausted"
        finally:
            if syncing is not None:
                syncing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await syncing

    def _stopped(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def _call(self, what: str, make):
        """One request of the scrape: the pace, the stop event and the deadline, as
        `Attack.call` does for the harness's scrapes."""
        if self._stopped():
            raise _Stop("detected")
        if self.t_first is None:
            self.t_first = time.monotonic()
            self._deadline = self.t_first + self.max_seconds
        else:
            while (wait := self._next_at - time.monotonic()) > 0:
                await asyncio.sleep(min(wait, 0.25))
                if self._stopped():
                    raise _Stop("detected")
            if time.monotonic() >= self._deadline:
                raise _Stop("deadline")
        self.stats.requests[what] += 1
        r = await make()
        status = _status(r)
        self.stats.statuses[status] += 1
        if status != 200:
            self.stats.errors.append(f"{what}: {r}"[:300])
        self._next_at = time.monotonic() + self.rng.uniform(*self._pace)
        return r

    async def _sync_loop(self) -> None:
        since = None
        try:
            while not self._stopped() and time.monotonic() < self._deadline:
                r = await self.client.sync(timeout=0 if since is None else 30000, since=since)
                if not isinstance(r, SyncResponse):
                    self.sync_failure = str(r)[:300]
                    await asyncio.sleep(1.0)
                    continue
                if since is None:
                    for room_id, room in r.rooms.join.items():
                        if room.timeline.prev_batch:
                            self.prev[room_id] = room.timeline.prev_batch
                    self._first_sync.set()
                since = r.next_batch
                self.syncs += 1
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            self.sync_failure = traceback.format_exc(limit=2)

    async def _script(self) -> None:
        p = self.params
        r = await self._call("joined_rooms", self.client.joined_rooms)
        joined = list(r.rooms) if isinstance(r, JoinedRoomsResponse) else []
        order = RoomOrder(self.world.in_build_order(joined), self.rng, p.interleave,
                          lambda room: self.prev.get(room) if p.from_sync else None)
        if p.from_sync:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._first_sync.wait(), 20)
        while turn := order.turn():
            for cur in turn:
                more, nxt = await self._page(cur[0], cur[1])
                if more:
                    cur[1] = nxt
                else:
                    order.finish(cur)
                    await self._after(cur[0])

    async def _page(self, room: str, start: str | None) -> tuple[bool, str | None]:
        r = await self._call("messages", lambda: self.client.room_messages(room, start=start,
                                                                           limit=self.params.limit))
        if not isinstance(r, RoomMessagesResponse):
            return False, None
        opened = self.stats.page(room, len(r.chunk))
        if self.params.marks_read and opened and r.chunk:
            newest = r.chunk[0].event_id
            await self._call("read_markers", lambda: self.client.room_read_markers(room, fully_read_event=newest))
        if not r.chunk or not r.end:
            return False, None
        return True, r.end

    async def _after(self, room: str) -> None:
        for what in self.params.after_room:
            if what == "members":
                await self._call("members", lambda: self.client.joined_members(room))
            else:
                await self._call("state", lambda: self.client.room_get_state(room))

"""Detection judged on a real browser's traffic (issue 11): matrix-js-sdk in headless Chromium
(harness/browser.py), as a legitimate reader and as a drawn scrape.

- `BrowserExport`: a member signs in on a new browser (a fresh device, as opening Element Web
  does), its sync loop starts, and after a while it exports the big room the way Element's
  "Export chat" does: `createMessagesRequest` backwards from the live end, 1,000 events a
  page, to the room's start. The sync loop goes on. A legitimate heavy reader: it must never
  reach 1.0, and a real browser's head must carry no fingerprint mark.
- `BrowserScrape`: a drawn scrape (`draws.draw`'s ranges: pace, page size, room order,
  requests after each room) run from the same page: every joined room to its start, beside the
  SDK's own sync loop, starting each room from the sync's `prev_batch` when the draw says so.
  Nothing in its requests marks a script: it is judged on what it reads.

Both log in through the harness (an anonymous request) and hand the token to the page.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from .browser import BrowserClient
from .draws import Draw, Reader, ThirdPartyScrape, draw
from .matrix import MatrixClient, Recorder
from .world import World

BROWSER_INDEX = 2000


def browser_draw(seed: int, index: int) -> Draw:
    """The `index`-th browser scrape's parameters: `draw`'s ranges (indices from
    `BROWSER_INDEX` up); a browser always syncs, and starts rooms from the sync's `prev_batch`
    when the drawn scrape would have had a sync loop."""
    d = draw(seed, BROWSER_INDEX + index)
    return replace(d, sync_loop=True, from_sync=d.sync_loop, user_agent="HeadlessChrome (matrix-js-sdk)",
                   library="browser")


def _login(world: World, account, device: str) -> str:
    s = world.synapse
    c = MatrixClient(s.host, s.port, None, user_id=account.user_id, recorder=Recorder(), name="browser-login")
    try:
        return c.login(account.name, account.password, device_id=device)["access_token"]
    finally:
        c.close()


def _base_url(world: World) -> str:
    return f"http://{world.synapse.host}:{world.synapse.port}"


class BrowserScrape(ThirdPartyScrape):
    """One drawn scrape run by matrix-js-sdk in headless Chromium (see the module docstring).
    The room order is tests/js/browser_client.js's (the same rule as `draws.RoomOrder`)."""

    prefix = "web"

    def __init__(self, world: World, seed: int, *, params: Draw):
        super().__init__(world, seed, params=params)
        self.device = f"WEB{self.rng.randrange(10**6)}"
        self._workdir = Path(tempfile.mkdtemp(prefix=f"vigie-{self.name}-"))

    def prepare(self) -> str:
        self.token = _login(self.world, self.account, self.device)
        return self.token

    def run(self, stop: threading.Event, max_seconds: float = 90.0) -> None:
        p = self.params
        task = {"kind": "scrape", "pace": p.pace, "limit": p.limit, "interleave": p.interleave,
                "after": list(p.after_room), "fromSync": p.from_sync, "marksRead": p.marks_read,
                "buildOrder": self.world.build_order}
        client = BrowserClient(base_url=_base_url(self.world), user_id=self.account.user_id, device_id=self.device,
                               token=self.token, task=task, seed=self.seed * 1000 + p.index, workdir=self._workdir,
                               name=self.name)
        try:
            client.start()
            while not client.done.is_set():
                if stop.wait(0.2):
                    client.stop("detected")
                    break
                if client.t_first is not None and time.monotonic() >= client.t_first + max_seconds:
                    client.stop("deadline")
                    break
            client.done.wait(30)
            self.t_first = client.t_first
            self.outcome = client.status.get("outcome", "no status")
            if self.outcome.startswith("error"):
                self.failure = self.outcome
        except Exception as e:  # noqa: BLE001
            self.outcome = "error"
            self.failure = str(e)
        finally:
            self._read(client.status)
            client.close()

    def _read(self, status: dict) -> None:
        st = self.stats
        st.requests.update(status.get("requests") or {})
        st.pages = int(status.get("pages") or 0)
        st.events = int(status.get("events") or 0)
        st.empty_pages = int(status.get("emptyPages") or 0)
        st.rooms = set(status.get("rooms") or [])
        if self.t_first is not None:
            st.opened_at = [self.t_first + float(s) for s in status.get("openedAfter") or []]
        errors = list(status.get("errors") or [])
        st.errors.extend(errors)
        st.statuses[200] += max(0, sum(st.requests.values()) - len(errors))
        for e in errors:
            st.statuses[0] += 1
        self.syncs = int(status.get("syncs") or 0)


class BrowserReader(Reader):
    """A legitimate reader in a real browser, on a new device of `account()`: the page does
    `task()` after a drawn delay once its sync loop is prepared, then syncs on until the
    reader is stopped. `busy()` while the task is under way."""

    delay_s = (20.0, 60.0)

    def account_for(self):
        raise NotImplementedError

    def task(self) -> dict:
        raise NotImplementedError

    def prepare(self) -> str:
        self.account = self.account_for()
        self.device = f"WEB{self.rng.randrange(10**6)}"
        self.token = _login(self.world, self.account, self.device)
        self.delay = self.rng.uniform(*self.delay_s)
        self._workdir = Path(tempfile.mkdtemp(prefix=f"vigie-{self.name}-"))
        self.status: dict = {}
        self._client: BrowserClient | None = None
        return self.token

    def busy(self) -> bool:
        client = self._client
        return client is not None and client.status.get("outcome") in (None, "starting", "synced")

    def script(self, stop: threading.Event) -> None:
        # The page's own generator draws what the task leaves to chance (room order, pages,
        # dwells): seeded from the run's seed, so that each seed is another sitting.
        client = BrowserClient(base_url=_base_url(self.world), user_id=self.account.user_id, device_id=self.device,
                               token=self.token, task={**self.task(), "delay": self.delay},
                               seed=self.rng.randrange(1, 2**31), workdir=self._workdir, name=self.name)
        self._client = client
        try:
            client.start()
            stop.wait()
        finally:
            self.status = client.status
            self.t_first = client.t_first
            self._client = None
            client.close()
        self.stats.requests.update(self.status.get("requests") or {})
        self.stats.events = int(self.status.get("events") or 0)
        self.stats.rooms = set(self.status.get("rooms") or [])
        self.stats.errors.extend(self.status.get("errors") or [])


class BrowserExport(BrowserReader):
    name = "browser_export"

    def account_for(self):
        room = self.world.big_room
        assert room, "the world has no big room to export"
        self.room = room
        # Not the member whose Element session OneRoomExport uses: two exports of one token
        # would be one reader's doing twice.
        members = [a for a in self.world.normal if room in a.rooms]
        return members[-1] if len(members) > 1 else members[0]

    def task(self) -> dict:
        return {"kind": "export", "room": self.room}

    def problems(self) -> list[str]:
        p = super().problems()
        want = self.world.messages.get(self.room, 0)
        if self.status.get("outcome") != "exhausted" or self.stats.events < want:
            p.append(f"{self.name}: {self.stats.events} events of {want}, outcome {self.status.get('outcome')}, "
                     f"{self.status.get('syncs', 0)} syncs")
        return p


class BrowserCatchUp(BrowserReader):
    """A member back on a new laptop catching up in a real browser: every joined room opened in
    turn as Element's room view does (the sync's timeline, then 1-4 back-pages of 20 events as
    the member scrolls up, 2-8 s spent on each), the read marker moved, a reply now and then.
    Rooms of a few dozen messages are read to their first event this way: the false alarm the
    finished-room and breadth signals must not raise. A legitimate reader: never 1.0."""

    name = "browser_catch_up"
    delay_s = (5.0, 15.0)

    def account_for(self):
        others = sorted((a for a in self.world.normal if a is not self.world.owner),
                        key=lambda a: (-len(a.rooms), a.index))
        return others[0]

    def task(self) -> dict:
        return {"kind": "catchup", "pages": [1, 4], "dwell": [2.0, 8.0], "reply": 0.25}

    def problems(self) -> list[str]:
        p = super().problems()
        want = len(self.account.rooms) if self.account else 0
        if self.status.get("outcome") != "exhausted" or len(self.stats.rooms) < want:
            p.append(f"{self.name}: {len(self.stats.rooms)} rooms of {want} opened, outcome "
                     f"{self.status.get('outcome')}, {self.stats.summary()}")
        return p

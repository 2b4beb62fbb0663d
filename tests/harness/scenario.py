"""An Element-like multi-user workload against Synapse, with exact client-side accounting.

Each session (one access token) has two keep-alive connections, like a real client: one
for a `/sync` long-poll loop (or sliding sync), one for everything else (sending messages at
random intervals, paging scrollback, listing members/state/rooms, typing, receipts...).
Every request is recorded by a shared `Recorder` with the token and endpoint class.
"""

from __future__ import annotations

import io
import random
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .matrix import MatrixClient, MatrixError, Recorder
from .synapse import Synapse

# An upload body that looks like HTTP requests carrying a token: the agent must count it as
# body bytes of the upload, never as requests. Its token is never valid anywhere.
DECOY_TOKEN = "syt_ZGVjb3k_DecoyDecoyDecoyDecoyXX_0decoy"
DECOY_BODY = (
    b"GET /_matrix/client/v3/sync?since=s1 HTTP/1.1\r\n"
    b"Host: test.local\r\n"
    b"Authorization: Bearer " + DECOY_TOKEN.encode() + b"\r\n\r\n"
    b"PUT /_matrix/client/v3/rooms/!x:test.local/send/m.room.message/1?access_token="
    + DECOY_TOKEN.encode() + b" HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\r\n"
)

ACTION_WEIGHTS = {
    "send": 30,
    "messages": 12,
    "members": 7,
    "joined_rooms": 7,
    "state": 6,
    "typing": 6,
    "receipt": 5,
    "context": 4,
    "event": 3,
    "search": 2,
    "keys": 4,
    "public_rooms": 2,
    "room_keys": 2,
    "whoami": 2,
}

SYNC_FILTER = {
    "room": {
        "timeline": {"limit": 20},
        "state": {"lazy_load_members": True},
    },
    "presence": {"not_types": ["*"]},
}


@dataclass
class ScenarioConfig:
    users: int = 14
    extra_logins: int = 1  # second devices (extra tokens) for the first users
    rooms: int = 4
    prefill: int = 40  # messages per room before the measured run
    duration: float = 25.0
    seed: int = 1
    query_token_session: int = 1  # this session sends ?access_token= for everything
    media_session: int = 2  # this session also uploads and downloads media
    sliding_sync_session: int | None = 3  # this session uses sliding sync instead of /sync
    sync_timeout_ms: tuple[int, int] = (2000, 5000)
    action_interval: tuple[float, float] = (0.2, 1.2)
    media_interval: tuple[float, float] = (1.0, 3.0)


@dataclass
class Session:
    index: int
    username: str
    user_id: str
    token: str
    device_id: str
    sync: MatrixClient
    act: MatrixClient
    rooms: list[str] = field(default_factory=list)
    filter_id: str | None = None
    since: str | None = None
    recent_events: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def remember(self, room_id: str, event_ids: list[str]) -> None:
        if not event_ids:
            return
        with self.lock:
            lst = self.recent_events.setdefault(room_id, [])
            lst.extend(event_ids)
            del lst[:-50]

    def some_event(self, rng: random.Random) -> tuple[str, str] | None:
        with self.lock:
            choices = [(r, e) for r, evs in self.recent_events.items() for e in evs[-20:]]
        return rng.choice(choices) if choices else None


def _png(rng: random.Random, size: int = 64) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for _ in range(20):
        img.putpixel((rng.randrange(size), rng.randrange(size)), (rng.randrange(256), 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class Scenario:
    def __init__(self, synapse: Synapse, config: ScenarioConfig | None = None,
                 recorder: Recorder | None = None, log: Callable[[str], None] = print):
        self.synapse = synapse
        self.cfg = config or ScenarioConfig()
        self.recorder = recorder or Recorder()
        self.log = log
        self.sessions: list[Session] = []
        self.rooms: list[str] = []
        self.errors: list[tuple[str, str, int, str | None]] = []  # (session, action, status, errcode)
        self.failures: list[str] = []
        self.actions: Counter = Counter()
        self.media: list[str] = []
        self._errors_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- helpers ---------------------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        return [s.token for s in self.sessions]

    def _client(self, token: str, user_id: str, index: int, role: str) -> MatrixClient:
        style = ("raw", "encoded", "alternate")[index % 3]
        return MatrixClient(
            self.synapse.host, self.synapse.port, token,
            user_id=user_id,
            token_in_query=(index == self.cfg.query_token_session),
            recorder=self.recorder,
            room_id_style=style,
            name=f"s{index:02d}-{role}",
            user_agent=f"vigie-tests/1 (session {index}; {role})",
        )

    def _note_error(self, session: Session, action: str, e: MatrixError) -> None:
        with self._errors_lock:
            self.errors.append((f"s{session.index:02d}", action, e.status, e.errcode))

    # -- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        t0 = time.monotonic()
        for i in range(cfg.users):
            name = f"user{i:02d}"
            user_id, token, device = self.synapse.register(name)
            self.sessions.append(
                Session(i, name, user_id, token, device,
                        self._client(token, user_id, i, "sync"), self._client(token, user_id, i, "act"))
            )
        for j in range(cfg.extra_logins):
            base = self.sessions[j % cfg.users]
            i = len(self.sessions)
            user_id, token, device = self.synapse.login(base.username)
            self.sessions.append(
                Session(i, base.username, user_id, token, device,
                        self._client(token, user_id, i, "sync"), self._client(token, user_id, i, "act"))
            )

        t_reg = time.monotonic()
        # Rooms: room 0 holds everyone, the others a random half plus their creator.
        users = [s for s in self.sessions if s.index < cfg.users]
        for k in range(cfg.rooms):
            creator = users[k % len(users)]
            members = list(users) if k == 0 else [creator] + rng.sample(
                [u for u in users if u is not creator], max(2, len(users) // 2))
            room_id = creator.act.create_room(
                name=f"room {k}", preset="public_chat" if k == 0 else "private_chat",
                topic=f"vigie test room {k}")
            self.rooms.append(room_id)
            for m in members:
                if m is creator:
                    continue
                creator.act.invite(room_id, m.user_id)
                m.act.join(room_id)
            for s in self.sessions:
                if any(m.user_id == s.user_id for m in members):
                    s.rooms.append(room_id)

        t_rooms = time.monotonic()
        # Scrollback: real pages for /messages.
        for room_id in self.rooms:
            members = [s for s in self.sessions if room_id in s.rooms]
            for n in range(cfg.prefill):
                s = rng.choice(members)
                text = f"prefill {n} " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 30)))
                eid = s.act.send_message(room_id, text)
                s.remember(room_id, [eid])

        t_fill = time.monotonic()
        # Filters and initial syncs.
        for s in self.sessions:
            s.filter_id = s.act.create_filter(SYNC_FILTER)
            if s.index != cfg.sliding_sync_session:
                r = s.sync.sync(filter_id=s.filter_id, timeout_ms=0)
                s.since = r["next_batch"]
                self._harvest(s, r)
        self.log(
            f"setup: {len(self.sessions)} sessions, {len(self.rooms)} rooms, "
            f"{cfg.prefill} messages per room, {time.monotonic() - t0:.1f} s "
            f"(register {t_reg - t0:.1f}, rooms {t_rooms - t_reg:.1f}, prefill {t_fill - t_rooms:.1f}, "
            f"initial syncs {time.monotonic() - t_fill:.1f})"
        )

    def _harvest(self, s: Session, sync_response: dict) -> None:
        for room_id, room in (sync_response.get("rooms", {}).get("join", {}) or {}).items():
            events = room.get("timeline", {}).get("events", [])
            s.remember(room_id, [e["event_id"] for e in events if "event_id" in e])

    # -- loops -----------------------------------------------------------------------------
    def _guard(self, s: Session, role: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception:  # noqa: BLE001 - any loop failure fails the scenario
            self.failures.append(f"s{s.index:02d} {role}: {traceback.format_exc()}")
            self._stop.set()

    def _sync_loop(self, s: Session, rng: random.Random) -> None:
        lo, hi = self.cfg.sync_timeout_ms
        while not self._stop.is_set():
            try:
                r = s.sync.sync(since=s.since, timeout_ms=rng.randint(lo, hi), filter_id=s.filter_id)
            except MatrixError as e:
                self._note_error(s, "sync", e)
                time.sleep(0.2)
                continue
            s.since = r["next_batch"]
            self._harvest(s, r)

    def _sliding_sync_loop(self, s: Session, rng: random.Random) -> None:
        lo, hi = self.cfg.sync_timeout_ms
        body = {
            "lists": {
                "all": {
                    "ranges": [[0, 20]],
                    "timeline_limit": 10,
                    "required_state": [["m.room.name", ""], ["m.room.member", "$LAZY"]],
                }
            },
            "extensions": {"typing": {"enabled": True}, "receipts": {"enabled": True}},
        }
        pos = None
        while not self._stop.is_set():
            try:
                r = s.sync.sliding_sync(body, pos=pos, timeout_ms=rng.randint(lo, hi))
            except MatrixError as e:
                self._note_error(s, "sliding_sync", e)
                time.sleep(0.2)
                continue
            pos = r.get("pos", pos)
            for room_id, room in (r.get("rooms") or {}).items():
                s.remember(room_id, [e["event_id"] for e in room.get("timeline", []) if "event_id" in e])

    def _action_loop(self, s: Session, rng: random.Random) -> None:
        names = list(ACTION_WEIGHTS)
        weights = [ACTION_WEIGHTS[n] for n in names]
        lo, hi = self.cfg.action_interval
        next_media = time.monotonic() + rng.uniform(*self.cfg.media_interval)
        while not self._stop.wait(rng.uniform(lo, hi)):
            if s.index == self.cfg.media_session and time.monotonic() >= next_media:
                action = "media"
                next_media = time.monotonic() + rng.uniform(*self.cfg.media_interval)
            else:
                action = rng.choices(names, weights)[0]
            self.actions[action] += 1
            try:
                self._act(s, rng, action)
            except MatrixError as e:
                self._note_error(s, action, e)

    def _act(self, s: Session, rng: random.Random, action: str) -> None:
        c = s.act
        room = rng.choice(s.rooms)
        if action == "send":
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 40)))
            if rng.random() < 0.05:
                text += " " + "x" * rng.randint(2000, 20000)  # the odd long paste
            eid = c.send_message(room, text)
            s.remember(room, [eid])
        elif action == "messages":
            from_token = None
            for _ in range(rng.randint(1, 3)):
                r = c.messages(room, dir="b", from_token=from_token, limit=rng.randint(20, 100))
                s.remember(room, [e["event_id"] for e in r.get("chunk", [])[:5] if "event_id" in e])
                from_token = r.get("end")
                if not from_token:
                    break
        elif action == "members":
            c.members(room)
        elif action == "joined_rooms":
            c.joined_rooms()
        elif action == "state":
            c.state(room)
        elif action == "typing":
            c.typing(room, rng.random() < 0.7)
        elif action == "receipt":
            ev = s.some_event(rng)
            if ev:
                c.read_receipt(*ev)
            else:
                c.joined_rooms()
        elif action == "context":
            ev = s.some_event(rng)
            if ev:
                c.context(ev[0], ev[1], limit=rng.randint(5, 20))
            else:
                c.members(room)
        elif action == "event":
            ev = s.some_event(rng)
            if ev:
                c.event(*ev)
            else:
                c.state(room)
        elif action == "search":
            c.search(rng.choice(_WORDS), rooms=[room] if rng.random() < 0.5 else None)
        elif action == "keys":
            others = rng.sample([x.user_id for x in self.sessions], k=min(4, len(self.sessions)))
            c.keys_query(others)
        elif action == "public_rooms":
            c.public_rooms()
        elif action == "room_keys":
            c.room_keys_version()
        elif action == "whoami":
            c.whoami()
        elif action == "media":
            kind = rng.random()
            if kind < 0.4:
                data, ctype, fname = _png(rng, rng.choice([32, 64, 128])), "image/png", "pic.png"
            elif kind < 0.8:
                data = rng.randbytes(rng.randint(10_000, 400_000))
                ctype, fname = "application/octet-stream", "blob.bin"
            else:
                data, ctype, fname = DECOY_BODY, "text/plain", "decoy.txt"
            mxc = c.upload(data, ctype, fname)
            self.media.append(mxc)
            got = c.download(mxc)
            if got != data:
                raise AssertionError(f"downloaded {len(got)} bytes, uploaded {len(data)}")
            if ctype == "image/png":
                c.thumbnail(mxc, 32, 32, rng.choice(["scale", "crop"]))
        else:
            raise AssertionError(action)

    # -- run -------------------------------------------------------------------------------
    def run(self, duration: float | None = None) -> None:
        """Run every session's loops concurrently for `duration` seconds, then stop them and
        wait until no request is in flight."""
        duration = self.cfg.duration if duration is None else duration
        self._stop.clear()
        self._threads = []
        for s in self.sessions:
            rs = random.Random(self.cfg.seed * 100_003 + s.index * 2)
            ra = random.Random(self.cfg.seed * 100_003 + s.index * 2 + 1)
            sync_body = self._sliding_sync_loop if s.index == self.cfg.sliding_sync_session else self._sync_loop
            for role, fn, rng in (("sync", sync_body, rs), ("act", self._action_loop, ra)):
                t = threading.Thread(
                    target=self._guard, args=(s, role, lambda fn=fn, s=s, rng=rng: fn(s, rng)),
                    name=f"s{s.index:02d}-{role}", daemon=True,
                )
                self._threads.append(t)
        t0 = time.monotonic()
        for t in self._threads:
            t.start()
        self._stop.wait(duration)
        self._stop.set()
        stop_at = time.monotonic()
        deadline = stop_at + self.cfg.sync_timeout_ms[1] / 1000 + 30
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        self.log(
            f"run: {stop_at - t0:.1f} s of traffic, loops drained in {time.monotonic() - stop_at:.1f} s, "
            f"{len(self.recorder.records)} requests recorded so far"
        )
        if alive:
            self.failures.append(f"loops still running after stop: {alive}")
        if self.recorder.in_flight:
            self.failures.append(f"{self.recorder.in_flight} requests still in flight after stop")

    def close(self) -> None:
        for s in self.sessions:
            s.sync.close()
            s.act.close()

    def connection_stats(self) -> dict[str, int]:
        out: Counter = Counter()
        for s in self.sessions:
            for c in (s.sync.conn, s.act.conn):
                out["connections"] += 1
                out["connects"] += c.connects
                out["reconnects_eof"] += c.reconnects_eof
                out["reconnects_idle"] += c.reconnects_idle
                out["retries"] += c.retries
                out["stray_bytes"] += c.stray_total
        return dict(out)


_WORDS = (
    "hello matrix room sync token bytes kernel probe socket request response element synapse "
    "federation message scrollback members state search media upload download thumbnail keys "
    "device alice bob carol dave eve frank grace heidi ivan judy mallory oscar peggy trent "
    "victor walter lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
).split()

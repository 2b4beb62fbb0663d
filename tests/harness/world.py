"""A small but realistic homeserver for the detection tests: users, rooms with history, media.

`build_world(synapse, seed)` registers the accounts, creates ~20 rooms, spreads the users
over them, fills them with a few dozen to a couple hundred messages each and posts media
(images and files of 20-200 KB) into them, then gives every Element session its sync filter
and a first `since` token. It runs before the agent under test starts: none of it is seen.

Accounts (each with one Element session, i.e. one access token):
- `normal`: a dozen and more ordinary users, each in 3-8 rooms;
- `heavy`: one heavy but legitimate user in about half the rooms;
- `owner`: the well-connected user whose account gets hijacked (in nearly every room); its
  own Element session is ordinary traffic, the attacks log in to the account anew.
The stolen-token victim is picked among the normal users in many rooms (`victim_candidates`).
"""

from __future__ import annotations

import hashlib
import io
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .matrix import CLIENT_V3, MatrixClient, Recorder
from .synapse import Synapse

# What Element clients send as User-Agent (web, desktop, Android, iOS, Element X).
ELEMENT_USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Element/1.11.89 "
    "Chrome/130.0.6723.152 Electron/33.2.1 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Element/1.11.89 "
    "Chrome/130.0.6723.152 Electron/33.2.1 Safari/537.36",
    "Element/1.6.28 (Google Pixel 8; Android 14; AP2A.240905.003; Flavour GooglePlay; MatrixAndroidSdk2 1.6.28)",
    "Element/1.6.28 (samsung SM-S911B; Android 14; UP1A.231005.007; Flavour FDroid; MatrixAndroidSdk2 1.6.28)",
    "Element/1.11.19 (iPhone; iOS 18.1.1; Scale/3.00)",
    "Element X/25.01.0 (Google Pixel 7a; Android 15; AP4A.250105.002; Sdk 1.0.0)",
)

# Element's sync filter: lazy-loaded members, 20 events of timeline per room, no presence.
ELEMENT_FILTER = {
    "room": {
        "timeline": {"limit": 20},
        "state": {"lazy_load_members": True},
    },
    "presence": {"not_types": ["*"]},
}

WORDS = (
    "hello morning meeting release deploy kernel probe socket request response element synapse "
    "federation message history members state search media upload download thumbnail keys "
    "device budget invoice contract lunch coffee weekend holiday report draft review ticket "
    "incident outage backup restore database migration schedule agenda minutes project roadmap "
    "customer support security password phone laptop printer network firewall certificate "
    "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent victor walter "
    "paris lyon marseille bordeaux lille nantes rennes toulouse strasbourg nice "
    "yes no maybe thanks please sorry tomorrow today yesterday later soon now urgent"
).split()

NAMES = (
    "alice bob carol dave erin frank grace heidi ivan judy mallory niaj oscar peggy rupert sybil "
    "trent uma victor walter xena yusuf zoe"
).split()


def browser_headers(user_agent: str) -> dict[str, str]:
    """What a browser's `fetch` from Element Web (another origin than the homeserver's) adds
    to every request, for a browser user agent; nothing for an app's."""
    if not user_agent.startswith("Mozilla/"):
        return {}
    return {
        "Accept": "application/json",
        "Accept-Language": "en-GB,en;q=0.9",
        "Origin": "https://app.element.io",
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "cors",
        "Sec-Fetch-Dest": "empty",
    }


def prev_batches(sync_response: dict) -> dict[str, str]:
    """Each joined room's timeline `prev_batch` in a sync response."""
    out = {}
    for room_id, room in ((sync_response or {}).get("rooms", {}).get("join") or {}).items():
        pb = (room.get("timeline") or {}).get("prev_batch")
        if pb:
            out[room_id] = pb
    return out


def sentence(rng: random.Random, lo: int = 3, hi: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def noise_png(rng: random.Random, side: int) -> bytes:
    """A PNG of random pixels: incompressible, so about 3·side² bytes."""
    from PIL import Image

    img = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class Account:
    index: int
    name: str
    role: str  # "normal", "heavy" or "owner"
    user_id: str
    password: str
    token: str  # its Element session's access token
    device_id: str
    user_agent: str
    address: str  # X-Forwarded-For its requests carry (as if through the TLS proxy)
    rooms: list[str] = field(default_factory=list)
    filter_id: str | None = None
    since: str | None = None  # the Element session's latest sync position
    # Each room's `prev_batch` from the session's syncs: where Element's scrollback starts.
    prev_batch: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.role}:{self.name}"


@dataclass
class MediaItem:
    mxc: str
    size: int
    sha256: str
    content_type: str
    room: str
    image: bool
    uploader: str


@dataclass
class World:
    synapse: Synapse
    seed: int
    accounts: list[Account]
    rooms: list[str]
    room_names: dict[str, str]
    members: dict[str, list[str]]  # room -> user ids
    messages: dict[str, int]  # room -> messages posted at build time (media events included)
    media: list[MediaItem]
    build_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    # Accounts outside the population (no Element session of their own), by name: in every room.
    extras: dict[str, Account] = field(default_factory=dict)
    # The one large room (`big_room` messages), or None.
    big_room: str | None = None
    # The owner's rooms of past history (build_world's archive_rooms): room -> messages.
    archive: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def normal(self) -> list[Account]:
        return [a for a in self.accounts if a.role == "normal"]

    @property
    def heavy(self) -> Account:
        return next(a for a in self.accounts if a.role == "heavy")

    @property
    def owner(self) -> Account:
        return next(a for a in self.accounts if a.role == "owner")

    def in_build_order(self, rooms) -> list[str]:
        """`rooms` in the order the world made them (rooms it did not make last, by id). Room
        ids are new in every world and `/joined_rooms` lists them in Synapse's order, so a
        seeded shuffle of that list reads rooms in another order each run; shuffling this one
        reads them in the same order, and a seed's draws can be compared before and after a
        change."""
        made = {room: i for i, room in enumerate(self.build_order)}
        return sorted(rooms, key=lambda r: (made.get(r, len(made)), r))

    @property
    def build_order(self) -> list[str]:
        """Every room the world made (live rooms, the big room, then the archive), in the
        order it made them."""
        return [*self.rooms, *self.archive]

    def victim_candidates(self) -> list[Account]:
        """Normal users in 6 rooms or more: a stolen token that opens many rooms."""
        return [a for a in self.normal if len(a.rooms) >= 6]

    def add_media(self, item: MediaItem) -> None:
        with self.lock:
            self.media.append(item)

    def media_snapshot(self) -> list[MediaItem]:
        with self.lock:
            return list(self.media)

    def by_mxc(self) -> dict[str, MediaItem]:
        with self.lock:
            return {m.mxc: m for m in self.media}

    def summary(self) -> str:
        per_user = sorted(len(a.rooms) for a in self.normal)
        msgs = sorted(self.messages.values())
        sizes = [m.size for m in self.media]
        return (
            f"world (seed {self.seed}): {len(self.accounts)} accounts ({len(self.normal)} normal in "
            f"{per_user[0]}-{per_user[-1]} rooms each, heavy in {len(self.heavy.rooms)}, owner in "
            f"{len(self.owner.rooms)}), {len(self.rooms)} rooms of {msgs[0]}-{msgs[-1]} messages "
            f"({sum(msgs)} in all), {len(self.media)} media items of {min(sizes) // 1024}-"
            f"{max(sizes) // 1024} KiB ({sum(sizes) / 1e6:.1f} MB)"
            + (f", owner also in {len(self.archive)} archive rooms ({sum(self.archive.values())} messages)"
               if self.archive else "")
            + f"; built in {self.build_seconds:.1f} s "
            + "(" + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()) + ")"
        )


class _Pool:
    """Run callables on a few threads, each thread with its own clients (one connection per
    user per thread). Raises the first failure at `join()`."""

    def __init__(self, synapse: Synapse, tokens: dict[str, tuple[str, str]], workers: int):
        self.synapse = synapse
        self.tokens = tokens  # user_id -> (token, user_agent)
        self.q: queue.Queue = queue.Queue()
        self.errors: list[BaseException] = []
        self.recorder = Recorder()
        self.threads = [threading.Thread(target=self._work, daemon=True, name=f"world-{i}")
                        for i in range(workers)]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        clients: dict[str, MatrixClient] = {}
        try:
            while True:
                job = self.q.get()
                if job is None:
                    return
                user_id, fn = job
                if self.errors:
                    continue
                c = clients.get(user_id)
                if c is None:
                    token, ua = self.tokens[user_id]
                    c = clients[user_id] = MatrixClient(
                        self.synapse.host, self.synapse.port, token, user_id=user_id,
                        recorder=self.recorder, user_agent=ua)
                try:
                    fn(c)
                except BaseException as e:  # noqa: BLE001
                    self.errors.append(e)
        finally:
            for c in clients.values():
                c.close()

    def submit(self, user_id: str, fn: Callable[[MatrixClient], None]) -> None:
        self.q.put((user_id, fn))

    def join(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]


def build_world(synapse: Synapse, seed: int = 1, *, normal_users: int = 14, rooms: int = 20,
                messages: tuple[int, int] = (30, 200), media_items: int = 60,
                media_size: tuple[int, int] = (20_000, 200_000), workers: int = 8,
                extras: tuple[str, ...] = (), big_room: int = 0,
                archive_rooms: int = 0, archive_messages: tuple[int, int] = (30, 200),
                log: Callable[[str], None] = print) -> World:
    """extras: names of accounts that join every room but run no Element session (bots, bridges);
    big_room: when > 0, one more room with that many messages, the owner, the heavy user and two
    normal users in it (a room worth exporting);
    archive_rooms: rooms of past history the owner is joined to but no longer opens (old project
    rooms, finished threads), with `archive_messages` messages each (heavy-tailed like the live
    rooms): the breadth of a long-lived account, which is what a scraper of it gets. Not in any
    account's `rooms` (the Element sessions never enter them); listed in `World.archive`."""
    rng = random.Random(f"world-{seed}")
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    # -- accounts ----------------------------------------------------------------------------
    roles = ["owner", "heavy"] + ["normal"] * normal_users
    names = list(NAMES)
    rng.shuffle(names)
    accounts: list[Account] = []
    for i, role in enumerate(roles):
        name = names[i] if i < len(names) else f"user{i}"
        password = f"pw-{name}-{rng.randrange(1 << 32):08x}"
        user_id, token, device = synapse.register(name, password)
        accounts.append(Account(
            index=i, name=name, role=role, user_id=user_id, password=password, token=token,
            device_id=device, user_agent=ELEMENT_USER_AGENTS[i % len(ELEMENT_USER_AGENTS)],
            address=f"10.{20 + i // 200}.{i % 200}.{rng.randint(2, 250)}",
        ))
    extra_accounts: dict[str, Account] = {}
    for j, name in enumerate(extras):
        password = f"pw-{name}-{rng.randrange(1 << 32):08x}"
        user_id, token, device = synapse.register(name, password)
        extra_accounts[name] = Account(
            index=len(roles) + j, name=name, role=name, user_id=user_id, password=password, token=token,
            device_id=device, user_agent="vigie-tests/1", address=f"10.30.{j}.{rng.randint(2, 250)}")
    t = time.monotonic()
    timings["register"] = t - t0

    # -- rooms and membership -------------------------------------------------------------------
    owner = accounts[0]
    heavy = accounts[1]
    normal = accounts[2:]
    room_ids: list[str] = []
    room_names: dict[str, str] = {}
    want: dict[int, set[int]] = {k: set() for k in range(rooms)}  # room index -> account indexes
    for k in rng.sample(range(rooms), k=max(1, round(rooms * 0.9))):
        want[k].add(owner.index)
    for k in rng.sample(range(rooms), k=max(1, rooms // 2)):
        want[k].add(heavy.index)
    for j, a in enumerate(normal):
        # The first two normal users are in many rooms: stolen-token victims worth the theft.
        n = rng.randint(7, 8) if j < 2 else rng.randint(3, 8)
        for k in rng.sample(range(rooms), k=min(n, rooms)):
            want[k].add(a.index)
    for k in range(rooms):
        while len(want[k]) < 3:
            want[k].add(rng.choice(normal).index)
    total_rooms = rooms + (1 if big_room > 0 else 0)
    if big_room > 0:
        want[rooms] = {owner.index, heavy.index} | {a.index for a in normal[:2]}
    everyone = accounts + list(extra_accounts.values())
    by_index = {a.index: a for a in everyone}
    for x in extra_accounts.values():
        for k in range(total_rooms):
            want[k].add(x.index)
    tokens = {a.user_id: (a.token, a.user_agent) for a in everyone}

    creators: dict[int, MatrixClient] = {}
    try:
        for k in range(total_rooms):
            creator = accounts[min(want[k])]
            c = creators.get(creator.index)
            if c is None:
                c = creators[creator.index] = MatrixClient(
                    synapse.host, synapse.port, creator.token, user_id=creator.user_id,
                    user_agent=creator.user_agent)
            name = f"{rng.choice(WORDS)}-{rng.choice(WORDS)} {k}"
            room_id = c.create_room(name=name, preset="public_chat", topic=sentence(rng, 3, 8))
            room_ids.append(room_id)
            room_names[room_id] = name
            creator.rooms.append(room_id)
    finally:
        for c in creators.values():
            c.close()
    pool = _Pool(synapse, tokens, workers)
    for k, room_id in enumerate(room_ids):
        for idx in sorted(want[k]):
            a = by_index[idx]
            if room_id in a.rooms:
                continue
            a.rooms.append(room_id)
            pool.submit(a.user_id, lambda c, r=room_id: c.join(r))
    pool.join()
    members = {r: [by_index[i].user_id for i in sorted(want[k]) if i < len(accounts)]
               for k, r in enumerate(room_ids)}
    archive: dict[int, str] = {}
    if archive_rooms > 0:
        names_lock = threading.Lock()
        pool = _Pool(synapse, tokens, workers)
        for k in range(archive_rooms):
            name = f"{rng.choice(WORDS)}-{rng.choice(WORDS)} (archive {k})"

            def create(c: MatrixClient, k=k, name=name) -> None:
                room_id = c.create_room(name=name, preset="private_chat")
                with names_lock:
                    archive[k] = room_id
                    room_names[room_id] = name
            pool.submit(owner.user_id, create)
        pool.join()
    archive_ids = [archive[k] for k in sorted(archive)]
    for room_id in archive_ids:
        members[room_id] = [owner.user_id]
    t, timings["rooms"] = time.monotonic(), time.monotonic() - t

    # -- history ------------------------------------------------------------------------------
    counts: dict[str, int] = {}
    jobs: list[tuple[str, str, str]] = []
    for k, room_id in enumerate(room_ids):
        # Heavy-tailed, as on a real server: most rooms hold a few dozen, a few a couple hundred.
        n = int(messages[0] + (messages[1] - messages[0]) * rng.random() ** 2)
        if k == rooms:
            n = big_room
        counts[room_id] = n
        for i in range(n):
            sender = rng.choice(members[room_id])
            text = sentence(rng) if rng.random() > 0.03 else sentence(rng, 80, 300)  # the odd long one
            jobs.append((room_id, sender, text))
    archive_counts: dict[str, int] = {}
    for room_id in archive_ids:
        n = int(archive_messages[0] + (archive_messages[1] - archive_messages[0]) * rng.random() ** 2)
        archive_counts[room_id] = n
        for i in range(n):
            text = sentence(rng) if rng.random() > 0.03 else sentence(rng, 80, 300)
            jobs.append((room_id, owner.user_id, text))
    # Interleave rooms so that the threads work on different rooms at once.
    by_room: dict[str, list] = {}
    for j in jobs:
        by_room.setdefault(j[0], []).append(j)
    interleaved = []
    while any(by_room.values()):
        for r in room_ids + archive_ids:
            if by_room.get(r):
                interleaved.append(by_room[r].pop(0))
    pool = _Pool(synapse, tokens, workers)
    for room_id, sender, text in interleaved:
        pool.submit(sender, lambda c, r=room_id, x=text: c.send_message(r, x))
    pool.join()
    t, timings["messages"] = time.monotonic(), time.monotonic() - t

    # -- media ----------------------------------------------------------------------------------
    media: list[MediaItem] = []
    media_lock = threading.Lock()
    pool = _Pool(synapse, tokens, workers)
    for i in range(media_items):
        room_id = rng.choice(room_ids[:rooms])
        sender = rng.choice(members[room_id])
        image = rng.random() < 0.5
        if image:
            side = int((rng.randint(*media_size) / 3) ** 0.5)
            data, ctype, fname = noise_png(rng, side), "image/png", f"IMG_{rng.randrange(10**4):04d}.png"
        else:
            data = rng.randbytes(rng.randint(*media_size))
            ctype, fname = "application/pdf", f"{rng.choice(WORDS)}-{i}.pdf"

        def upload(c: MatrixClient, data=data, ctype=ctype, fname=fname, room_id=room_id, image=image,
                   sender=sender):
            mxc = c.upload(data, ctype, fname)
            post_media(c, room_id, mxc, fname, ctype, len(data), image)
            with media_lock:
                media.append(MediaItem(mxc, len(data), hashlib.sha256(data).hexdigest(), ctype, room_id,
                                       image, sender))
            counts[room_id] += 1
        pool.submit(sender, upload)
    pool.join()
    t, timings["media"] = time.monotonic(), time.monotonic() - t

    # -- Element sessions: filter and first sync --------------------------------------------------
    def first_sync(c: MatrixClient, a: Account) -> None:
        a.filter_id = c.create_filter(ELEMENT_FILTER)
        r = c.sync(filter_id=a.filter_id, timeout_ms=0)
        a.since = r["next_batch"]
        a.prev_batch.update(prev_batches(r))

    pool = _Pool(synapse, tokens, workers)
    for a in accounts:
        pool.submit(a.user_id, lambda c, a=a: first_sync(c, a))
    pool.join()
    timings["syncs"] = time.monotonic() - t

    world = World(synapse=synapse, seed=seed, accounts=accounts, rooms=room_ids, room_names=room_names,
                  members=members, messages=counts, media=media,
                  build_seconds=time.monotonic() - t0, timings=timings, extras=extra_accounts,
                  big_room=room_ids[rooms] if big_room > 0 else None, archive=archive_counts)
    log(world.summary())
    return world


def post_media(c: MatrixClient, room_id: str, mxc: str, fname: str, ctype: str, size: int,
               image: bool) -> str:
    """Post an m.image / m.file event for uploaded media, as Element does."""
    content = {
        "msgtype": "m.image" if image else "m.file",
        "body": fname,
        "url": mxc,
        "info": {"mimetype": ctype, "size": size},
    }
    path = f"{CLIENT_V3}/rooms/{c._enc(room_id)}/send/m.room.message/{c._new_txn()}"
    return c.request("PUT", path, "send", json_body=content).json()["event_id"]

"""The fleet case for real: Synapse in worker mode (PostgreSQL, Redis, the main process, three
generic workers, a media worker) behind nginx routing as Synapse's docs/workers.md does, one
vigie per Synapse process as if each were its own host (its own --server-port and metrics
port, the fleet's one key), and a real Prometheus scraping every agent with vigie's rules
and the fleet rules.

Proven, in one run over one world (the phases share it; about 5 minutes in all):

- a scrape spread over the workers (a fresh login pages one room after another, each room's
  history served by the worker nginx hashes it to, at a pace where no agent's score reaches
  1.0: asserted from Prometheus over the whole scrape) fires VigieFleetTokenAnomaly within
  60 s of its first request plus the rule's `for`;
- the Tchap-style fast scrape (harness/attacks.py FastScrape) fires both VigieTokenAnomaly
  (on at least one host) and VigieFleetTokenAnomaly;
- the Element-like population (every account of the world, across the workers) never fires
  the fleet alert, and did make traffic on every generic worker;
- per token, requests summed over the agents equal the clients' own counts exactly, and
  response bytes equal what nginx logged as received from the Synapse processes exactly
  (the clients count what nginx sent them, which differs by nginx's own headers: printed);
  history pages summed over the agents equal the clients' `/messages` requests;
- `vigie resolve --postgres` against that PostgreSQL turns the attackers' labels (real
  password logins) back into the right user and device.
"""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from collections import Counter, defaultdict

import pytest

from harness import metrics as metrics_mod
from harness.attacks import Attack, FastScrape
from harness.fleet import FleetNginx, Front, Postgres, Redis, SynapseWorkers
from harness.matrix import Recorder
from harness.population import Population
from harness.prometheus import FLEET_RULES, RULES, Prometheus
from harness.util import HarnessError, token_leaks
from harness.vigie import Vigie
from harness.world import build_world

pytestmark = pytest.mark.timeout(600)

FLEET_ALERT = "VigieFleetTokenAnomaly"
HOST_ALERT = "VigieTokenAnomaly"
RULE_FOR_S = 30  # the fleet alert's `for` (deploy/prometheus/vigie-fleet-rules.yml)
WARMUP_S = 40  # normal traffic alone before the first attack


class SpreadScrape(Attack):
    """A fresh login takes every room's `prev_batch` from one sync, as a client does, then
    reads one page of 20 events back from it in each room, one room every 3.4-4.6 s (start to
    start): the rooms' history comes from every worker in turn, each sees a third of the
    rooms, none sees enough to alert (no page without `from`, no room read to its start)."""

    name = "spread_scrape"
    user_agent = "python-requests/2.32.3"
    pace = (3.4, 4.6)

    def __init__(self, world, recorder, seed, *, address, rooms):
        super().__init__(world, recorder, seed, address=address)
        self.rooms = rooms

    def call(self, endpoint, fn, ok_statuses=(200,)):
        # Start to start: a loaded server slows each answer, not the scraper's rate.
        start = max(time.monotonic(), self._next_at)
        out = super().call(endpoint, fn, ok_statuses)
        self._next_at = start + self.rng.uniform(*self.pace)
        return out

    def script(self) -> None:
        c = self.client
        r = self.call("sync", lambda: c.sync(timeout_ms=0)) or {}
        joined = r.get("rooms", {}).get("join", {})
        for room in self.rooms:
            prev = (joined.get(room) or {}).get("timeline", {}).get("prev_batch")
            page = self.call("messages", lambda: c.messages(room, dir="b", from_token=prev, limit=20))
            if page is not None:
                self.stats.pages += 1
                self.stats.events += len(page.get("chunk") or [])
                self.stats.rooms.add(room)


def spread_order(nginx: FleetNginx, rooms: list[str]) -> list[str]:
    """The rooms, taking one per worker in turn, as many from each as the least served has."""
    by_worker = defaultdict(list)
    for r in rooms:
        by_worker[nginx.history_worker(r).name].append(r)
    per = min(len(v) for v in by_worker.values()) if len(by_worker) == len(nginx.synapse.generic) else 0
    assert per >= 4, f"rooms per worker {dict((k, len(v)) for k, v in by_worker.items())}: too few to spread"
    return [by_worker[w][i] for i in range(per) for w in sorted(by_worker)]


class Watch:
    """Polls Prometheus' alerts every second in the background: per alert and token, when it
    was first seen firing."""

    def __init__(self, prom: Prometheus):
        self.prom = prom
        self.first: dict[tuple[str, str], float] = {}
        self.instances: dict[tuple[str, str], set] = defaultdict(set)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                alerts = self.prom.alerts()
            except Exception as e:  # noqa: BLE001
                self.errors.append(repr(e))
                continue
            now = time.monotonic()
            for a in alerts:
                if a["state"] != "firing":
                    continue
                key = (a["labels"].get("alertname"), a["labels"].get("token"))
                self.first.setdefault(key, now)
                if "instance" in a["labels"]:
                    self.instances[key].add(a["labels"]["instance"])

    def fired(self, alert: str, token: str) -> float | None:
        return self.first.get((alert, token))

    def tokens(self, alert: str) -> set[str]:
        return {t for (a, t) in self.first if a == alert}


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def agents_sum(agents: list[Vigie], name: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for v in agents:
        for token, value in v.scrape().sum_by(name, "token").items():
            out[token] += value
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    t0 = time.monotonic()
    work = tmp_path_factory.mktemp("fleet")
    pg, redis = Postgres(), Redis()
    started: list = []
    try:
        pg.start()
        started.append(pg)
        redis.start()
        started.append(redis)
        synapse = SynapseWorkers(work / "synapse", pg, redis, generic=3)
        started.append(synapse)
        synapse.start()
        nginx = FleetNginx(work / "nginx", synapse)
        nginx.start()
        started.append(nginx)
        front = Front(synapse.main, nginx)
        t_up = time.monotonic() - t0
        world = build_world(front, seed=7, normal_users=10, rooms=36, messages=(10, 40), media_items=16)
        t_world = time.monotonic() - t0 - t_up
        # One agent per Synapse process, the first one's key for all.
        agents: dict[str, Vigie] = {}
        for name, port in [("main", synapse.main.port)] + [(w.name, w.port) for w in synapse.workers]:
            v = Vigie(work / f"vigie-{name}", port)
            if agents:
                v.key_file = next(iter(agents.values())).key_file
            v.start()
            started.append(v)
            agents[name] = v
        prom = Prometheus(work / "prometheus", [v.metrics_addr for v in agents.values()],
                          rules=[RULES, FLEET_RULES])
        started.append(prom)
        print(f"fleet up in {t_up:.1f} s (PostgreSQL, Redis, main + {len(synapse.generic)} generic + media "
              f"workers, nginx), world built in {t_world:.1f} s, {len(agents)} agents and Prometheus in "
              f"{time.monotonic() - t0 - t_up - t_world:.1f} s")
        yield dataclasses.make_dataclass("Fleet", ["pg", "synapse", "nginx", "world", "agents", "prom", "t0", "work"])(
            pg, synapse, nginx, world, agents, prom, t0, work)
    except HarnessError as e:
        pytest.fail(str(e))
    finally:
        for s in reversed(started):
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001
                print(f"stopping {type(s).__name__}: {e!r}")
        print(f"test_fleet: {time.monotonic() - t0:.0f} s in all")


def test_a_scrape_spread_over_workers_is_caught_by_the_fleet_rules_only(fleet):
    world, nginx, prom = fleet.world, fleet.nginx, fleet.prom
    agents = list(fleet.agents.values())
    by_addr = {v.metrics_addr: name for name, v in fleet.agents.items()}
    rec = Recorder()
    pop = Population(world, seed=7, recorder=rec)
    watch = Watch(prom)
    spread = SpreadScrape(world, rec, 1, address="198.51.100.23", rooms=spread_order(nginx, world.owner.rooms))
    fast = FastScrape(world, rec, 2, address="203.0.113.99")
    try:
        pop.start()
        time.sleep(WARMUP_S)

        # -- the spread scrape ----------------------------------------------------------------
        spread.prepare()
        label = agents[0].labels([spread.token])[spread.token]
        stop = threading.Event()
        t = threading.Thread(target=spread.run, args=(stop,), kwargs={"max_seconds": 150}, daemon=True)
        t.start()
        wait_for(lambda: spread.t_first is not None, 30)
        fired = wait_for(lambda: watch.fired(FLEET_ALERT, label) is not None, 60 + RULE_FOR_S + 30)
        stop.set()
        t.join(30)
        t_end = time.monotonic()
        window = max(10, int(t_end - spread.t_first) + 5)
        peaks = {by_addr[r["metric"]["instance"]]: float(r["value"][1]) for r in prom.query(
            f'max by (instance) (max_over_time(vigie_token_anomaly_score{{token="{label}"}}[{window}s]))')}
        fleet_peak = prom.query(f'max_over_time(vigie:fleet_token_anomaly_score{{token="{label}"}}[{window}s])')
        reasons = {r["metric"]["reason"]: round(float(r["value"][1]), 2) for r in prom.query(
            f'max_over_time(vigie:fleet_token_reason{{token="{label}"}}[{window}s])')}
        served = Counter(nginx.history_worker(r).name for r in spread.stats.rooms)
        took = None if not fired else watch.fired(FLEET_ALERT, label) - spread.t_first
        waits = sorted(r.duration for r in rec.snapshot() if r.token == spread.token)
        print(f"spread scrape {label}: {spread.stats.summary()}; rooms per worker {dict(served)}; "
              f"{spread.outcome} after {t_end - spread.t_first:.0f} s; answers in {waits[len(waits) // 2]:.2f} s "
              f"(median), {waits[-1]:.2f} s (slowest)")
        print(f"  per-host peak scores {peaks}; fleet peak "
              f"{[round(float(r['value'][1]), 2) for r in fleet_peak]} (reasons {reasons}); "
              f"{FLEET_ALERT} firing {took if took is None else round(took, 1)} s after its first request "
              f"(bound 60 + for {RULE_FOR_S} s)")
        assert not spread.stats.errors, spread.stats.errors[:3]
        assert spread.stats.pages >= 12 and len(served) == 3, "the scrape read rooms of every worker"
        # One room, one worker: nginx sent each room's /messages to the worker predicted.
        per_room = defaultdict(set)
        for line in nginx.log_lines():
            if line["xff"] == spread.address and line["uri"].endswith("/messages"):
                per_room[line["uri"].split("/")[5]].add(line["upstream"])
        assert per_room and all(len(u) == 1 for u in per_room.values()), per_room
        assert all(u == {f"127.0.0.1:{nginx.history_worker(r).port}"} for r, u in per_room.items())
        assert set(peaks) >= {w.name for w in fleet.synapse.generic}, f"every history worker scored it: {peaks}"
        assert max(peaks.values()) < 1.0, f"an agent alone reached 1.0: {peaks}"
        assert not watch.fired(HOST_ALERT, label), "the per-host alert fired for the spread scrape"
        assert fired, f"{FLEET_ALERT} never fired for the spread scrape (fleet peak {fleet_peak}, reasons {reasons})"
        assert took <= 60 + RULE_FOR_S, f"{FLEET_ALERT} took {took:.0f} s"

        # -- the Tchap-style fast scrape -------------------------------------------------------
        fast.prepare()
        fast_label = agents[0].labels([fast.token])[fast.token]
        stop_fast = threading.Event()
        tf = threading.Thread(target=fast.run, args=(stop_fast,), kwargs={"max_seconds": 90}, daemon=True)
        tf.start()
        both = wait_for(lambda: watch.fired(FLEET_ALERT, fast_label) and watch.fired(HOST_ALERT, fast_label),
                        60 + RULE_FOR_S + 30)
        stop_fast.set()
        tf.join(30)
        print(f"fast scrape {fast_label}: {fast.stats.summary()}; {fast.outcome}; {HOST_ALERT} on "
              f"{sorted(by_addr.get(i, i) for i in watch.instances[(HOST_ALERT, fast_label)])} after "
              f"{(watch.fired(HOST_ALERT, fast_label) or 0) - fast.t_first:.1f} s, {FLEET_ALERT} after "
              f"{(watch.fired(FLEET_ALERT, fast_label) or 0) - fast.t_first:.1f} s")
        assert not fast.stats.errors, fast.stats.errors[:3]
        assert both, f"fast scrape: {HOST_ALERT} {watch.fired(HOST_ALERT, fast_label)}, " \
                     f"{FLEET_ALERT} {watch.fired(FLEET_ALERT, fast_label)}"
    finally:
        stop_left = pop.stop_all()
        watch.stop.set()
        watch.thread.join(5)

    # -- normal users ----------------------------------------------------------------------------
    normal_labels = agents[0].labels(list(pop.tokens))
    firing_normal = watch.tokens(FLEET_ALERT) & set(normal_labels.values())
    actions = Counter()
    for s in pop.sessions:
        actions.update(s.stats.actions)
    addresses = {s.a.address for s in pop.sessions} | {s.address for s in pop.sessions}
    upstreams = Counter(line["upstream"] for line in nginx.log_lines() if line["xff"] in addresses)
    print(f"population: {sum(actions.values())} actions {dict(actions)}; served by {dict(upstreams)}; "
          f"failures {pop.failures[:3]}; loops left {stop_left}")
    assert not pop.failures, pop.failures[:3]
    assert actions["sync"] >= 10 * len(pop.sessions) and actions["send"] > 0 and actions["messages"] > 0
    assert {f"127.0.0.1:{w.port}" for w in fleet.synapse.generic} <= set(upstreams), upstreams
    assert not firing_normal, f"{FLEET_ALERT} fired for normal tokens {firing_normal}"
    assert not watch.tokens(HOST_ALERT) & set(normal_labels.values())

    # -- accounting: every agent's share adds up to what the clients did --------------------------
    time.sleep(3)
    totals = rec.totals()
    tokens = list(pop.tokens) + [spread.token, fast.token]
    labels = agents[0].labels(tokens)
    addr_of = {s.a.token: {s.a.address, s.address} for s in pop.sessions}
    addr_of[spread.token], addr_of[fast.token] = {spread.address}, {fast.address}
    nginx_bytes: dict[str, int] = defaultdict(int)
    for line in nginx.log_lines():
        if not line["uri"].endswith("/login"):
            nginx_bytes[line["xff"]] += line["sent"]

    def figures():
        return (agents_sum(agents, "vigie_token_requests_total"), agents_sum(agents, "vigie_token_response_bytes_total"),
                agents_sum(agents, "vigie_token_history_pages_total"))

    prev, stable = None, 0
    for _ in range(30):
        cur = figures()
        stable = stable + 1 if cur == prev else 0
        prev = cur
        if stable >= 3:
            break
        time.sleep(0.5)
    reqs, byts, pages = prev
    ratios, wrong = [], []
    for tok in tokens:
        lab, mine = labels[tok], totals.get(tok, {"requests": 0, "bytes": 0, "by_endpoint": {}})
        upstream = sum(nginx_bytes[a] for a in addr_of[tok])
        if byts.get(lab):
            ratios.append(mine["bytes"] / byts[lab])
        if reqs.get(lab, 0) != mine["requests"] or byts.get(lab, 0) != upstream \
                or pages.get(lab, 0) != mine["by_endpoint"].get("messages", 0):
            wrong.append((lab, reqs.get(lab), mine["requests"], byts.get(lab), upstream,
                          pages.get(lab), mine["by_endpoint"].get("messages", 0)))
    n_req = sum(totals[t]["requests"] for t in tokens if t in totals)
    print(f"accounting over {len(tokens)} tokens and {len(agents)} agents: {n_req} requests; "
          f"{len(tokens) - len(wrong)} exact (requests = clients', bytes = nginx's upstream bytes, "
          f"history pages = clients' /messages); bytes the clients got from nginx / agents' bytes "
          f"{min(ratios):.3f}-{max(ratios):.3f} (nginx's own headers)")
    assert n_req > 1000
    assert not wrong, "(label, agents' requests, clients', agents' bytes, nginx's, agents' pages, clients') " \
                      + repr(wrong[:5])
    fleet.spread_token, fleet.fast_token = spread.token, fast.token

    # No raw token in anything the run wrote (logs of nginx, Synapse and the agents, the
    # agents' state, Prometheus' data); PostgreSQL's own files are elsewhere, and Synapse's.
    found, scanned = token_leaks(tokens, dirs=[fleet.work])
    print(f"leak scan: {scanned}")
    assert scanned["files"] > 20 and not found, found[:5]


def test_resolve_against_the_fleets_postgresql(fleet):
    """The attackers' real logins, resolved from PostgreSQL with the fleet's key."""
    tokens = [t for t in (getattr(fleet, "spread_token", None), getattr(fleet, "fast_token", None)) if t]
    assert tokens, "the scrape test logged in nobody"
    from harness.matrix import MatrixClient

    agent = next(iter(fleet.agents.values()))
    labels = agent.labels(tokens)
    expected = {}
    for t in tokens:
        c = MatrixClient(fleet.nginx.host, fleet.nginx.port, t)
        who = c.whoami()
        c.close()
        expected[labels[t]] = (who["user_id"], who["device_id"])
    r = subprocess.run([str(agent.bin), "resolve", "--key-file", str(agent.key_file), "--postgres", fleet.pg.url,
                        *labels.values()], capture_output=True, text=True, timeout=60)
    print(r.stdout)
    assert r.returncode == 0, r.stderr
    rows = {line.split("\t")[0]: tuple(line.split("\t")[1:3]) for line in r.stdout.splitlines()[1:]}
    assert rows == expected
    for t in tokens:
        assert t not in r.stdout and t not in r.stderr

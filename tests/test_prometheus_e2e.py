"""End to end as an operator runs it: a real Prometheus scrapes vigie during a scrape of a real
Synapse, with vigie's own alert rules. The attacker's alert fires, no normal token's does, and
every query of the Grafana dashboard returns data from that Prometheus."""

from __future__ import annotations

import random
import threading
import time

from harness.dashboard import dashboard_queries, variable_queries
from harness.matrix import MatrixClient, Recorder
from harness.prometheus import Prometheus
from harness.util import Actor, join_actors

ROOMS = 12
MESSAGES_PER_ROOM = 30
NORMAL_USERS = 6
ALERT = "VigieTokenAnomaly"


def normal_user(client: MatrixClient, rooms: list[str], stop: threading.Event, rng: random.Random) -> None:
    """Element-like: incremental sync long-polls, a message now and then, rare short scrollback."""
    since = client.sync(timeout_ms=0).get("next_batch")
    last_send = time.monotonic()
    while not stop.is_set():
        since = client.sync(since=since, timeout_ms=2000).get("next_batch", since)
        if time.monotonic() - last_send > rng.uniform(4, 10):
            client.send_message(rng.choice(rooms), f"hello {rng.random():.6f}")
            last_send = time.monotonic()
        if rng.random() < 0.05:
            client.messages(rng.choice(rooms), limit=20)


def scrape(client: MatrixClient, rooms: list[str], stop: threading.Event) -> None:
    """The Tchap pattern: page every room's history backwards with large pages, list members."""
    for room in rooms:
        client.members(room)
        token = None
        while not stop.is_set():
            page = client.messages(room, limit=500, from_token=token)
            token = page.get("end")
            if not token or not page.get("chunk"):
                break
    while not stop.is_set():  # then keep re-reading, as a scraper polling for new history does
        for room in rooms:
            if stop.is_set():
                return
            client.messages(room, limit=500)
            time.sleep(0.5)


def test_alert_fires_for_the_scraper_only_and_the_dashboard_has_data(synapse, vigie, tmp_path):
    rng = random.Random(1)
    rec = Recorder()
    owner_id, owner_tok, _ = synapse.register("e2e_owner")
    owner = MatrixClient(synapse.host, synapse.port, owner_tok, recorder=rec, name="owner")
    normals = []
    for i in range(NORMAL_USERS):
        uid, tok, _ = synapse.register(f"e2e_user{i}")
        normals.append((uid, tok))
    scraper_name = "e2e_scraper"
    synapse.register(scraper_name)
    scraper_id = f"@{scraper_name}:{synapse.server_name}"

    rooms = []
    for r in range(ROOMS):
        room = owner.create_room(name=f"e2e {r}", preset="public_chat")
        rooms.append(room)
        for m in range(MESSAGES_PER_ROOM):
            owner.send_message(room, f"room {r} message {m}")
    clients = []
    member_rooms = {}
    for i, (uid, tok) in enumerate(normals):
        c = MatrixClient(synapse.host, synapse.port, tok, recorder=rec, name=f"user{i}")
        mine = rng.sample(rooms, 3)
        for room in mine:
            c.join(room)
        clients.append(c)
        member_rooms[tok] = mine

    prom = Prometheus(tmp_path / "prometheus", vigie.metrics_addr)
    stop_normal, stop_attack = threading.Event(), threading.Event()
    threads = [Actor(normal_user, c, member_rooms[tok], stop_normal, random.Random(i), name=f"user{i}")
               for i, (c, (_, tok)) in enumerate(zip(clients, normals))]
    attack = None
    before = {tok: n["requests"] for tok, n in rec.totals().items()}  # the joins above
    try:
        for t in threads:
            t.start()
        time.sleep(15)  # normal traffic first, so normal tokens are scored before anything else
        # A fresh login of a well-connected account: the hijacked session.
        _, scraper_tok, _ = synapse.login(scraper_name)
        attacker = MatrixClient(synapse.host, synapse.port, scraper_tok, recorder=rec, name="scraper")
        for room in rooms:
            attacker.join(room)
        attack = Actor(scrape, attacker, rooms, stop_attack, name="scraper")
        attack_start = time.monotonic()
        attack.start()

        labels = vigie.labels([scraper_tok] + [tok for _, tok in normals])
        attacker_label = labels[scraper_tok]
        normal_labels = {labels[tok] for _, tok in normals}
        fired_at = None
        firing_normal = set()
        deadline = attack_start + 150
        while time.monotonic() < deadline:
            firing = {a["labels"].get("token") for a in prom.alerts()
                      if a["labels"].get("alertname") == ALERT and a["state"] == "firing"}
            firing_normal |= firing & normal_labels
            if attacker_label in firing and fired_at is None:
                fired_at = time.monotonic() - attack_start
                break
            time.sleep(1)
        stop_attack.set()
        problems = join_actors([attack], timeout=30)
        # "No normal token alerted" proves nothing unless every normal user kept making its
        # traffic all along: each loop must still be running, having raised nothing.
        problems += [f"{t.name} stopped early" + (f":\n{t.error}" if t.error else "") for t in threads
                     if not t.is_alive()]
        time.sleep(3)

        totals = rec.totals()
        made = {name: totals.get(tok, {}).get("requests", 0) - before.get(tok, 0)
                for name, tok in [(t.name, tok) for t, (_, tok) in zip(threads, normals)] + [("scraper", scraper_tok)]}
        print(f"attacker {attacker_label} ({scraper_id}): {ALERT} firing after {fired_at} s "
              f"(rule has for: 30s); normal tokens firing: {sorted(firing_normal)}; requests made: {made}")
        assert not problems, "\n".join(problems)
        # A normal user long-polls for 2 s at a time: over the 15 s before the attack and the
        # attack itself, at least 8 requests each; the scraper joins, lists the members of and
        # pages every room at least once.
        idle = {name: n for name, n in made.items() if n < (3 * ROOMS if name == "scraper" else 8)}
        assert not idle, f"actors that made too little traffic to prove anything: {idle} of {made}"
        score_query = 'vigie_token_anomaly_score{token="%s"}' % attacker_label
        assert fired_at is not None, f"{ALERT} never fired for the scraper; score now: {prom.query(score_query)}"
        all_firing = [a for a in prom.alerts() if a["state"] == "firing"]
        print("firing alerts:", [(a["labels"].get("alertname"), a["labels"].get("token")) for a in all_firing])
        assert not firing_normal, f"{ALERT} fired for normal tokens {firing_normal}"
        assert not [a for a in all_firing if a["labels"].get("token") in normal_labels]
        assert not [a for a in all_firing if a["labels"].get("alertname") in ("VigieAgentDown", "VigieNoProbes", "VigieEventsLost")]

        # Every dashboard query returns data from this Prometheus (short windows: 1 s scrapes).
        variables = {"__rate_interval": "30s", "__interval": "15s", "__range": "5m",
                     "token": ".*", "instance": ".*"}
        empty = []
        queries = dashboard_queries(variables)
        for expr in queries:
            if not prom.query(expr):
                empty.append(expr)
        for name, query in variable_queries().items():
            if query.startswith("label_values("):
                metric = query[len("label_values("):].rsplit(",", 1)[0].replace("$instance", ".*")
                if not prom.query(metric):
                    empty.append(f"variable {name}: {metric}")
        print(f"{len(queries) - len(empty)}/{len(queries)} dashboard queries returned data")
        assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
    finally:
        stop_attack.set()
        stop_normal.set()
        stopped = join_actors(threads + ([attack] if attack is not None else []), timeout=15)
        prom.stop()
    assert not stopped, "\n".join(stopped)

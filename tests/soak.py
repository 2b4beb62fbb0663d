"""Soak: vigie watching a real Synapse under mixed normal and attack traffic for N minutes,
its memory and table sizes sampled every minute; they must stay flat after warm-up.

    tests/.venv/bin/python tests/soak.py --minutes 30        # as root; `cargo xtask soak` runs this

What runs (all against 127.0.0.1):
- a Synapse (SQLite on /dev/shm) holding a world of ~20 rooms with history and media
  (harness/world.py), built before the agent starts;
- `vigie run` watching Synapse's port, with the token, connection and detector idle times
  shortened to 5 minutes (the defaults are an hour), so that forgetting happens within the
  soak and tracking churns; alerted tokens are remembered 10 minutes;
- every account's Element-like session, all along (harness/population.py);
- the attacks of harness/attacks.py one after another, round after round, each on a fresh
  login (the stolen-token one on a normal user's token), each stopped at detection or after
  60 s, 30 s of normal traffic between two;
- churn: every 15 s a normal user logs in anew (a new token), syncs, lists its rooms, reads a
  page of one, and logs out; the token is never used again.

Sampled at start and every minute: vigie's VmRSS and CPU time, its gauges
(vigie_tracked_tokens, vigie_tracked_connections, vigie_detector_tracked_tokens,
vigie_exported_tokens), events received and lost, and the entries of each of vigie's hash
maps in the kernel (found through the agent's own fds, counted with `bpftool map dump`), and
the client request rate. The table is printed and written, with a CSV and a verdict, to
target/soak/.

Verdict (exit 0 only when every line holds; W = max(1, N // 6) minutes of warm-up):
1. RSS flat: every sample after minute 2W is at most 1.10 x the highest sample in [W, 2W];
2. tokens bounded by use: vigie_tracked_tokens <= the Element sessions' tokens plus the
   tokens the clients used (or were about to) in the last token_idle + 60 s (housekeeping
   runs every 10 s); vigie_detector_tracked_tokens <= the same plus the attack tokens of the
   last alert_memory + idle + 60 s;
3. connections flat: after minute 2W, vigie_tracked_connections and the entries of the
   kernel's CONNS map are at most 1.5 x their highest value in [W, 2W] + 16; every map stays
   within its max_entries (the per-thread maps, PENDING_READS and the TLS ones, are LRU
   maps keyed by thread: they are shown, bounded, not required flat);
4. nothing lost: vigie_events_lost_total, vigie_malformed_records_total and
   vigie_kernel_conn_table_full_total stay 0;
5. the agent ran throughout, exited cleanly on SIGTERM, and its stderr has no panic;
6. detection: every attack that made requests reached score >= 1.0, and no token of the
   normal population (Element sessions, churn logins) ever did (a stolen-token victim only
   counts as normal before the script took its token);
7. the clients saw no transport failure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import metrics as metrics_mod  # noqa: E402
from harness.attacks import ATTACKS, StolenToken  # noqa: E402
from harness.matrix import CLIENT_V3, MatrixClient, MatrixError, Recorder, RequestRecord  # noqa: E402
from harness.monitor import ALERT, ScoreMonitor  # noqa: E402
from harness.population import Population  # noqa: E402
from harness.synapse import Synapse  # noqa: E402
from harness.util import REPO_ROOT  # noqa: E402
from harness.vigie import Vigie  # noqa: E402
from harness.world import World, build_world  # noqa: E402

TOKEN_IDLE_S = 300
CONNECTION_IDLE_S = 300
DETECT_IDLE_S = 300
ALERT_MEMORY_S = 600
HOUSEKEEPING_SLACK_S = 60
ATTACK_MAX_S = 60.0
ATTACK_GAP_S = 30.0
CHURN_EVERY_S = 15.0
RSS_TOLERANCE = 1.10
FLAT_FACTOR, FLAT_SLACK = 1.5, 16
MAP_TYPES = {1: "hash", 9: "lru_hash"}  # the kinds whose entries come and go
# Maps whose entries follow the watched connections (the others are per thread, LRU-bounded).
FLAT_MAPS = ("CONNS",)
MAX_ENTRIES: dict[str, int] = {}


class UsageRecorder(Recorder):
    """Counts requests and remembers when each token was last used; keeps no records (a
    30-minute soak would otherwise hold hundreds of thousands)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.last_used: dict[str, float] = {}
        self.failed = 0

    def add(self, record: RequestRecord, stray_bytes: int = 0) -> None:
        with self._lock:
            self.count += 1
            if record.token:
                self.last_used[record.token] = time.monotonic()

    def touch(self, token: str) -> None:
        """A token about to be used (its first request is counted only once answered)."""
        with self._lock:
            self.last_used[token] = time.monotonic()

    def used_since(self, t: float) -> set[str]:
        with self._lock:
            return {tok for tok, at in self.last_used.items() if at >= t}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the agent's own numbers ---------------------------------------------------------------------


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_maps(pid: int) -> dict[int, dict]:
    """vigie's BPF maps, from its own fds: {map_id: {"type", "max_entries"}}."""
    out: dict[int, dict] = {}
    for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            info = dict(
                line.split(":", 1) for line in fd.read_text().splitlines() if ":" in line
            )
        except OSError:
            continue
        if "map_id" not in info:
            continue
        out[int(info["map_id"])] = {
            "type": int(info.get("map_type", "0")),
            "max_entries": int(info.get("max_entries", "0")),
        }
    return out


def map_name(map_id: int) -> str:
    r = subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)], capture_output=True, text=True,
                       timeout=30)
    return json.loads(r.stdout).get("name", f"id{map_id}") if r.returncode == 0 else f"id{map_id}"


def map_entries(map_id: int) -> int:
    r = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"bpftool map dump id {map_id}: {r.stderr.strip()}")
    return len(json.loads(r.stdout or "[]"))


GAUGES = {
    "rss_kb": None,
    "tokens": "vigie_tracked_tokens",
    "detector_tokens": "vigie_detector_tracked_tokens",
    "exported": "vigie_exported_tokens",
    "connections": "vigie_tracked_connections",
    "events": "vigie_events_total",
    "lost": "vigie_events_lost_total",
    "malformed": "vigie_malformed_records_total",
    "conns_full": "vigie_kernel_conn_table_full_total",
    "alerting": "vigie_tokens_alerting",
    "expired": "vigie_tokens_expired_total",
    "conns_evicted": "vigie_connections_evicted_total",
}


@dataclass
class Sample:
    minute: float
    values: dict
    maps: dict  # name -> entries


# -- the traffic ------------------------------------------------------------------------------------


@dataclass
class AttackResult:
    name: str
    token: str
    started: float | None
    detected_after: float | None
    outcome: str
    victim: str | None = None


@dataclass
class Driver:
    world: World
    vigie: Vigie
    recorder: UsageRecorder
    monitor: ScoreMonitor
    seed: int
    stop: threading.Event = field(default_factory=threading.Event)
    attacks: list[AttackResult] = field(default_factory=list)
    attack_tokens: dict[str, float] = field(default_factory=dict)  # token -> first use
    churn_tokens: list[str] = field(default_factory=list)
    victims: dict[str, float] = field(default_factory=dict)  # victim token -> stolen from
    failures: list[str] = field(default_factory=list)
    churn_logins: int = 0

    def attack_loop(self) -> None:
        rng = random.Random(f"soak-attacks-{self.seed}")
        round_ = 0
        try:
            while not self.stop.is_set():
                round_ += 1
                for i, cls in enumerate(ATTACKS):
                    if self.stop.wait(ATTACK_GAP_S):
                        return
                    address = f"{('203.0.113', '198.51.100')[i % 2]}.{rng.randint(2, 250)}"
                    victim = None
                    if cls is StolenToken:
                        victim = rng.choice(self.world.victim_candidates())
                        attack = cls(self.world, self.recorder, self.seed * 100 + round_, address=address, victim=victim)
                    else:
                        attack = cls(self.world, self.recorder, self.seed * 100 + round_, address=address)
                    token = attack.prepare()
                    self.recorder.touch(token)
                    label = self.vigie.labels([token])[token]
                    since = time.monotonic()
                    detected = self.monitor.watch(label, since=since)
                    if victim is not None:
                        # The same victim may be robbed again in a later round: its token
                        # stops counting as normal at the first theft.
                        self.victims.setdefault(token, since)
                    self.attack_tokens[token] = since
                    stop_attack = threading.Event()
                    th = threading.Thread(target=attack.run, args=(stop_attack, ATTACK_MAX_S), daemon=True)
                    th.start()
                    while th.is_alive():
                        if detected.wait(0.5) or self.stop.is_set():
                            stop_attack.set()
                            break
                    th.join()
                    if attack.t_first is not None:
                        detected.wait(max(0.0, attack.t_first + ATTACK_MAX_S - time.monotonic()))
                    hit = self.monitor.first_at_or_above(label, since=attack.t_first or since)
                    after = None if hit is None or attack.t_first is None else hit.t1 - attack.t_first
                    res = AttackResult(attack.name, label, attack.t_first, after, attack.outcome,
                                       victim.name if victim else None)
                    self.attacks.append(res)
                    log(f"attack round {round_} {attack.name}: token {label}, {attack.outcome}, "
                        + (f"score >= 1 after {after:.1f} s" if after is not None else "NOT detected")
                        + f"; {attack.stats.summary()[:160]}")
                    if attack.failure:
                        self.failures.append(f"{attack.name}: {attack.failure}")
                    if self.stop.is_set():
                        return
        except Exception:  # noqa: BLE001
            self.failures.append(f"attack loop: {traceback.format_exc()}")

    def churn_loop(self) -> None:
        rng = random.Random(f"soak-churn-{self.seed}")
        s = self.world.synapse
        try:
            while not self.stop.wait(CHURN_EVERY_S):
                a = rng.choice(self.world.normal)
                _, token, _ = s.login(a.name, a.password)
                self.recorder.touch(token)
                self.churn_tokens.append(token)
                self.churn_logins += 1
                c = MatrixClient(s.host, s.port, token, user_id=a.user_id, recorder=self.recorder,
                                 user_agent=a.user_agent, name=f"churn-{self.churn_logins}",
                                 extra_headers={"X-Forwarded-For": a.address})
                try:
                    c.sync(filter_id=a.filter_id, timeout_ms=0)
                    rooms = c.joined_rooms()
                    if rooms:
                        c.messages(rng.choice(rooms), dir="b", limit=rng.randint(20, 50))
                    c.request("POST", f"{CLIENT_V3}/logout", "other", json_body={})
                except MatrixError as e:
                    self.failures.append(f"churn: {e}")
                finally:
                    c.close()
        except Exception:  # noqa: BLE001
            self.failures.append(f"churn loop: {traceback.format_exc()}")


# -- the run -----------------------------------------------------------------------------------------


def write_config(path: Path, port: int) -> None:
    path.write_text(
        f"server_ports = [{port}]\n"
        f"token_idle_seconds = {TOKEN_IDLE_S}\n"
        f"connection_idle_seconds = {CONNECTION_IDLE_S}\n"
        "[detect]\n"
        f"idle_expiry_s = {DETECT_IDLE_S}.0\n"
        f"alert_memory_s = {ALERT_MEMORY_S}.0\n"
    )


def sample(minute: float, vigie: Vigie, maps: dict[int, dict], names: dict[int, str]) -> Sample:
    pid = vigie.proc.pid
    m = metrics_mod.parse(vigie.scrape_text(timeout=30))
    values = {"rss_kb": vm_rss_kb(pid), "cpu_s": round(cpu_seconds(pid), 1)}
    for key, name in GAUGES.items():
        if name:
            values[key] = int(m.total(name))
    counts = {}
    for map_id, info in sorted(maps.items(), key=lambda kv: names[kv[0]]):
        if info["type"] in MAP_TYPES:
            counts[names[map_id]] = map_entries(map_id)
    return Sample(minute, values, counts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=int, default=30)
    ap.add_argument("--seed", type=int, default=int(os.environ.get("VIGIE_TEST_SEED", "1")))
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "target" / "soak")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("soak: must run as root (the agent loads BPF programs)", file=sys.stderr)
        return 2
    minutes = args.minutes
    warm = max(1, minutes // 6)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"vigie-soak-{stamp}-"))
    fast = Path(tempfile.mkdtemp(prefix="vigie-soak-db-", dir="/dev/shm"))
    log(f"soak: {minutes} min, seed {args.seed}, warm-up {warm} min; files in {work}")

    server = Synapse(work / "synapse",
                     extra_config={"database": {"name": "sqlite3", "args": {"database": str(fast / "homeserver.db")}}})
    vigie = None
    pop = None
    monitor = None
    driver = None
    threads: list[threading.Thread] = []
    samples: list[Sample] = []
    problems: list[str] = []
    exit_code = None
    labels: dict[str, str] = {}
    try:
        server.start(timeout=60)
        world = build_world(server, seed=args.seed, log=log)
        config = work / "vigie.toml"
        write_config(config, server.port)
        vigie = Vigie(work / "vigie", None, extra_args=["--config", str(config)])
        vigie.start(timeout=60)
        pid = vigie.proc.pid
        maps = agent_maps(pid)
        names = {i: map_name(i) for i in maps}
        MAX_ENTRIES.update({names[i]: m["max_entries"] for i, m in maps.items()})
        log("vigie maps: " + ", ".join(f"{names[i]} ({MAP_TYPES.get(m['type'], m['type'])}, max {m['max_entries']})"
                                       for i, m in sorted(maps.items())))
        recorder = UsageRecorder()
        labels = vigie.labels([a.token for a in world.accounts])
        monitor = ScoreMonitor(vigie, interval=2.0)
        monitor.start()
        pop = Population(world, args.seed, recorder)
        driver = Driver(world, vigie, recorder, monitor, args.seed)
        pop.start()
        t0 = time.monotonic()
        for fn in (driver.attack_loop, driver.churn_loop):
            th = threading.Thread(target=fn, daemon=True, name=fn.__name__)
            th.start()
            threads.append(th)

        last_count, last_t = recorder.count, t0
        # The Element sessions are live all along (a long-poll is in flight most of the time).
        population_tokens = {a.token for a in world.accounts}
        header = None
        for k in range(minutes + 1):
            target = t0 + 60 * k
            while time.monotonic() < target:
                vigie.assert_running()
                time.sleep(min(5.0, max(0.0, target - time.monotonic())))
            now = time.monotonic()
            s = sample(k, vigie, maps, names)
            s.values["req_per_s"] = round((recorder.count - last_count) / max(1e-3, now - last_t), 1)
            s.values["tokens_bound"] = len(
                population_tokens | recorder.used_since(now - TOKEN_IDLE_S - HOUSEKEEPING_SLACK_S))
            recent_attacks = {t for t, at in driver.attack_tokens.items()
                              if at >= now - ALERT_MEMORY_S - DETECT_IDLE_S - HOUSEKEEPING_SLACK_S}
            s.values["detector_bound"] = len(
                population_tokens | recorder.used_since(now - DETECT_IDLE_S - HOUSEKEEPING_SLACK_S) | recent_attacks)
            last_count, last_t = recorder.count, now
            samples.append(s)
            line = row(s)
            if header is None:
                header = list(line)
                log(" ".join(f"{h:>{w}}" for h, w in header_widths(header)))
            log(" ".join(f"{str(line[h]):>{w}}" for h, w in header_widths(header)))
    except Exception:  # noqa: BLE001
        problems.append(f"the soak itself failed: {traceback.format_exc()}")
    finally:
        if driver is not None:
            driver.stop.set()
        for th in threads:
            th.join(ATTACK_MAX_S + 30)
        problems += [f"{th.name} still running after stop" for th in threads if th.is_alive()]
        if pop is not None:
            alive = pop.stop_all()
            if alive:
                problems.append(f"client loops still running after stop: {alive}")
        if monitor is not None:
            monitor.stop()
        if vigie is not None:
            running = vigie.running
            exit_code = vigie.stop()
            if not running:
                problems.append(f"vigie was not running at the end (exit code {exit_code})")
        server.stop()
        shutil.rmtree(fast, ignore_errors=True)

    # -- verdict --------------------------------------------------------------------------------
    problems += verdict(samples, minutes, warm)
    if vigie is not None:
        err = vigie.stderr_path.read_text(errors="replace") if vigie.stderr_path.exists() else ""
        if exit_code not in (0, None):
            problems.append(f"vigie exited with code {exit_code} on SIGTERM")
        if "panicked" in err:
            problems.append("vigie's stderr mentions a panic")
    if driver is not None and monitor is not None and vigie is not None:
        problems += detection_verdict(driver, monitor, vigie, labels)
        problems += [f"client failure: {f[:400]}" for f in driver.failures[:10]]
    if pop is not None:
        problems += [f"population failure: {f[:400]}" for f in pop.failures[:10]]

    report = render(samples, minutes, warm, driver, problems, work)
    base = args.out / f"soak-{stamp}-{minutes}min"
    base.with_suffix(".txt").write_text(report)
    if samples:
        with open(base.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row(samples[0])))
            w.writeheader()
            for s in samples:
                w.writerow(row(s))
    print(report, flush=True)
    log(f"report: {base.with_suffix('.txt')} and .csv")
    return 1 if problems else 0


def row(s: Sample) -> dict:
    v = s.values
    out = {"min": s.minute, "rss_mb": f"{v['rss_kb'] / 1024:.1f}", "cpu_s": v["cpu_s"], "req/s": v["req_per_s"],
           "tokens": v["tokens"], "tok_bound": v["tokens_bound"], "det_tokens": v["detector_tokens"],
           "det_bound": v["detector_bound"], "exported": v["exported"], "conns": v["connections"],
           "events": v["events"], "lost": v["lost"], "malformed": v["malformed"], "alerting": v["alerting"],
           "expired": v["expired"]}
    for name, n in s.maps.items():
        out[name] = n
    return out


def header_widths(header: list[str]) -> list[tuple[str, int]]:
    return [(h, max(len(h), 6)) for h in header]


def verdict(samples: list[Sample], minutes: int, warm: int) -> list[str]:
    problems = []
    if len(samples) < minutes + 1:
        problems.append(f"only {len(samples)} of {minutes + 1} samples taken")
    ref = [s for s in samples if warm <= s.minute <= 2 * warm]
    after = [s for s in samples if s.minute > 2 * warm]
    if ref and after:
        rss_ref = max(s.values["rss_kb"] for s in ref)
        for s in after:
            if s.values["rss_kb"] > RSS_TOLERANCE * rss_ref:
                problems.append(f"RSS not flat: {s.values['rss_kb']} kB at minute {s.minute:g} > "
                                f"{RSS_TOLERANCE} x {rss_ref} kB (max of minutes {warm}-{2 * warm})")
        flat = {"connections": lambda s: s.values["connections"]}
        for name in FLAT_MAPS:
            flat[f"map {name}"] = lambda s, n=name: s.maps.get(n, 0)
        for what, get in flat.items():
            limit = FLAT_FACTOR * max(get(s) for s in ref) + FLAT_SLACK
            worst = max(after, key=get)
            if get(worst) > limit:
                problems.append(f"{what} not flat: {get(worst)} at minute {worst.minute:g} > {limit:.0f}")
    for s in samples:
        v = s.values
        if v["tokens"] > v["tokens_bound"]:
            problems.append(f"minute {s.minute:g}: vigie tracks {v['tokens']} tokens, only {v['tokens_bound']} "
                            f"were used in the last {TOKEN_IDLE_S + HOUSEKEEPING_SLACK_S} s")
        if v["detector_tokens"] > v["detector_bound"]:
            problems.append(f"minute {s.minute:g}: the detector tracks {v['detector_tokens']} tokens, bound "
                            f"{v['detector_bound']}")
        for name, n in s.maps.items():
            if n > MAX_ENTRIES.get(name, n):
                problems.append(f"minute {s.minute:g}: map {name} holds {n} entries, more than its {MAX_ENTRIES[name]}")
        for key in ("lost", "malformed", "conns_full"):
            if v[key]:
                problems.append(f"minute {s.minute:g}: {GAUGES[key]} = {v[key]}")
    return problems


def detection_verdict(driver: Driver, monitor: ScoreMonitor, vigie: Vigie, labels: dict[str, str]) -> list[str]:
    problems = []
    # "Every attack detected, no normal token alerted" holds of nothing without attacks and
    # new logins: both loops must have done their work.
    ran = [a for a in driver.attacks if a.started is not None]
    if not ran:
        problems.append(f"no attack made a request ({len(driver.attacks)} attack runs): nothing was tested")
    if not driver.churn_logins:
        problems.append("no churn login happened: the token churn was not tested")
    for a in driver.attacks:
        if a.started is not None and a.detected_after is None:
            problems.append(f"attack {a.name} (token {a.token}) was not detected within {ATTACK_MAX_S:.0f} s")
    churn = vigie.labels(driver.churn_tokens) if driver.churn_tokens else {}
    normal = {**labels, **churn}
    victim_labels = {labels.get(t) or vigie.labels([t])[t]: since for t, since in driver.victims.items()}
    for token, label in normal.items():
        until = victim_labels.get(label)
        best, at = monitor.max_score(label, until=until)
        if best >= ALERT:
            kind = "churn login" if token in churn else "Element session"
            reasons = ", ".join(f"{k}={v:.2f}" for k, v in sorted((at.reasons.get(label) or {}).items(),
                                                                  key=lambda kv: -kv[1]))
            problems.append(f"normal token {label} ({kind}) reached score {best:.2f} ({reasons})")
    if monitor.errors:
        problems.append(f"{len(monitor.errors)} scrapes failed; first: {monitor.errors[0][:300]}")
    return problems


def render(samples, minutes, warm, driver, problems, work) -> str:
    lines = [f"==== vigie soak: {minutes} min, warm-up {warm} min (reference window minutes {warm}-{2 * warm}) ===="]
    if samples:
        rows = [row(s) for s in samples]
        widths = [(h, max(len(h), *(len(str(r.get(h, ''))) for r in rows))) for h in rows[0]]
        lines.append(" ".join(f"{h:>{w}}" for h, w in widths))
        for r in rows:
            lines.append(" ".join(f"{str(r.get(h, '')):>{w}}" for h, w in widths))
    lines.append("tok_bound: tokens the clients used in the last token_idle + 60 s; det_bound: the same for the "
                 "detector plus recent attack tokens; map columns: entries in vigie's kernel hash maps")
    if driver is not None:
        lines.append(f"churn logins: {driver.churn_logins}; attacks run: {len(driver.attacks)}")
        for a in driver.attacks:
            lines.append(f"  {a.name:13} token {a.token} {a.outcome:10} "
                         + (f"detected after {a.detected_after:.1f} s" if a.detected_after is not None
                            else ("made no request" if a.started is None else "NOT detected"))
                         + (f" (victim {a.victim})" if a.victim else ""))
    lines.append("verdict: " + ("PASS" if not problems else f"FAIL ({len(problems)} problems)"))
    lines += [f"  - {p}" for p in problems]
    lines.append(f"files: {work}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Acceptance test of vigie's bulk-read detection against a real Synapse.

Contract: `vigie_token_anomaly_score{token}` per token, 1.0 or more meaning "alert", with
`vigie_token_anomaly_reason{token,reason}` saying why; scored tokens are exported even when
they are not among the busiest.

One Synapse holds a world of ~20 rooms with history and media built from the first seed
(harness/world.py), shared by the seeds (building it is 90-100 s of the suite's hour); then,
per seed, with a fresh agent, Element-like traffic of 16 sessions (a
dozen and more ordinary users, one heavy but legitimate user, the well-connected owner of
the account that gets hijacked; harness/population.py) runs throughout; after a warm-up, six
attacks (harness/attacks.py) run one at a time with normal-only traffic between them:
fast scrape, slow scrape, stolen token, context walk, media spree, search sweep. A thread
scrapes /metrics every second (harness/monitor.py).

Asserted, per seed: every attack's token reaches a score >= 1.0 within 60 s of its first
request; no normal token ever does (the victim's token only counts as normal before the
stolen-token script starts); the attack tokens keep their score and request series; the
traffic was what it claims to be (pages with events, contexts with events, media with the
right sizes and hashes, searches with results, no server errors).

Environment: VIGIE_TEST_SEED (default 1): the seeds run are that one and the next;
VIGIE_DETECTION_SEEDS (e.g. "3,7") replaces them. VIGIE_DETECTION_WARMUP (seconds, default
75). The report (time-to-detect per attack, every normal token's highest score) is printed
and left in detection_report.txt in the test's tmp dir.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.attacks import ATTACKS, Attack, StolenToken
from harness.matrix import Recorder
from harness.monitor import ALERT, SCORE, ScoreMonitor
from harness.population import Population
from harness.synapse import Synapse
from harness.util import HarnessError
from harness.vigie import check_binary
from harness.world import World, build_world

REQUESTS = "vigie_token_requests_total"
DETECT_WITHIN_S = 60.0  # the requirement
ATTACK_MAX_S = 90.0  # an attack stops at detection or after this long
GAP_S = 10.0  # normal-only traffic between attacks (each attack is a fresh token)
WARMUP_S = float(os.environ.get("VIGIE_DETECTION_WARMUP", "75"))
# Few export slots, so that a quiet attacker (the slow scrape) is not among the busiest tokens
# and must be exported because it is scored.
TOP_K = 8


def _seeds() -> list[int]:
    explicit = os.environ.get("VIGIE_DETECTION_SEEDS", "").strip()
    if explicit:
        return [int(x) for x in explicit.replace(",", " ").split()]
    base = int(os.environ.get("VIGIE_TEST_SEED", "1"))
    return [base, base + 1]


SEEDS = _seeds()


# -- the world, one for the seeds ------------------------------------------------------------------


def _fast_dir() -> str | None:
    """A tmpfs directory for Synapse's SQLite file: on a disk, every commit's fsync caps Synapse
    at a few dozen events a second, which would make the world slow to build."""
    try:
        return tempfile.mkdtemp(prefix="vigie-detection-db-", dir="/dev/shm")
    except OSError:
        return None


@pytest.fixture(scope="module")
def detector_build():
    """Fail at once, before building anything, when the agent binary cannot export scores at
    all (the metric name is not even in it). An agent that has the name but exports no
    series is caught after the first attack (NoScores)."""
    try:
        binary = check_binary()
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    if SCORE.encode() not in binary.read_bytes():
        pytest.fail(f"agent exports no {SCORE}: {binary} does not even contain the metric name "
                    f"(the detector is not wired into this build)", pytrace=False)
    return binary


@pytest.fixture(scope="module")
def world(detector_build, tmp_path_factory) -> World:
    """One Synapse and world, from the first seed (rooms, sizes, who is where, media), for
    every seed's run: each run's traffic (population, attack parameters, addresses) comes from
    its own seed and each has a fresh agent, so what a run proves does not depend on the
    world being new; the second run only finds more history (the first run's messages)."""
    seed = SEEDS[0]
    workdir = tmp_path_factory.mktemp(f"synapse-detection-seed{seed}")
    fast = _fast_dir()
    db = Path(fast or workdir) / "homeserver.db"
    server = Synapse(workdir, extra_config={"database": {"name": "sqlite3", "args": {"database": str(db)}}})
    error = None
    t0 = time.monotonic()
    try:
        server.start(timeout=60)
    except HarnessError as e:
        error = str(e)
    try:
        if error is not None:
            pytest.fail(f"Synapse failed to start: {error}", pytrace=False)
        started = time.monotonic() - t0
        w = build_world(server, seed=seed)
        print(f"synapse started in {started:.1f} s; world built in {w.build_seconds:.1f} s")
        yield w
    finally:
        code = server.stop()
        print(f"synapse stopped (exit code {code}); files in {server.workdir}")
        if fast:
            shutil.rmtree(fast, ignore_errors=True)


# -- one run ------------------------------------------------------------------------------------------


class NoScores(Exception):
    pass


@dataclass
class AttackRun:
    attack: Attack
    label: str
    detected: object = None  # monitor Sample at or above ALERT
    ttd: float | None = None
    max_score: float = 0.0
    watched_until: float = 0.0

    @property
    def name(self) -> str:
        return self.attack.name


@dataclass
class RunResult:
    seed: int
    world: World
    victim: object
    labels: dict[str, str]  # token -> label
    population: Population
    monitor: ScoreMonitor
    recorder: Recorder
    attacks: list[AttackRun] = field(default_factory=list)
    t_start: float = 0.0
    t_traffic: float = 0.0
    t_end: float = 0.0
    lines: list[str] = field(default_factory=list)

    def log(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)

    def rel(self, t: float | None) -> str:
        return "-" if t is None else f"{t - self.t_traffic:7.1f}"

    @property
    def stolen(self) -> AttackRun | None:
        return next((a for a in self.attacks if isinstance(a.attack, StolenToken)), None)

    def normal_labels(self) -> dict[str, object]:
        return {self.labels[a.token]: a for a in self.world.accounts}

    def normal_until(self, label: str) -> float | None:
        """Until when this normal token's scores count as normal (None: all along)."""
        st = self.stolen
        if st is not None and label == st.label and st.attack.t_first is not None:
            return st.attack.t_first
        return None


def _attack_address(rng: random.Random, i: int) -> str:
    return f"{('203.0.113', '198.51.100')[i % 2]}.{rng.randint(2, 250)}"


def run_detection(world: World, vigie, seed: int, *, require_scores: bool = True,
                  warmup: float = WARMUP_S, gap: float = GAP_S, attack_max: float = ATTACK_MAX_S,
                  attacks=ATTACKS, log=None) -> RunResult:
    """Normal traffic throughout, the attacks one after another; everything recorded."""
    rng = random.Random(f"run-{seed}")
    rec = Recorder()
    victim = rng.choice(world.victim_candidates())
    labels = vigie.labels([a.token for a in world.accounts])
    pop = Population(world, seed, rec)
    monitor = ScoreMonitor(vigie, interval=1.0)
    res = RunResult(seed, world, victim, labels, pop, monitor, rec, t_start=time.monotonic())
    if log:
        res.log = log  # type: ignore[method-assign]
    res.log(f"seed {seed}: victim of the stolen token: {victim.name} ({len(victim.rooms)} rooms); "
            f"hijacked account: {world.owner.name} ({len(world.owner.rooms)} rooms); "
            f"{len(world.media_snapshot())} media items")
    monitor.start()
    pop.start()
    res.t_traffic = time.monotonic()
    try:
        res.log(f"warm-up: {warmup:.0f} s of normal traffic")
        pop.stop.wait(warmup)
        for i, cls in enumerate(attacks):
            if cls is StolenToken:
                attack = cls(world, rec, seed, address=_attack_address(rng, i), victim=victim)
            else:
                attack = cls(world, rec, seed, address=_attack_address(rng, i))
            token = attack.prepare()
            label = labels.get(token) or vigie.labels([token])[token]
            run = AttackRun(attack, label)
            res.attacks.append(run)
            since = time.monotonic()
            detected = monitor.watch(label, since=since)
            th = threading.Thread(target=attack.run, args=(detected, attack_max), name=attack.name, daemon=True)
            th.start()
            th.join(attack_max + 60)
            if attack.t_first is None:
                res.log(f"{attack.name}: made no request ({attack.outcome})")
                continue
            # Keep watching after the script has stopped, until detection or the attack's time is up.
            deadline = attack.t_first + attack_max
            detected.wait(max(0.0, deadline - time.monotonic()))
            run.watched_until = time.monotonic()
            run.detected = monitor.first_at_or_above(label, since=attack.t_first)
            if run.detected is not None:
                run.ttd = run.detected.t1 - attack.t_first
            res.log(f"{attack.name}: token {label}, first request at {res.rel(attack.t_first)} s, "
                    f"{attack.outcome} at {res.rel(attack.t_last)} s; "
                    + (f"score >= 1 after {run.ttd:.1f} s" if run.ttd is not None else "not detected")
                    + f"; {attack.stats.summary()}")
            if attack.failure:
                res.log(f"  {attack.name} script failed: {attack.failure}")
            if require_scores and i == 0 and not monitor.series_seen():
                described = "declares the metric but " if monitor.family_seen() else ""
                raise NoScores(
                    f"agent exports no {SCORE}: it {described}had no series in any of "
                    f"{len(monitor.snapshot())} scrapes, not even after the {attack.name} attack")
            if i < len(attacks) - 1:
                pop.stop.wait(gap)
        pop.stop.wait(3.0)
    finally:
        alive = pop.stop_all()
        if alive:
            pop.failures.append(f"loops still running after stop: {alive}")
        try:
            monitor.scrape_now()
        except Exception as e:  # noqa: BLE001
            monitor.errors.append(f"final scrape: {e!r}")
        monitor.stop()
        res.t_end = time.monotonic()
    for run in res.attacks:
        run.max_score, _ = monitor.max_score(run.label, since=run.attack.t_first or 0.0)
    return res


# -- the report ---------------------------------------------------------------------------------------


def _klass(res: RunResult, record) -> str:
    for run in res.attacks:
        if record.conn_id == run.attack.name:
            return run.attack.name
    a = next((a for a in res.world.accounts if a.token == record.token), None)
    if a is None:
        return "other"
    if a is res.victim:
        return "victim (Element)"
    return a.role


def rates_report(res: RunResult) -> list[str]:
    by_class: dict[str, Counter] = defaultdict(Counter)
    tokens: dict[str, set] = defaultdict(set)
    spans: dict[str, list[float]] = {}
    for r in res.recorder.snapshot():
        k = _klass(res, r)
        by_class[k][r.endpoint] += 1
        tokens[k].add(r.token)
        sp = spans.setdefault(k, [r.started, r.started])
        sp[0], sp[1] = min(sp[0], r.started), max(sp[1], r.started)
    traffic_s = res.t_end - res.t_traffic
    out = [f"request rates over {traffic_s:.0f} s of traffic:"]
    order = ["normal", "victim (Element)", "owner", "heavy"] + [a.name for a in res.attacks]
    for k in order + sorted(set(by_class) - set(order)):
        if k not in by_class:
            continue
        c = by_class[k]
        n = sum(c.values())
        users = max(1, len(tokens[k]))
        if k in {a.name for a in res.attacks}:
            span = max(1e-3, spans[k][1] - spans[k][0])
            rate = f"{n / span:6.2f} req/s over {span:5.1f} s"
        else:
            rate = f"{60 * n / traffic_s / users:6.1f} req/min per token ({users} tokens)"
        top = ", ".join(f"{ep} {v}" for ep, v in c.most_common())
        out.append(f"  {k:18} {n:6} requests, {rate}: {top}")
    return out


def report(res: RunResult) -> str:
    lines = [f"==== detection report, seed {res.seed} ===="]
    lines.append(f"{'attack':14} {'token':16} {'first req':>9} {'detected':>9} {'ttd s':>6} {'max':>6} "
                 f"{'outcome':10} reasons at detection")
    for run in res.attacks:
        a = run.attack
        det = run.detected
        reasons = det.reasons.get(run.label, {}) if det else {}
        rs = ", ".join(f"{k}={v:.2f}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"{a.name:14} {run.label:16} {res.rel(a.t_first):>9} {res.rel(det.t1 if det else None):>9} "
            f"{(f'{run.ttd:.1f}' if run.ttd is not None else 'never'):>6} {run.max_score:6.2f} "
            f"{a.outcome:10} {rs or '-'}")
    lines.append("")
    lines.append("normal tokens (highest score observed while normal):")
    for label, acc in sorted(res.normal_labels().items(), key=lambda kv: kv[1].index):
        until = res.normal_until(label)
        best, at = res.monitor.max_score(label, until=until)
        note = " (victim; until the stolen-token script started)" if until is not None else ""
        reasons = ""
        if at is not None and at.reasons.get(label):
            reasons = "  " + ", ".join(f"{k}={v:.2f}" for k, v in sorted(at.reasons[label].items(),
                                                                        key=lambda kv: -kv[1]))
        lines.append(f"  {acc.role:6} {acc.name:8} {label} rooms {len(acc.rooms):2} max {best:5.2f}{note}{reasons}")
    known = set(res.labels.values()) | {r.label for r in res.attacks}
    foreign = {l for s in res.monitor.snapshot() for l in s.scores if l not in known}
    if foreign:
        lines.append(f"scored labels of no token of this run: {sorted(foreign)}")
    lines.append("")
    lines.extend(rates_report(res))
    pops = res.population
    syncs = sum(s.stats.syncs for s in pops.sessions)
    lines.append(f"population: {syncs} syncs ({sum(s.stats.sync_events for s in pops.sessions) / max(1, syncs):.1f} "
                 f"timeline events each on average), "
                 f"{sum(s.stats.full_syncs for s in pops.sessions)} initial syncs, "
                 f"Matrix errors {dict(pops.errors) or 'none'}, failures {len(pops.failures)}; "
                 f"{pops.mover.a.name} changed address after {pops.move_after:.0f} s")
    samples = res.monitor.snapshot()
    if samples:
        gaps = [b.t0 - a.t0 for a, b in zip(samples, samples[1:])]
        lines.append(f"monitor: {len(samples)} scrapes, largest gap {max(gaps, default=0):.1f} s, "
                     f"{len(res.monitor.errors)} errors; run took {res.t_end - res.t_start:.0f} s")
    return "\n".join(lines)


# -- checks -------------------------------------------------------------------------------------------


def traffic_problems(res: RunResult) -> list[str]:
    """The traffic did what it claims: the attacks' calls returned data, normal users ran."""
    p: list[str] = []
    pop = res.population
    p += [f"normal traffic: {f}" for f in pop.failures[:10]]
    server_errors = {k: v for k, v in pop.errors.items() if k[1] >= 500 or k[1] == 429}
    if server_errors:
        p.append(f"normal traffic got server errors: {server_errors}")
    for s in pop.sessions:
        if s.stats.syncs < 5:
            p.append(f"{s.a.label} synced only {s.stats.syncs} times")
        if s.stats.actions["send"] < 1:
            p.append(f"{s.a.label} sent nothing")
    for run in res.attacks:
        a, st = run.attack, run.attack.stats
        name = a.name
        if a.failure:
            p.append(f"{name}: script failed: {a.failure.strip().splitlines()[-1]}")
        if a.t_first is None:
            p.append(f"{name}: made no request")
            continue
        bad = {k: v for k, v in st.statuses.items() if k != 200}
        if bad:
            p.append(f"{name}: non-200 answers {bad}: {st.errors[:3]}")
        total = sum(st.requests.values())
        if total < 3:
            p.append(f"{name}: only {total} requests")
        if name in ("fast_scrape", "slow_scrape", "stolen_token"):
            if st.pages < 1 or st.events < 1 or st.pages == st.empty_pages:
                p.append(f"{name}: /messages returned no events ({st.pages} pages)")
        if name == "context_walk" and (st.contexts < 1 or st.events < 1):
            p.append(f"{name}: /context returned no events ({st.contexts} contexts)")
        if name == "media_spree" and (st.media_ok < 1 or st.media_bad):
            p.append(f"{name}: {st.media_ok} media downloads verified, bad: {st.media_bad[:5]}")
        if name == "stolen_token" and st.media_bad:
            p.append(f"{name}: bad media downloads {st.media_bad[:5]}")
        if name == "search_sweep" and (st.search_terms < 1 or st.search_terms_with_hits < 0.8 * st.search_terms):
            p.append(f"{name}: only {st.search_terms_with_hits} of {st.search_terms} terms found anything")
    return p


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("run_seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_bulk_reads_alert_within_a_minute_and_normal_use_never_does(world, vigie_factory, tmp_path, run_seed):
    conf = tmp_path / "vigie.toml"
    conf.write_text(f"top_k = {TOP_K}\n")
    vigie = vigie_factory(world.synapse.port, extra_args=["--config", str(conf)])
    print(f"seed {run_seed} (seeds of this session: {SEEDS}; VIGIE_TEST_SEED / VIGIE_DETECTION_SEEDS)")
    try:
        res = run_detection(world, vigie, run_seed)
    except NoScores as e:
        pytest.fail(str(e), pytrace=False)
    text = report(res)
    print(text)
    (tmp_path / "detection_report.txt").write_text("\n".join(res.lines) + "\n\n" + text + "\n")
    res.recorder.dump(tmp_path / "client_requests.jsonl",
                      redact=[a.token for a in world.accounts] + [r.attack.token for r in res.attacks])
    vigie.assert_running()

    problems: list[str] = []
    # 1. Every attack alerts within a minute of its first request.
    for run in res.attacks:
        if run.ttd is None:
            problems.append(f"{run.name} ({run.label}) never reached {ALERT} (max {run.max_score:.2f})")
        elif run.ttd > DETECT_WITHIN_S:
            problems.append(f"{run.name} ({run.label}) reached {ALERT} only after {run.ttd:.1f} s")
    # 2. No normal token ever alerts.
    for label, acc in res.normal_labels().items():
        until = res.normal_until(label)
        for s in res.monitor.snapshot():
            if until is not None and s.t0 >= until:
                break
            score = s.scores.get(label, 0.0)
            if score >= ALERT:
                problems.append(f"normal token {acc.label} ({label}) scored {score:.2f} at "
                                f"{s.t0 - res.t_traffic:.0f} s: {s.reasons.get(label)}")
                break
    # 3. Attack tokens are exported: their score and their own request series.
    final = res.monitor.last_metrics
    for run in res.attacks:
        if run.detected is None:
            continue
        if final is None or final.get_value(SCORE, token=run.label) is None:
            problems.append(f"{run.name} ({run.label}): no {SCORE} series at the end of the run")
        if final is None or not final.series(REQUESTS, token=run.label):
            problems.append(f"{run.name} ({run.label}): no {REQUESTS} series of its own (top_k = {TOP_K})")
    # 4. The traffic was real.
    problems += traffic_problems(res)
    if res.monitor.errors:
        problems.append(f"{len(res.monitor.errors)} scrapes failed: {res.monitor.errors[:2]}")
    if problems:
        pytest.fail(f"seed {run_seed}: {len(problems)} problems:\n  " + "\n  ".join(problems)
                    + f"\n\n{text}", pytrace=False)

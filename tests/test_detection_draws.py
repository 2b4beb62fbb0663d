"""Detection judged on drawn traffic (issue 11): randomized scrapes and legitimate heavy readers.

One Synapse and one world for the whole module (harness/world.py with a big room of 1,500
messages, a moderation bot and a bridge account in every room), one agent, the Element-like
population of test_detection.py throughout. Then, concurrently (vigie scores per token):

- `VIGIE_DRAWS` drawn scrapes (default 8; harness/draws.py says what is drawn and from which
  ranges) made with the tests' own HTTP client, `VIGIE_NIO_DRAWS` more (default a quarter of
  that, at least 2) made with matrix-nio, a real third-party client library
  (harness/nio_draws.py), and `VIGIE_BROWSER_DRAWS` (default an eighth, at least 2) made by
  matrix-js-sdk in headless Chromium, a real browser beside its own sync loop
  (harness/browser_draws.py), at most `VIGIE_DRAWS_CONCURRENCY` (default: all) at a time, each
  on a fresh login of the hijacked account, each running until its token reaches 1.0 or 300 s
  after its first request (`VIGIE_DRAW_HORIZON_S` longer, to see how late a miss is caught);
- the legitimate heavy readers: the four of harness/draws.py (one-room export, moderation
  bot, key-backup restore, bridge), and two members in a real browser (harness/browser_draws.py):
  one exporting the big room, one catching up on every room on a new laptop, from the start to
  the end.

Asserted: every draw with pace <= 3 s reaches 1.0 within 60 s of its first request, every
draw with pace <= 10 s within 300 s; no legitimate reader and no population token ever
reaches 1.0; every actor did its work. A late draw fails the test, except one that had opened
fewer than `BREADTH_ROOMS` rooms by its target (what requirement 1 keeps below 1.0) and was
flagged within its target of opening that many: such a miss is an expected failure (xfail),
reported with its rooms, never a pass (harness/draws.py, `verdict`). Printed (and left in
draws_report.txt, and in `VIGIE_DRAWS_REPORT` when set, with the same figures as JSON beside it
for `harness.draws_pool` to pool several seeds): each draw's parameters, time to
detect, reasons and the rooms it had opened by its target (a flagged draw stops: by its
alert); the distribution of times to detect (median, 90th percentile, worst), the misses
judged by `verdict` and how long each draw took from its `BREADTH_ROOMS`-th room to its alert
(`harness.draws_pool.summary`, the lines a pool of seeds prints too); each reader's and each population token's peak score
and reasons.

Environment: `VIGIE_DRAWS_SEED` (default `VIGIE_TEST_SEED`, else 1) seeds the world and the
draws; `cargo xtask detect --draws N [--seed S | --seeds S,T,...]` runs this file with many
draws, and pools several seeds.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.browser_draws import BrowserCatchUp, BrowserExport, BrowserScrape, browser_draw
from harness.draws import (BREADTH_ROOMS, READERS, SLOW_TARGET_S, Draw, DrawnScrape, Reader, breadth_s, draw, nio_draw,
                           rooms_by, verdict)
from harness.draws_pool import summary
from harness.matrix import Recorder
from harness.monitor import ALERT, ScoreMonitor
from harness.nio_draws import NioScrape
from harness.population import Population
from harness.synapse import Synapse
from harness.util import HarnessError
from harness.world import World, build_world

# How long a draw runs if it is not flagged: the slowest draw's target by default. `cargo xtask
# detect --horizon S` lets the misses run on, to say how late they are caught (the targets and
# the verdict are unchanged).
DRAW_MAX_S = max(SLOW_TARGET_S, float(os.environ.get("VIGIE_DRAW_HORIZON_S") or SLOW_TARGET_S))
SEED = int(os.environ.get("VIGIE_DRAWS_SEED") or os.environ.get("VIGIE_TEST_SEED") or "1")
DRAWS = int(os.environ.get("VIGIE_DRAWS", "8"))
NIO_DRAWS = int(os.environ.get("VIGIE_NIO_DRAWS") or max(2, DRAWS // 4))
BROWSER_DRAWS = int(os.environ.get("VIGIE_BROWSER_DRAWS") or max(2, DRAWS // 8))
ALL_DRAWS = DRAWS + NIO_DRAWS + BROWSER_DRAWS
# By default every draw at once: one wave of at most 300 s keeps the CI run bounded.
CONCURRENCY = int(os.environ.get("VIGIE_DRAWS_CONCURRENCY") or ALL_DRAWS)
ALL_READERS = (*READERS, BrowserExport, BrowserCatchUp)
WARMUP_S = 30.0
READERS_MAX_S = 420.0


@pytest.fixture(scope="module")
def draws_world(tmp_path_factory) -> World:
    workdir = tmp_path_factory.mktemp("synapse-draws")
    try:
        fast = tempfile.mkdtemp(prefix="vigie-draws-db-", dir="/dev/shm")
    except OSError:
        fast = None
    db = Path(fast or workdir) / "homeserver.db"
    server = Synapse(workdir, extra_config={"database": {"name": "sqlite3", "args": {"database": str(db)}}})
    try:
        try:
            server.start(timeout=60)
        except HarnessError as e:
            pytest.fail(f"Synapse failed to start: {e}", pytrace=False)
        w = build_world(server, seed=SEED, extras=("modbot", "bridge"), big_room=1500)
        yield w
    finally:
        server.stop()
        if fast:
            shutil.rmtree(fast, ignore_errors=True)


@dataclass
class DrawRun:
    params: Draw
    attack: DrawnScrape | NioScrape | BrowserScrape
    label: str = ""
    ttd: float | None = None
    max_score: float = 0.0
    reasons: dict | None = None

    def room_opened_s(self) -> list[float]:
        """Seconds from the scrape's first request to each room's first page, in order."""
        t = self.attack.t_first
        return [] if t is None else [at - t for at in self.attack.stats.opened_at]

    def rooms_by(self, seconds: float) -> int:
        return rooms_by(self.room_opened_s(), seconds)

    def breadth_s(self) -> float | None:
        """When the scrape opened its `BREADTH_ROOMS`-th room, if it did."""
        return breadth_s(self.room_opened_s())

    def verdict(self) -> str:
        """"met", "narrow" or "missed" (see `harness.draws.verdict`)."""
        return verdict(self.ttd, self.params.target_s, self.room_opened_s(), DRAW_MAX_S)


def _fmt_reasons(r: dict | None) -> str:
    return ", ".join(f"{k}={v:.2f}" for k, v in sorted((r or {}).items(), key=lambda kv: -kv[1])) or "-"


def run_draws(world: World, vigie, seed: int, n: int, n_nio: int, n_browser: int, concurrency: int, log=print):
    rec = Recorder()
    monitor = ScoreMonitor(vigie, interval=1.0)
    pop = Population(world, seed, rec)
    readers: list[Reader] = [cls(world, rec, seed) for cls in ALL_READERS]
    reader_labels = {}
    for r in readers:
        tok = r.prepare()
        reader_labels[r.name] = vigie.labels([tok])[tok]
    pop_labels = vigie.labels([a.token for a in world.accounts])
    monitor.start()
    pop.start()
    t0 = time.monotonic()
    reader_stop = threading.Event()
    reader_threads = [threading.Thread(target=r.run, args=(reader_stop,), daemon=True, name=r.name) for r in readers]
    for t in reader_threads:
        t.start()
    runs: list[DrawRun] = []
    lock = threading.Lock()
    todo: queue.Queue = queue.Queue()
    # The kinds alternate in the queue, so that a wave of fewer workers than draws mixes them.
    kinds = [("harness", i) for i in range(n)]
    for j in range(n_nio):
        kinds.insert(min(len(kinds), 5 * j + 3), ("nio", j))
    for j in range(n_browser):
        kinds.insert(min(len(kinds), 7 * j + 1), ("browser", j))
    for item in kinds:
        todo.put(item)
    pop.stop.wait(WARMUP_S)

    def worker(k: int) -> None:
        # Stagger the first draws so that they do not all log in within the same second.
        time.sleep(3.0 * k)
        while True:
            try:
                kind, i = todo.get_nowait()
            except queue.Empty:
                return
            if kind == "nio":
                p = nio_draw(seed, i)
                a = NioScrape(world, seed, params=p)
            elif kind == "browser":
                p = browser_draw(seed, i)
                a = BrowserScrape(world, seed, params=p)
            else:
                p = draw(seed, i)
                a = DrawnScrape(world, rec, seed, address=f"203.0.113.{10 + i % 240}", params=p)
            tok = a.prepare()
            run = DrawRun(p, a, vigie.labels([tok])[tok])
            with lock:
                runs.append(run)
            detected = monitor.watch(run.label, since=time.monotonic())
            th = threading.Thread(target=a.run, args=(detected, DRAW_MAX_S), daemon=True, name=a.name)
            th.start()
            th.join(DRAW_MAX_S + 60)
            if a.t_first is not None:
                detected.wait(max(0.0, a.t_first + DRAW_MAX_S - time.monotonic()))
                s = monitor.first_at_or_above(run.label, since=a.t_first)
                if s is not None:
                    run.ttd = s.t1 - a.t_first
                    run.reasons = s.reasons.get(run.label)
                run.max_score, at = monitor.max_score(run.label, since=a.t_first)
                if run.reasons is None and at is not None:
                    run.reasons = at.reasons.get(run.label)
            log(f"{a.name}: {p.describe()} -> "
                + (f"score >= 1 after {run.ttd:5.1f} s" if run.ttd is not None else f"not detected (max {run.max_score:.2f})")
                + f"; {a.outcome}; {a.stats.pages} pages, {a.stats.events} events, {len(a.stats.rooms)} rooms, "
                f"{a.syncs} syncs; {_fmt_reasons(run.reasons)}")

    workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    # The readers run at least 4 minutes, so that the export and the restore are well behind them.
    pop.stop.wait(max(3.0, t0 + 240.0 - time.monotonic()))
    # A reader with work left (the browser catch-up's sitting is drawn) gets up to 3 more
    # minutes to finish it.
    while any(r.busy() for r in readers) and time.monotonic() < t0 + READERS_MAX_S:
        time.sleep(1.0)
    reader_stop.set()
    for t in reader_threads:
        t.join(60)
    alive = pop.stop_all()
    monitor.scrape_now()
    monitor.stop()
    return runs, readers, reader_labels, pop, pop_labels, monitor, alive, time.monotonic() - t0


def report(runs, readers, reader_labels, pop_labels, world, monitor) -> tuple[str, list[str], list[str], dict]:
    """The run's text report, its problems (failures), its narrow misses (xfail) and the same
    figures as data, for pooling several seeds (`harness.draws_pool`)."""
    lines = [f"==== drawn scrapes, seed {SEED}: {len(runs)} draws ===="]
    data: dict = {"seed": SEED, "horizon_s": DRAW_MAX_S, "draws": [], "readers": {}}
    problems: list[str] = []
    missed: list[str] = []
    for run in sorted(runs, key=lambda r: r.params.index):
        ttd = f"{run.ttd:6.1f}" if run.ttd is not None else " never"
        target = run.params.target_s
        rooms = run.rooms_by(target)
        lines.append(f"{run.attack.name} {run.params.describe()} ttd {ttd} s (target {target:.0f}) "
                     f"max {run.max_score:5.2f} opened {rooms:2d} rooms  {_fmt_reasons(run.reasons)}")
        data["draws"].append({"name": run.attack.name, "library": run.params.library, "pace": run.params.pace,
                              "params": run.params.describe(), "ttd_s": run.ttd, "target_s": target,
                              "opened_s": run.room_opened_s(), "max": run.max_score})
        outcome = run.verdict()
        if outcome != "met":
            third = run.breadth_s()
            why = (f"by then it had opened {rooms} room(s): a narrow reader, whose depth alone is no alert"
                   + (f"; its room {BREADTH_ROOMS} came at {third:.1f} s" if third is not None else "")
                   if rooms < BREADTH_ROOMS else f"it had opened {rooms} rooms by then")
            if outcome == "missed" and rooms < BREADTH_ROOMS:
                why += f", and it was still unflagged {target:.0f} s after that room"
            line = (f"{run.attack.name} ({run.params.describe()}): "
                    + (f"flagged after {run.ttd:.1f} s" if run.ttd is not None else "never flagged")
                    + f", target {target:.0f} s (max {run.max_score:.2f}); {why}")
            if outcome == "missed":
                problems.append(f"issue 11 target missed: {line}")
            else:
                missed.append(line)
        st = run.attack.stats
        if run.attack.failure:
            problems.append(f"{run.attack.name}: script failed: {run.attack.failure.strip().splitlines()[-1]}")
        if st.pages < 1 or st.events < 1:
            problems.append(f"{run.attack.name}: /messages returned no events ({st.pages} pages)")
        bad = {k: v for k, v in st.statuses.items() if k != 200}
        if bad:
            problems.append(f"{run.attack.name}: non-200 answers {bad}: {st.errors[:2]}")
        if run.params.sync_loop and run.attack.syncs < 1:
            problems.append(f"{run.attack.name}: its sync loop never synced ({run.attack.sync_failure})")
    lines += summary([(SEED, DRAW_MAX_S, d) for d in data["draws"]])
    lines.append("")
    lines.append("legitimate heavy readers (peak score, reasons at the peak):")
    for r in readers:
        label = reader_labels[r.name]
        best, at = monitor.max_score(label)
        lines.append(f"  {r.name:20} {label} peak {best:5.2f}  {_fmt_reasons(at.reasons.get(label) if at else None)}"
                     f"  [{r.stats.summary()}]")
        data["readers"][r.name] = best
        if best >= ALERT:
            problems.append(f"legitimate reader {r.name} ({label}) reached {best:.2f}: "
                            f"{_fmt_reasons(at.reasons.get(label) if at else None)}")
        problems += r.problems()
    lines.append("population (peak score, reasons at the peak):")
    worst = {}
    for a in world.accounts:
        label = pop_labels[a.token]
        best, at = monitor.max_score(label)
        worst[a.label] = best
        if best > 0:
            lines.append(f"  {a.label:16} {label} peak {best:5.2f}  "
                         f"{_fmt_reasons(at.reasons.get(label) if at else None)}")
        if best >= ALERT:
            problems.append(f"population token {a.label} ({label}) reached {best:.2f}")
    lines.append(f"  worst population peak {max(worst.values(), default=0):.2f} over {len(worst)} tokens")
    data["population_worst"] = max(worst.values(), default=0.0)
    return "\n".join(lines), problems, missed, data


@pytest.mark.timeout(3600 + int(DRAW_MAX_S - SLOW_TARGET_S))
def test_drawn_scrapes_are_flagged_and_heavy_readers_never_are(draws_world, vigie_factory, tmp_path):
    vigie = vigie_factory(draws_world.synapse.port)
    t = time.monotonic()
    runs, readers, reader_labels, pop, pop_labels, monitor, alive, took = run_draws(
        draws_world, vigie, SEED, DRAWS, NIO_DRAWS, BROWSER_DRAWS, CONCURRENCY)
    text, problems, missed, data = report(runs, readers, reader_labels, pop_labels, draws_world, monitor)
    text += f"\nrun took {time.monotonic() - t:.0f} s ({took:.0f} s of traffic); world built in " \
            f"{draws_world.build_seconds:.0f} s"
    print(text)
    outs = [tmp_path / "draws_report.txt"]
    if os.environ.get("VIGIE_DRAWS_REPORT"):
        outs.append(Path(os.environ["VIGIE_DRAWS_REPORT"]))
    figures = json.dumps(data, indent=1) + "\n"
    for out in outs:  # the text, and its figures as JSON beside it for harness.draws_pool
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(figures)
    vigie.assert_running()
    if len(runs) != ALL_DRAWS:
        problems.append(f"{len(runs)} draws ran of {ALL_DRAWS}")
    if alive:
        problems.append(f"population loops still running: {alive}")
    problems += [f"population: {f}" for f in pop.failures[:5]]
    if monitor.errors:
        problems.append(f"{len(monitor.errors)} scrapes failed: {monitor.errors[:2]}")
    if problems:
        pytest.fail(f"{len(problems)} problems:\n  " + "\n  ".join(problems + missed) + f"\n\n{text}", pytrace=False)
    if missed:
        # Only narrow draws get here: at their target they had read one or two rooms, which
        # requirement 1 keeps below 1.0 however deep, and they were flagged within their
        # target of opening a third room (harness.draws.verdict). The target is still
        # missed, so this is reported as such, never as a pass; a draw that had opened three
        # rooms by its target and was late is a hard failure above, like a false alarm.
        pytest.xfail(f"issue 11 target missed by {len(missed)} of {len(runs)} draws, each narrow at its "
                     f"target:\n  " + "\n  ".join(missed))

"""Watching the agent's anomaly scores: a thread that scrapes `/metrics` every second and keeps
every token's `vigie_token_anomaly_score` (and its reasons) over time."""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass

from . import metrics as metrics_mod

SCORE = "vigie_token_anomaly_score"
REASON = "vigie_token_anomaly_reason"
ALERT = 1.0


@dataclass
class Sample:
    t0: float  # monotonic, when the scrape was sent
    t1: float  # monotonic, when its answer was parsed
    scores: dict[str, float]  # token label -> score
    reasons: dict[str, dict[str, float]]  # token label -> reason -> value
    family: bool  # the exposition mentions vigie_token_anomaly_score at all


@dataclass
class Alert:
    label: str
    sample: Sample

    @property
    def score(self) -> float:
        return self.sample.scores[self.label]

    @property
    def reasons(self) -> dict[str, float]:
        return self.sample.reasons.get(self.label, {})


class ScoreMonitor:
    def __init__(self, vigie, interval: float = 1.0):
        self.vigie = vigie
        self.interval = interval
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self.last_metrics: metrics_mod.Metrics | None = None
        self._lock = threading.Lock()
        self._watched: dict[str, tuple[float, threading.Event]] = {}  # label -> (since, event)
        self.first_alert: dict[str, Alert] = {}  # label -> first sample at or above ALERT
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="score-monitor", daemon=True)

    # -- control ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def watch(self, label: str, since: float | None = None) -> threading.Event:
        """An event set at the first scrape, sent at or after `since` (monotonic), in which
        `label` scores ALERT or more."""
        ev = threading.Event()
        with self._lock:
            self._watched[label] = (time.monotonic() if since is None else since, ev)
        return ev

    def scrape_now(self) -> Sample:
        return self._scrape()

    # -- scraping -----------------------------------------------------------------------------
    def _scrape(self) -> Sample:
        t0 = time.monotonic()
        text = self.vigie.scrape_text(timeout=5)
        m = metrics_mod.parse(text)
        scores = {d["token"]: v for d, v in m.series(SCORE) if "token" in d}
        reasons: dict[str, dict[str, float]] = {}
        for d, v in m.series(REASON):
            if "token" in d and "reason" in d:
                reasons.setdefault(d["token"], {})[d["reason"]] = v
        s = Sample(t0, time.monotonic(), scores, reasons, SCORE in text)
        with self._lock:
            self.samples.append(s)
            self.last_metrics = m
            for label, score in scores.items():
                if score >= ALERT and label not in self.first_alert:
                    self.first_alert[label] = Alert(label, s)
                w = self._watched.get(label)
                if w and score >= ALERT and t0 >= w[0]:
                    w[1].set()
        return s

    def _loop(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                self.vigie.assert_running()
                self._scrape()
            except Exception:  # noqa: BLE001 - keep watching; reported at the end
                self.errors.append(traceback.format_exc(limit=2))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - start)))

    # -- queries ------------------------------------------------------------------------------
    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    def family_seen(self) -> bool:
        """Some scrape declared (or had series of) vigie_token_anomaly_score."""
        return any(s.family for s in self.snapshot())

    def series_seen(self) -> bool:
        """Some scrape had at least one vigie_token_anomaly_score series."""
        return any(s.scores for s in self.snapshot())

    def first_at_or_above(self, label: str, since: float, until: float | None = None,
                          threshold: float = ALERT) -> Sample | None:
        for s in self.snapshot():
            if s.t0 >= since and (until is None or s.t0 <= until) and s.scores.get(label, 0.0) >= threshold:
                return s
        return None

    def max_score(self, label: str, since: float = 0.0, until: float | None = None) -> tuple[float, Sample | None]:
        best, at = 0.0, None
        for s in self.snapshot():
            if s.t0 < since or (until is not None and s.t0 >= until):
                continue
            v = s.scores.get(label)
            if v is not None and (at is None or v > best):
                best, at = v, s
        return best, at

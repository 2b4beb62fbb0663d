"""Comparing vigie's per-token metrics with the client's own accounting."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

REQUESTS = "vigie_token_requests_total"
BYTES = "vigie_token_response_bytes_total"
TOKEN = "token"
ENDPOINT = "endpoint"
HEX16 = re.compile(r"^[0-9a-f]{16}$")


def vigie_figures(m, labels: list[str]) -> dict[str, tuple]:
    """Per label: (requests, bytes, sorted ((endpoint, requests), ...), sorted ((endpoint, bytes), ...))."""
    reqs = m.sum_by(REQUESTS, TOKEN)
    byts = m.sum_by(BYTES, TOKEN)
    per_ep = m.sum_by2(REQUESTS, TOKEN, ENDPOINT)
    bytes_ep = m.sum_by2(BYTES, TOKEN, ENDPOINT)
    out = {}
    for label in labels:
        eps = tuple(sorted((ep, v) for (t, ep), v in per_ep.items() if t == label))
        beps = tuple(sorted((ep, v) for (t, ep), v in bytes_ep.items() if t == label))
        out[label] = (reqs.get(label, 0.0), byts.get(label, 0.0), eps, beps)
    return out


def client_figures(totals: dict, tokens: list[str], labels: dict[str, str]) -> dict[str, tuple]:
    return {
        labels[t]: (
            float(totals[t]["requests"]),
            float(totals[t]["bytes"]),
            tuple(sorted((ep, float(n)) for ep, n in totals[t]["by_endpoint"].items())),
            tuple(sorted((ep, float(n)) for ep, n in totals[t]["bytes_by_endpoint"].items())),
        )
        for t in tokens
    }


def poll_until_stable(vigie, labels: list[str], expected: dict[str, tuple], *,
                      interval: float = 0.5, timeout: float = 15.0, stable_polls: int = 6):
    """Scrape every `interval` s until the figures equal `expected`, or stop changing for
    `stable_polls` scrapes in a row, or `timeout` passes. Returns (metrics, figures, waited)."""
    def read():
        m = vigie.scrape()
        return m, vigie_figures(m, labels)
    return poll_settled(vigie, read, expected, interval=interval, timeout=timeout, stable_polls=stable_polls)


def poll_settled(vigie, read, expected, *, interval: float = 0.5, timeout: float = 15.0, stable_polls: int = 6):
    """Call `read()` (returning (metrics, value)) every `interval` s until its value equals
    `expected`, or stops changing for `stable_polls` reads in a row, or `timeout` passes: the
    agent drains its ring on its own clock, so a figure read once may be a few records behind.
    Returns (metrics, value, waited)."""
    t0 = time.monotonic()
    last = None
    same = 0
    while True:
        vigie.assert_running()
        m, value = read()
        if value == expected:
            return m, value, time.monotonic() - t0
        same = same + 1 if value == last else 0
        last = value
        if same >= stable_polls or time.monotonic() - t0 >= timeout:
            return m, value, time.monotonic() - t0
        time.sleep(interval)


@dataclass
class Comparison:
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def report(self) -> str:
        return "\n".join(self.lines)


def compare(m, fig: dict[str, tuple], totals: dict, names: dict[str, str], labels: dict[str, str],
            *, extra_labels_allowed: set[str] = frozenset(), forbidden_labels: dict[str, str] | None = None,
            bytes_per_endpoint: bool = True, check_foreign: bool = True) -> Comparison:
    """Check every token (`names`: token -> display name) against vigie's figures.

    Everything is exact, because on every path the suite drives it is: per token, requests
    and response bytes; per token and endpoint class, requests and (when
    `bytes_per_endpoint`) response bytes. The one caller that may pass
    `bytes_per_endpoint=False` is traffic with pipelined requests: there the agent cannot
    know which request of a batch a byte answers without parsing responses (README), so bytes
    are exact per token but not per class. Every token must have made requests, or its
    equality proves nothing. Also: no hex label vigie exports may be foreign (a token no
    client used), nothing may go to the overflow series, and `forbidden_labels`
    (what -> label) must be absent.
    """
    c = Comparison()
    out = c.lines.append
    tokens = list(names)
    header = (f"{'session':10} {'token label':16} {'client reqs':>11} {'vigie reqs':>10} "
              f"{'client bytes':>12} {'vigie bytes':>12} {'ratio':>8}")
    out(header)
    out("-" * len(header))
    tot = [0, 0.0, 0, 0.0]
    for t in tokens:
        label = labels[t]
        ct = totals.get(t, {"requests": 0, "bytes": 0, "by_endpoint": {}})
        v_reqs, v_bytes = fig[label][0], fig[label][1]
        ratio = v_bytes / ct["bytes"] if ct["bytes"] else float("nan")
        note = ""
        if not ct["requests"]:
            c.problems.append(f"{names[t]} {label}: the client made no request with this token: nothing to compare")
            note += " IDLE"
        if v_reqs != ct["requests"]:
            c.problems.append(f"{names[t]} {label}: vigie counted {v_reqs:.0f} requests, client sent {ct['requests']}")
            note += " REQS"
        if v_bytes != ct["bytes"]:
            c.problems.append(f"{names[t]} {label}: vigie counted {v_bytes:.0f} response bytes, "
                              f"client received {ct['bytes']} (ratio {ratio:.4f})")
            note += " BYTES"
        out(f"{names[t]:10} {label:16} {ct['requests']:>11} {v_reqs:>10.0f} {ct['bytes']:>12} "
            f"{v_bytes:>12.0f} {ratio:>8.4f}{note}")
        tot[0] += ct["requests"]
        tot[1] += v_reqs
        tot[2] += ct["bytes"]
        tot[3] += v_bytes
    out("-" * len(header))
    out(f"{'total':10} {'':16} {tot[0]:>11} {tot[1]:>10.0f} {tot[2]:>12} {tot[3]:>12.0f} "
        f"{(tot[3] / tot[2] if tot[2] else float('nan')):>8.4f}")

    endpoints = sorted({ep for t in tokens for ep in totals.get(t, {}).get("by_endpoint", {})}
                       | {ep for t in tokens for ep, _ in fig[labels[t]][2]})
    out("")
    out("per endpoint class (these tokens):  requests client / vigie      bytes client / vigie")
    for ep in endpoints:
        c_n = sum(totals.get(t, {}).get("by_endpoint", {}).get(ep, 0) for t in tokens)
        v_n = sum(dict(fig[labels[t]][2]).get(ep, 0) for t in tokens)
        c_b = sum(totals.get(t, {}).get("bytes_by_endpoint", {}).get(ep, 0) for t in tokens)
        v_b = sum(dict(fig[labels[t]][3]).get(ep, 0) for t in tokens)
        flag = "" if c_n == v_n else "  REQS MISMATCH"
        if v_b != c_b:
            flag += "  BYTES OFF" if bytes_per_endpoint else "  bytes off (pipelined: not compared)"
        out(f"  {ep:16} {c_n:>15} / {v_n:<8.0f} {c_b:>14} / {v_b:<10.0f}{flag}")
    for t in tokens:
        c_eps = totals.get(t, {}).get("by_endpoint", {})
        v_eps = dict(fig[labels[t]][2])
        for ep in sorted(set(c_eps) | set(v_eps)):
            if c_eps.get(ep, 0) != v_eps.get(ep, 0):
                c.problems.append(f"{names[t]} {labels[t]} endpoint {ep}: client {c_eps.get(ep, 0)}, "
                                  f"vigie {v_eps.get(ep, 0):.0f} requests")
        if bytes_per_endpoint:
            c_b = totals.get(t, {}).get("bytes_by_endpoint", {})
            v_b = dict(fig[labels[t]][3])
            for ep in sorted(set(c_b) | set(v_b)):
                if v_b.get(ep, 0) != c_b.get(ep, 0):
                    c.problems.append(f"{names[t]} {labels[t]} endpoint {ep}: client received "
                                      f"{c_b.get(ep, 0)} bytes, vigie counted {v_b.get(ep, 0):.0f}")

    exported = m.sum_by(REQUESTS, TOKEN)
    ours = set(labels.values()) | set(extra_labels_allowed)
    out("")
    out(f"token label values exported: {len(exported)}; without a label of ours: "
        f"{ {k: v for k, v in exported.items() if k not in ours} }")
    for what, label in (forbidden_labels or {}).items():
        if label in exported:
            c.problems.append(f"{what} was counted as a request's token (label {label})")
    foreign = sorted(x for x in exported if HEX16.match(x) and x not in ours
                     and x not in set((forbidden_labels or {}).values()))
    if foreign and check_foreign:
        c.problems.append(f"labels of tokens no client used: {foreign}")
    if exported.get("overflow", 0):
        c.problems.append(f"{exported['overflow']:.0f} requests went to the overflow series "
                          f"with only {len(tokens)} tokens")
    return c


@dataclass
class Run:
    """What a scenario run left to compare: the client's side and the agent's figures."""
    tokens: list[str]
    totals: dict
    labels: dict[str, str]
    decoy_label: str
    metrics: object
    figures: dict[str, tuple]
    waited: float


def run_and_read(sc, rec, vigie, view, tmp_path, decoy: str, run=None) -> Run:
    """Run the scenario to its end (no request left in flight, no server error), then read
    the agent's figures (through `view`, e.g. one vantage point) once they stop changing.
    The client's request log is left in tmp_path with tokens redacted."""
    try:
        sc.setup()
        (run or sc.run)()
        assert not sc.failures, "client loops failed:\n" + "\n".join(sc.failures)
        # Every loop has returned: no request is outstanding.
        assert rec.in_flight == 0, "requests still in flight"
        bad = [e for e in sc.errors if e[2] >= 500 or e[2] == 429]
        assert not bad, f"server answered errors: {bad[:20]}"
        vigie.assert_running()
        tokens = sc.tokens
        totals = rec.totals()
        labels = vigie.labels(tokens + [decoy])
        decoy_label = labels.pop(decoy)
        assert len(set(labels.values())) == len(tokens), "two tokens got the same label"
        expected = client_figures(totals, tokens, labels)
        m, fig, waited = poll_until_stable(view, [labels[t] for t in tokens], expected)
    finally:
        sc.close()
        rec.dump(tmp_path / "client_requests.jsonl", redact=sc.tokens)
    return Run(tokens, totals, labels, decoy_label, m, fig, waited)

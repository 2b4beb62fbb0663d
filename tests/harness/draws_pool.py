"""Issue 11's figures over several seeds: one summary of many runs of
tests/test_detection_draws.py, from the JSON each run leaves beside its text report.

A single seed draws 12-14 scrapes; the issue's distribution (median, 90th percentile, worst)
and its misses mean something only over many. `cargo xtask detect --seeds 2,27,53` runs the
seeds one after the other and prints this; by hand:
`cd tests && .venv/bin/python -m harness.draws_pool ../target/detect/draws-seed*.json`.

Each miss is judged again here with `harness.draws.verdict`, so the pooled report and the
test cannot disagree on what is narrow and what is the detector's own miss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .draws import BREADTH_ROOMS, FAST_TARGET_S, SLOW_TARGET_S, breadth_s, percentile, verdict


def _ttd(d: dict) -> float:
    return float("inf") if d["ttd_s"] is None else d["ttd_s"]


def _s(x: float) -> str:
    return "never" if x == float("inf") else f"{x:.1f} s"


def _spread(xs: list[float]) -> str:
    return f"median {_s(percentile(xs, 0.5))}, p90 {_s(percentile(xs, 0.9))}, worst {_s(max(xs))}"


def _draws(n: int) -> str:
    return f"{n} draw" if n == 1 else f"{n} draws"


def summary(draws: list[tuple[int, float, dict]]) -> list[str]:
    """Times to detect per target and per client library, each miss judged by `verdict`, and
    the delay from each draw's third room to its alert, over `draws` ((seed, horizon, draw)).
    One seed's report (tests/test_detection_draws.py) and the pool print the same lines."""
    lines = []
    bands = [(f"target {FAST_TARGET_S:.0f} s (pace <= 3 s)", lambda d: d["target_s"] == FAST_TARGET_S),
             (f"target {SLOW_TARGET_S:.0f} s (pace 3-10 s)", lambda d: d["target_s"] == SLOW_TARGET_S),
             ("made with matrix-nio", lambda d: d["library"] == "nio"),
             ("made in a browser", lambda d: d["library"] == "browser")]
    for name, keep in bands:
        sel = [d for _, _, d in draws if keep(d)]
        if sel:
            met = sum(1 for d in sel if d["ttd_s"] is not None and d["ttd_s"] <= d["target_s"])
            lines.append(f"{name}: {_draws(len(sel))}, {_spread([_ttd(d) for d in sel])}; {met} within target")
    judged = [(seed, d, verdict(d["ttd_s"], d["target_s"], d["opened_s"], horizon)) for seed, horizon, d in draws]
    for kind, says in (("narrow", f"fewer than {BREADTH_ROOMS} rooms by the target, flagged in time once broad"),
                       ("missed", "the detector's own: late, and broad by the target or long after")):
        which = [f"seed {seed} {d['name']} " + ("never" if d["ttd_s"] is None else f"{d['ttd_s']:.1f} s")
                 + f" (target {d['target_s']:.0f}, {d['params']})"
                 for seed, d, v in judged if v == kind]
        lines.append(f"{kind} ({says}): {len(which)}" + "".join(f"\n  {w}" for w in which))
    after = [max(0.0, _ttd(d) - b) for _, _, d in draws if (b := breadth_s(d["opened_s"])) is not None]
    if after:
        lines.append(f"from room {BREADTH_ROOMS} to the alert: {_draws(len(after))}, {_spread(after)}")
    return lines


def pool(reports: list[dict]) -> str:
    """The pooled report of `reports` (each a run's JSON: its seed, horizon, draws, readers)."""
    draws = [(r["seed"], r["horizon_s"], d) for r in reports for d in r["draws"]]
    seeds = ", ".join(str(r["seed"]) for r in reports)
    lines = [f"==== drawn scrapes over {len(reports)} seed(s) ({seeds}): {len(draws)} draws ===="]
    if not draws:
        return "\n".join(lines + ["no draws"])
    lines += summary(draws)
    lines.append("legitimate heavy readers, highest peak over the seeds:")
    names = sorted({n for r in reports for n in r["readers"]})
    for n in names:
        lines.append(f"  {n:20} {_peak([(r['readers'][n], r['seed']) for r in reports if n in r['readers']], 5)}")
    lines.append(f"worst population peak {_peak([(r['population_worst'], r['seed']) for r in reports])}")
    return "\n".join(lines)


def _peak(by_seed: list[tuple[float, int]], width: int = 0) -> str:
    """The highest of `by_seed` ((peak, seed)) and every seed that reached it: a tie names
    them all, so that the report does not single out one seed of many."""
    peak = max(p for p, _ in by_seed)
    seeds = [s for p, s in by_seed if p == peak]
    which = ("every seed" if len(seeds) == len(by_seed) > 1
             else f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds)))
    return f"{peak:{width}.2f} ({which})"


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: python -m harness.draws_pool REPORT.json...", file=sys.stderr)
        return 2
    print(pool([json.loads(Path(p).read_text()) for p in paths]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Acceptance test of vigie's capture: per-token request counts, response bytes and endpoint
classes must match what an exactly-counting client did against a real Synapse.

Environment: VIGIE_BIN (agent binary, default target/release/vigie), VIGIE_TEST_SEED (default 1),
VIGIE_TEST_DURATION (seconds of concurrent traffic, default 25).
"""

from __future__ import annotations

import os

import pytest

from harness.compare import compare, run_and_read
from harness.matrix import Recorder
from harness.scenario import DECOY_TOKEN, Scenario, ScenarioConfig


# Both capture sources must count the same: "sock" (sock:sock_{recv,send}_length, Linux 6.3+)
# and "syscalls", the fallback for older kernels, forced here on this kernel.
@pytest.mark.parametrize("source", ["sock", "syscalls"])
def test_capture_matches_client_accounting(synapse, vigie_factory, seed, tmp_path, source):
    print(f"seed: {seed} (set VIGIE_TEST_SEED to change); capture source: {source}")
    # The agent first: everything the tokens do is measured, setup traffic included.
    vigie = vigie_factory(synapse.port, extra_args=["--capture-source", source])
    assert vigie.scrape().get_value("vigie_capture_info", source=source) == 1, \
        f"vigie does not report capture source {source}: {vigie.scrape().series('vigie_capture_info')}"

    duration = float(os.environ.get("VIGIE_TEST_DURATION", "25"))
    cfg = ScenarioConfig(users=14, extra_logins=1, rooms=4, prefill=40, duration=duration, seed=seed)
    rec = Recorder()
    sc = Scenario(synapse, cfg, recorder=rec)
    r = run_and_read(sc, rec, vigie, vigie, tmp_path, DECOY_TOKEN)
    tokens, totals, labels, decoy_label = r.tokens, r.totals, r.labels, r.decoy_label
    m, fig, waited = r.metrics, r.figures, r.waited

    print(f"client requests log: {tmp_path / 'client_requests.jsonl'}")
    print(f"vigie figures read after {waited:.1f} s of polling; connections: {sc.connection_stats()}")
    if sc.errors:
        print(f"{len(sc.errors)} Matrix errors answered (still requests): "
              f"{sorted({(a, s, c) for _, a, s, c in sc.errors})}")
    names = {s.token: f"s{s.index:02d}" + ("(q)" if s.index == cfg.query_token_session else "")
             for s in sc.sessions}
    result = compare(m, fig, totals, names, labels,
                     forbidden_labels={"the token inside an uploaded body": decoy_label})
    print(result.report())
    vigie.assert_running()
    if result.problems:
        pytest.fail(f"{len(result.problems)} mismatches:\n" + "\n".join(result.problems[:60]), pytrace=False)

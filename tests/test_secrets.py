"""Raw access tokens must never leave vigie: not in /metrics, not in its logs, not in its state."""

from __future__ import annotations

from harness.util import token_needles

import stat
import time
from pathlib import Path

from harness.matrix import Recorder
from harness.scenario import Scenario, ScenarioConfig




def test_no_raw_token_in_metrics_logs_or_state(synapse, vigie_factory, seed):
    vigie = vigie_factory(synapse.port)
    cfg = ScenarioConfig(users=5, extra_logins=1, rooms=2, prefill=10, duration=6.0, seed=seed,
                         media_interval=(0.5, 1.5))
    rec = Recorder()
    sc = Scenario(synapse, cfg, recorder=rec)
    try:
        sc.setup()
        sc.run()
    finally:
        sc.close()
    assert not sc.failures, "\n".join(sc.failures)
    tokens = sc.tokens
    totals = rec.totals()
    assert all(totals[t]["requests"] > 0 for t in tokens), "every token must have been used"
    assert any(r.path.endswith("access_token=<redacted>") or "access_token=<redacted>" in r.path
               for r in rec.records), "a token in the query string must have been sent"

    time.sleep(1.0)
    vigie.assert_running()
    metrics_text = vigie.scrape_text()
    labels = vigie.labels(tokens)
    # Stop the agent so that whatever it writes at shutdown is on disk too.
    code = vigie.stop()
    print(f"vigie exit code after SIGTERM: {code}")

    # -- what is checked must be real ---------------------------------------------------
    assert metrics_text.strip(), "empty /metrics page"
    assert "vigie_token_requests_total" in metrics_text
    assert any(label in metrics_text for label in labels.values()), "no token label on /metrics"
    assert vigie.key_file.is_file() and vigie.key_file.stat().st_size > 0, "key file missing or empty"
    mode = stat.S_IMODE(vigie.key_file.stat().st_mode)
    if mode & 0o077:
        print(f"note: key file mode is {mode:o} (readable beyond its owner)")

    blobs: dict[str, bytes] = {"/metrics": metrics_text.encode()}
    for p in (vigie.stdout_path, vigie.stderr_path):
        blobs[str(p)] = p.read_bytes() if p.exists() else b""
    state_files = [p for p in Path(vigie.state_dir).rglob("*") if p.is_file()]
    assert state_files, "the state dir holds no file"
    for p in state_files:
        blobs[str(p)] = p.read_bytes()
    # Anything else the agent left in its working directory.
    for p in Path(vigie.workdir).rglob("*"):
        if p.is_file() and str(p) not in blobs:
            blobs[str(p)] = p.read_bytes()

    found = []
    for i, token in enumerate(tokens):
        for needle in token_needles(token):
            for where, data in blobs.items():
                if needle in data:
                    found.append(f"token #{i} ({len(needle)}-byte piece) found in {where}")
    print(f"checked {len(tokens)} tokens against {len(blobs)} blobs "
          f"({sum(len(b) for b in blobs.values())} bytes): {sorted(blobs)}")
    assert not found, "raw token material leaked:\n" + "\n".join(found)

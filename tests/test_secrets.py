"""Raw access tokens must never leave vigie: not in /metrics, not in its logs, not in its state,
and not in any file the test's own harness leaves behind (nginx-free here: Synapse's log, the
client's request log, the agent's directory)."""

from __future__ import annotations

import stat
import time
from pathlib import Path

from harness.matrix import Recorder
from harness.scenario import Scenario, ScenarioConfig
from harness.util import token_leaks


def test_no_raw_token_in_metrics_logs_or_state(synapse, vigie_factory, seed, tmp_path):
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
        rec.dump(tmp_path / "client_requests.jsonl", redact=sc.tokens)
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
        assert p.is_file() and Path(vigie.workdir) in p.parents, f"the agent's {p.name} is not under its workdir"
    assert [p for p in Path(vigie.state_dir).rglob("*") if p.is_file()], "the state dir holds no file"
    assert Path(vigie.workdir) in Path(vigie.state_dir).parents, "the agent's state dir is not under its workdir"

    # Every file the test's processes and harness wrote: Synapse's directory (its database
    # aside, see SERVER_STATE), the agent's, and the test's own (the client's request log).
    dirs = [synapse.workdir, vigie.workdir, tmp_path]
    found, scanned = token_leaks(tokens, blobs, dirs)
    print(f"checked {len(tokens)} tokens against {len(blobs)} blobs {sorted(blobs)} and {scanned['files']} files "
          f"under {[str(d) for d in dirs]} ({scanned['bytes']} bytes in all)")
    assert scanned["files"] >= 3, scanned
    assert not found, "raw token material leaked:\n" + "\n".join(found)

"""Raw access tokens must never leave vigie: not in /metrics, not in its logs, not in its state,
and not in any file the test's own harness leaves behind (nginx-free here: Synapse's log, the
client's request log, the agent's directory).

The agent runs with `[respond]` in dry-run, and `vigie respond LABEL` is used on one token during
the traffic: the token is then copied from a request, sent to whoami and zeroized; the audit file
(in the state dir), the control socket's answer and the admin token are checked too."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from harness.vigie import check_binary

from harness.matrix import Recorder
from harness.scenario import Scenario, ScenarioConfig
from harness.util import token_leaks


def test_no_raw_token_in_metrics_logs_or_state(synapse, vigie_factory, seed, tmp_path):
    _, admin_token, _ = synapse.register("secretsadmin", admin=True)
    # Outside the directories scanned below: this file is the one place the admin token may be.
    token_dir = Path(tempfile.mkdtemp(prefix="vigie-secrets-admin-"))
    token_file = token_dir / "admin_token"
    token_file.write_text(admin_token + "\n")
    os.chmod(token_file, 0o600)
    conf = tmp_path / "vigie.toml"
    conf.write_text(f'[respond]\nmode = "dry-run"\nhomeserver_url = "{synapse.base_url}"\n'
                    f'admin_token_file = "{token_file}"\n')
    vigie = vigie_factory(synapse.port, extra_args=["--config", str(conf)])
    cfg = ScenarioConfig(users=5, extra_logins=1, rooms=2, prefill=10, duration=6.0, seed=seed,
                         media_interval=(0.5, 1.5))
    rec = Recorder()
    sc = Scenario(synapse, cfg, recorder=rec)
    manual: dict = {}

    def respond_by_hand():
        time.sleep(1.5)
        label = vigie.labels([sc.tokens[0]])[sc.tokens[0]]
        manual["run"] = subprocess.run([str(check_binary()), "respond", label, "--socket",
                                        str(vigie.state_dir / "control.sock")], capture_output=True, timeout=60)

    try:
        sc.setup()
        by_hand = threading.Thread(target=respond_by_hand, daemon=True)
        by_hand.start()
        sc.run()
        by_hand.join(60)
    finally:
        sc.close()
        rec.dump(tmp_path / "client_requests.jsonl", redact=sc.tokens)
    shutil.rmtree(token_dir, ignore_errors=True)
    assert not sc.failures, "\n".join(sc.failures)
    r = manual["run"]
    print(f"vigie respond: exit {r.returncode}: {r.stdout.decode().strip()} {r.stderr.decode().strip()}")
    assert r.returncode == 0 and b"would_act" in r.stdout, "the token was not resolved through whoami"
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

    blobs: dict[str, bytes] = {"/metrics": metrics_text.encode(), "vigie respond stdout": r.stdout,
                               "vigie respond stderr": r.stderr}
    for p in (vigie.stdout_path, vigie.stderr_path):
        assert p.is_file() and Path(vigie.workdir) in p.parents, f"the agent's {p.name} is not under its workdir"
    assert [p for p in Path(vigie.state_dir).rglob("*") if p.is_file()], "the state dir holds no file"
    audit = vigie.state_dir / "respond-audit.jsonl"
    assert audit.is_file() and audit.stat().st_size, "no audit line"
    assert Path(vigie.workdir) in Path(vigie.state_dir).parents, "the agent's state dir is not under its workdir"

    # Every file the test's processes and harness wrote: Synapse's directory (its database
    # aside, see SERVER_STATE), the agent's, and the test's own (the client's request log).
    dirs = [synapse.workdir, vigie.workdir, tmp_path]
    found, scanned = token_leaks(list(tokens) + [admin_token], blobs, dirs)
    print(f"checked {len(tokens)} tokens against {len(blobs)} blobs {sorted(blobs)} and {scanned['files']} files "
          f"under {[str(d) for d in dirs]} ({scanned['bytes']} bytes in all)")
    assert scanned["files"] >= 3, scanned
    assert not found, "raw token material leaked:\n" + "\n".join(found)

"""The Synapse fixture and the scenario, without the agent: Synapse's own access log must agree
with the client's per-user request counts and response body bytes."""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict

from harness.matrix import MatrixClient, Recorder
from harness.scenario import Scenario, ScenarioConfig


def test_synapse_fixture_register_login_and_stop(synapse):
    assert synapse.running
    assert synapse.base_url == f"http://127.0.0.1:{synapse.port}"
    user_id, token, device = synapse.register("fixture_user")
    assert user_id == f"@fixture_user:{synapse.server_name}" and token.startswith("syt_") and device
    uid2, token2, device2 = synapse.login("fixture_user")
    assert uid2 == user_id and token2 != token and device2 != device
    c = MatrixClient(synapse.host, synapse.port, token2, user_id=user_id)
    assert c.whoami()["user_id"] == user_id
    c.close()
    # Listener: only the configured client port on 127.0.0.1, nothing else.
    import yaml

    cfg = yaml.safe_load(synapse.config_path.read_text())
    assert [l["bind_addresses"] for l in cfg["listeners"]] == [["127.0.0.1"]]
    assert cfg["listeners"][0]["resources"] == [{"names": ["client"], "compress": False}]
    assert cfg["enable_metrics"] is False
    pid = synapse.proc.pid
    assert synapse.stop() is not None
    assert not synapse.running
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_scenario_counts_agree_with_synapse_access_log(synapse, seed):
    cfg = ScenarioConfig(users=5, extra_logins=1, rooms=2, prefill=15, duration=6.0, seed=seed,
                         media_interval=(0.5, 1.5))
    rec = Recorder()
    sc = Scenario(synapse, cfg, recorder=rec)
    try:
        sc.setup()
        sc.run()
    finally:
        sc.close()
    assert not sc.failures, "\n".join(sc.failures)
    assert all(status < 500 and status != 429 for _, _, status, _ in sc.errors), sc.errors
    time.sleep(0.5)  # let Synapse write its last access-log lines

    user_of = {s.token: s.user_id for s in sc.sessions}
    client_reqs: Counter = Counter()
    client_body: Counter = Counter()
    endpoints: Counter = Counter()
    for r in rec.records:
        if r.token is None:
            continue
        client_reqs[user_of[r.token]] += 1
        client_body[user_of[r.token]] += r.body_bytes
        endpoints[r.endpoint] += 1
    log_reqs: Counter = Counter()
    log_body: Counter = Counter()
    for line in synapse.access_log():
        if line["requester"].startswith("@"):
            uid = line["requester"].split(" ")[0]
            log_reqs[uid] += 1
            log_body[uid] += line["sent"]
    print(f"{'user':24} {'client reqs':>11} {'synapse reqs':>12} {'client body B':>13} {'synapse body B':>14}")
    for uid in sorted(client_reqs):
        print(f"{uid:24} {client_reqs[uid]:>11} {log_reqs[uid]:>12} {client_body[uid]:>13} {log_body[uid]:>14}")
    print("endpoints:", dict(sorted(endpoints.items())))
    print("connections:", sc.connection_stats())
    assert dict(client_reqs) == dict(log_reqs)
    assert dict(client_body) == dict(log_body)
    # The scenario exercised every endpoint class it is meant to.
    for ep in ("sync", "sliding_sync", "send", "messages", "members", "joined_rooms", "state",
               "media_upload", "media_download", "other"):
        assert endpoints[ep] > 0, f"no {ep} request in the scenario"
    per_token = rec.totals()
    assert len([t for t in per_token if t is not None]) == 6
    # The query-string session really used the query string, and only it.
    q = sc.sessions[cfg.query_token_session]
    assert all("access_token=<redacted>" in r.path for r in rec.records if r.token == q.token)
    assert not any("access_token=" in r.path for r in rec.records if r.token not in (q.token, None))

"""What an operator runs besides the agent: the preflight, label resolution, reload and stop.

Everything runs for real: `vigie check` loads the programs, `vigie resolve` reads a real
Synapse's database after real logins, reload and stop act on a running agent and are checked
in the kernel with bpftool.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from harness.util import token_leaks, wait_until
from harness.vigie import check_binary

REPO = Path(__file__).resolve().parent.parent


def run_vigie(*args: str, stdin: str | None = None, timeout: float = 60, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(check_binary()), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def vigie_programs() -> set[int]:
    """Ids of vigie's programs loaded in the kernel right now (bpftool's view, not the
    agent's). Compared before and after, so other agents alive meanwhile do not matter."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run([bpftool, "-j", "prog", "show"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"bpftool failed (package bpftool): {out.stderr}"
    return {p["id"] for p in json.loads(out.stdout) if str(p.get("name", "")).startswith("vigie_")}


def test_check_reports_each_capability_and_passes_here(synapse):
    before = vigie_programs()
    r = run_vigie("check", "--server-port", str(synapse.port))
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ["kernel", "BTF", "lockdown", "capabilities", "tracefs", "tracepoint sock:sock_send_length",
                 "tracepoint sock:sock_recv_length", "tracepoint syscalls:sys_enter_recvfrom", "uprobes",
                 f"server port {synapse.port}", "trial load"]:
        assert any(l.startswith("[ok  ]") and f"] {line}" in l for l in r.stdout.splitlines()), f"no ok line for {line}"
    assert "vigie can run on this host" in r.stdout
    # The kernel frees a detached raw tracepoint's program after a grace period, not at exit.
    left = wait_until(lambda: not (vigie_programs() - before), timeout=10, interval=0.2)
    assert left, f"the trial load left programs behind: {sorted(vigie_programs() - before)}"


def test_check_fails_without_the_capabilities_bpf_needs():
    """Without CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN the preflight says so and exits non-zero."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (package util-linux) is needed to drop capabilities"
    r = subprocess.run([setpriv, "--inh-caps=-all", "--bounding-set=-all", str(check_binary()), "check",
                        "--server-port", "1"], capture_output=True, text=True, timeout=60)
    print(r.stdout, r.stderr)
    assert r.returncode != 0
    assert any(l.startswith("[FAIL] capabilities") and "CAP_BPF" in l for l in r.stdout.splitlines()), r.stdout
    assert "vigie cannot run on this host" in r.stdout


def test_check_prints_the_key_fingerprint_the_agent_exports(vigie, tmp_path):
    """Hosts of a fleet compare keys by fingerprint: `vigie check` prints the one the running
    agent exports as vigie_key_info, from the key file of --key-file or of the config."""
    (series,) = vigie.scrape().series("vigie_key_info")
    labels, value = series
    assert value == 1 and re.fullmatch(r"[0-9a-f]{16}", labels["fingerprint"]), series
    config = tmp_path / "vigie.toml"
    config.write_text(f'server_ports = [1]\nkey_file = "{vigie.key_file}"\n')
    for args in (["--key-file", str(vigie.key_file), "--server-port", "1"], ["--config", str(config)]):
        r = run_vigie("check", "--no-trial", *args)
        assert r.returncode == 0, r.stdout + r.stderr
        (line,) = [l for l in r.stdout.splitlines() if l.startswith("[") and l[7:].startswith("key:")]
        assert line.startswith(f"[ok  ] key: {vigie.key_file}: fingerprint {labels['fingerprint']} "), line
    # Neither the key nor anything that would let one compute a label is printed.
    key = vigie.key_file.read_bytes()
    assert key.hex() not in r.stdout and key.hex()[:16] not in r.stdout

    # No key yet: said so, and none is made (the agent makes it); a key the agent would refuse fails.
    missing = tmp_path / "none" / "key"
    r = run_vigie("check", "--no-trial", "--server-port", "1", "--key-file", str(missing))
    assert r.returncode == 0, r.stdout
    assert f"[warn] key: no key file at {missing} yet" in r.stdout and not missing.exists()
    loose = tmp_path / "loose-key"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o640)
    r = run_vigie("check", "--no-trial", "--server-port", "1", "--key-file", str(loose))
    assert r.returncode != 0
    assert re.search(rf"^\[FAIL\] key: key file {re.escape(str(loose))} is readable .*chmod 600", r.stdout, re.M), r.stdout


def test_run_refuses_garbage_config_with_a_clear_error(tmp_path):
    cfg = tmp_path / "vigie.toml"
    cfg.write_text("server_ports = [8008]\nmetrics_adress = '127.0.0.1:1'\n")
    r = run_vigie("run", "--config", str(cfg), "--key-file", str(tmp_path / "key"))
    assert r.returncode != 0
    assert "metrics_adress" in r.stderr and str(cfg) in r.stderr, r.stderr


def test_run_refuses_a_key_file_others_can_read(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    r = run_vigie("run", "--server-port", "1", "--key-file", str(key), "--metrics-addr", "127.0.0.1:0")
    assert r.returncode != 0
    assert str(key) in r.stderr, r.stderr


def test_resolve_turns_labels_back_into_users_and_devices(synapse, vigie):
    """Real logins on a real Synapse, resolved from its SQLite database with the agent's key."""
    users = {}
    for name in ["resolve_alice", "resolve_bob"]:
        synapse.register(name)
        users[name] = synapse.login(name)  # a second token per user, on a new device
    tokens = [tok for (_, tok, _) in users.values()]
    labels = vigie.labels(tokens)
    db = synapse.workdir / "homeserver.db"
    r = run_vigie("resolve", "--key-file", str(vigie.key_file), "--sqlite", str(db), *labels.values())
    # Named by index if found, never printed: a failing assertion must not leak what it guards.
    leaks, _ = token_leaks(tokens, {"resolve stdout": r.stdout.encode(), "resolve stderr": r.stderr.encode()})
    assert not leaks, "\n".join(leaks)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.strip().splitlines()[1:]]
    found = {row[0]: row for row in rows}
    for name, (user_id, token, device_id) in users.items():
        row = found[labels[token]]
        assert row[1] == user_id and row[2] == device_id, row
        assert row[3] == name, "the syt_ token's localpart"
    # Labels on standard input work too; an unknown label is named, not fatal.
    r = run_vigie("resolve", "--key-file", str(vigie.key_file), "--sqlite", str(db),
                  stdin=f"{labels[tokens[0]]}\n0123456789abcdef\n")
    assert r.returncode == 0 and labels[tokens[0]] in r.stdout
    assert "0123456789abcdef" in r.stderr


def test_resolve_refuses_a_missing_key_instead_of_making_one(synapse, tmp_path):
    r = run_vigie("resolve", "--key-file", str(tmp_path / "nokey"), "--sqlite",
                  str(synapse.workdir / "homeserver.db"), "0123456789abcdef")
    assert r.returncode != 0 and "no key file" in r.stderr
    assert not (tmp_path / "nokey").exists()


def test_sighup_reloads_ports_and_sigterm_detaches_everything(synapse, vigie_factory, tmp_path):
    """Reload moves the watched port without a restart; stop leaves nothing in the kernel."""
    from harness.matrix import MatrixClient, Recorder

    cfg = tmp_path / "vigie.toml"
    cfg.write_text("server_ports = [1]\n")
    before = vigie_programs()
    agent = vigie_factory(None, extra_args=["--config", str(cfg)])
    mine = vigie_programs() - before
    _, token, _ = synapse.register("reloader")
    label = agent.labels([token])[token]
    client = MatrixClient(synapse.host, synapse.port, token, recorder=Recorder(), name="reloader")

    def counted() -> float:
        return agent.scrape().total("vigie_token_requests_total", token=label)

    client.joined_rooms()
    time.sleep(1)
    assert counted() == 0, "port 1 is watched, not Synapse's"
    cfg.write_text(f"server_ports = [{synapse.port}]\n")
    os.kill(agent.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in agent.logs() and time.monotonic() < deadline:
        time.sleep(0.2)
    for _ in range(3):
        client.joined_rooms()
    deadline = time.monotonic() + 10
    while counted() < 3 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert counted() == 3, agent.logs()

    # Back to port 1: the kernel checks the port first, so the connection still open to
    # Synapse stops being counted at once.
    cfg.write_text("server_ports = [1]\n")
    os.kill(agent.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while agent.logs().count("configuration reloaded") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert agent.logs().count("configuration reloaded") == 2, agent.logs()
    for _ in range(2):
        client.joined_rooms()
    time.sleep(1)
    assert counted() == 3, "requests on a port no longer watched were counted"
    client.close()

    # A broken file is refused; the agent keeps running as it was.
    cfg.write_text("server_ports = [\n")
    os.kill(agent.proc.pid, signal.SIGHUP)
    time.sleep(1)
    agent.assert_running()
    assert "configuration not reloaded" in agent.logs()

    assert len(mine) >= 7, f"bpftool shows {len(mine)} programs of the running agent"
    code = agent.stop()
    assert code == 0, agent.logs()
    deadline = time.monotonic() + 10
    while (vigie_programs() & mine) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = vigie_programs() & mine
    assert not left, f"{len(left)} programs left in the kernel after SIGTERM"
    print(f"bpftool: {len(mine)} programs while running, 0 after SIGTERM")

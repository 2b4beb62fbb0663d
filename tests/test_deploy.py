"""Checks of deploy/: each file is run through the real tool that consumes it.

- systemd unit: `systemd-analyze verify` and `systemd-analyze security --offline`, and its
  ExecStartPre= tracefs mount run for real in a private mount namespace.
- .deb: the cargo-deb table's package built with `dpkg-deb`, installed, upgraded, removed and
  purged with `dpkg --root` (maintainer scripts and deb-systemd-helper for real); the scripts'
  systemctl calls checked in a namespace that looks like a running systemd.
- Kubernetes: every manifest through kubernetes-validate (strict, offline bundled schemas), the
  kustomize build (`kubectl kustomize`) of the base and of an overlay with both components, the
  ServiceMonitor against the prometheus-operator CRD schema.
- Prometheus: `promtool check rules`, `promtool test rules`, `promtool check config`.
- Grafana: the dashboard's structure, and every panel query through `promtool check rules`.

Nothing skips: a missing tool fails the test and names the package that installs it.
Needs root (dpkg --root, unshare, mount), as the rest of the suite does.
"""

from __future__ import annotations

import base64
import configparser
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from harness.dashboard import (
    DASHBOARD,
    dashboard_queries,
    iter_panels,
    label_values_selector,
    load_dashboard,
    variable_queries,
)
from harness.util import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "vigie.service"
DEFAULT_CONFIG = DEPLOY / "vigie.toml"
DEB = DEPLOY / "deb"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
RULES = PROM / "vigie-rules.yml"
RULES_TEST = PROM / "vigie-rules.test.yml"
FLEET_RULES = PROM / "vigie-fleet-rules.yml"
FLEET_RULES_TEST = PROM / "vigie-fleet-rules.test.yml"
SCRAPE = PROM / "scrape.yml"
GRAFANA = DEPLOY / "grafana"

# The metric contract of the agent (README and the brief of this deploy work).
CONTRACT_METRICS = {
    "vigie_token_requests_total",
    "vigie_token_response_bytes_total",
    "vigie_token_anomaly_score",
    "vigie_token_anomaly_reason",
    "vigie_token_distinct_rooms",
    "vigie_events_total",
    "vigie_events_lost_total",
    "vigie_kernel_program_misses_total",
    "vigie_parse_failures_total",
    "vigie_capture_incomplete_total",
    "vigie_unattributed_response_bytes_total",
    "vigie_tracked_connections",
    "vigie_tracked_tokens",
    "vigie_exported_tokens",
    "vigie_probes_attached",
    "vigie_build_info",
    "vigie_key_info",
}
# The per-token features that add up across hosts (agent/src/detect/tally.rs), which the
# fleet rules sum.
FLEET_METRICS = {
    "vigie_token_history_pages_total",
    "vigie_token_history_page_weight_total",
    "vigie_token_context_page_weight_total",
    "vigie_token_searches_total",
    "vigie_token_media_downloads_total",
    "vigie_token_media_response_bytes_total",
    "vigie_token_rooms_paged_total",
    "vigie_token_full_syncs_total",
    "vigie_token_key_backup_reads_total",
}
AGENT_CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
K8S_CAPS = {cap.removeprefix("CAP_") for cap in AGENT_CAPS}
KUBE_VERSIONS = ["1.30.0", "1.37.0"]  # securityContext.appArmorProfile needs 1.30
METRICS_PORT = 9464


# --- helpers -------------------------------------------------------------------------------


def need(tool: str, package: str, how: str | None = None) -> str:
    """The path of `tool`, or fail saying what installs it."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"`{tool}` not found: {how or f'install the Debian package {package} (apt-get install {package})'}",
                    pytrace=False)
    return path


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 120)
    proc = subprocess.run([str(c) for c in cmd], **kwargs)
    print(f"$ {' '.join(str(c) for c in cmd)}  -> {proc.returncode}")
    if proc.stdout:
        print(proc.stdout[-6000:])
    if proc.stderr:
        print(proc.stderr[-6000:], file=sys.stderr)
    return proc


def ok(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def unit_directives(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values, in order]}} of a unit file (repeated keys kept)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        assert section is not None, f"directive outside a section: {raw}"
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def exec_paths(directives: dict[str, dict[str, list[str]]]) -> list[str]:
    """Absolute executables of every Exec*= line (prefixes such as + - @ ! : stripped)."""
    paths = []
    for key, values in directives["Service"].items():
        if key.startswith("Exec"):
            for value in values:
                paths.append(value.lstrip("+-@!:").split()[0])
    return paths


def verify_root(tmp_path: Path, unit_text: str) -> Path:
    """A root for `systemd-analyze --root`: the host's units, vigie.service, stub executables."""
    root = tmp_path / "root"
    units = root / "lib" / "systemd" / "system"
    units.parent.mkdir(parents=True)
    shutil.copytree(Path("/lib/systemd/system").resolve(), units, symlinks=True)
    (units / "vigie.service").write_text(unit_text)
    unit_copy = tmp_path / "vigie.service"
    unit_copy.write_text(unit_text)
    for exe in exec_paths(unit_directives(unit_copy)):
        stub = root / exe.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def deb_table() -> dict:
    doc = tomllib.loads((DEB / "cargo-deb.toml").read_text())
    return doc["package"]["metadata"]["deb"]


# --- systemd -------------------------------------------------------------------------------


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = need("systemd-analyze", "systemd")
    text = UNIT.read_text()
    root = verify_root(tmp_path / "good", text)
    proc = ok(run([analyze, "verify", f"--root={root}", "--man=no", "vigie.service"]), "systemd-analyze verify")
    # Unknown keys, bad values and missing executables are only warnings: none is allowed.
    assert proc.stderr.strip() == "", f"systemd-analyze verify warned:\n{proc.stderr}"

    # The same check sees a misspelt directive (so an empty stderr above means something).
    broken = text.replace("ProtectControlGroups=yes", "ProtectControlGroup=yes")
    root = verify_root(tmp_path / "broken", broken)
    proc = run([analyze, "verify", f"--root={root}", "--man=no", "vigie.service"])
    assert "ProtectControlGroup" in proc.stderr


def test_systemd_fleet_key_drop_in_verifies(tmp_path):
    """deploy/systemd/fleet-key.conf, the fleet's key handed over as a credential, on top of the
    unit: systemd-analyze verify sees no warning, and the path it documents is the credential's."""
    analyze = need("systemd-analyze", "systemd")
    drop_in = DEPLOY / "systemd" / "fleet-key.conf"
    root = verify_root(tmp_path, UNIT.read_text())
    d = root / "etc" / "systemd" / "system" / "vigie.service.d"
    d.mkdir(parents=True)
    shutil.copy(drop_in, d / "fleet-key.conf")
    proc = ok(run([analyze, "verify", f"--root={root}", "--man=no", "vigie.service"]), "systemd-analyze verify")
    assert proc.stderr.strip() == "", f"systemd-analyze verify warned:\n{proc.stderr}"
    directives = unit_directives(drop_in)["Service"]
    assert directives == {"LoadCredential": ["key:/etc/vigie/key"]}
    # The key_file the drop-in's comment tells vigie.toml to use: $CREDENTIALS_DIRECTORY/key.
    assert 'key_file = "/run/credentials/vigie.service/key"' in drop_in.read_text()
    assert "-m 0600 -o root -g root" in drop_in.read_text()


def test_systemd_unit_privileges_and_sandbox(tmp_path):
    analyze = need("systemd-analyze", "systemd")
    d = unit_directives()
    svc = d["Service"]
    one = {k: v[-1] for k, v in svc.items()}

    # Least privilege: exactly the four capabilities, never CAP_SYS_ADMIN, as a dynamic user.
    assert set(one["CapabilityBoundingSet"].split()) == AGENT_CAPS
    assert set(one["AmbientCapabilities"].split()) == AGENT_CAPS
    assert not [v for vs in svc.values() for v in vs if "CAP_SYS_ADMIN" in v]
    assert one["DynamicUser"] == "yes"
    assert "User" not in svc and "PrivateUsers" not in svc
    # tracefs is mounted by a fully privileged ExecStartPre, so the agent needs no CAP_SYS_ADMIN.
    pre = svc["ExecStartPre"]
    assert len(pre) == 1 and pre[0].startswith("+/bin/sh -c ")
    assert "mount -t tracefs nodev /sys/kernel/tracing" in pre[0]
    assert one["ExecStart"] == "/usr/bin/vigie run --config /etc/vigie/vigie.toml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert one["StateDirectory"] == "vigie"
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
        "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native", "RestrictNamespaces": "yes",
    }.items():
        assert one.get(key) == value, f"{key}={one.get(key)}, want {value}"
    assert one["ProtectHome"] in ("yes", "read-only", "tmpfs")
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    # These would make /sys (tracefs included) read-only or are not wanted: see the unit's comments.
    assert "ProtectKernelTunables" not in svc
    # bpf(2) and perf_event_open(2) are outside @system-service: they must be allowed explicitly.
    allowed = " ".join(svc["SystemCallFilter"]).split()
    assert "@system-service" in allowed and "bpf" in allowed and "perf_event_open" in allowed

    # The key file of the default config lives in the state directory.
    config = tomllib.loads(DEFAULT_CONFIG.read_text())
    assert config["key_file"] == f"/var/lib/{one['StateDirectory']}/key"

    # systemd's own exposure score: "OK" (<= 3.0) or better.
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc" / "systemd" / "system" / "vigie.service")
    proc = ok(run([analyze, "security", "--offline=yes", f"--root={root}", "--threshold=30", "vigie.service"]),
              "systemd-analyze security --threshold=30 (exposure above 3.0)")
    m = re.search(r"Overall exposure level for vigie\.service: ([0-9.]+)", proc.stdout)
    assert m, proc.stdout
    assert float(m.group(1)) <= 3.0
    for line in ("NoNewPrivileges=", "ProtectKernelModules=", "RestrictNamespaces=~user",
                 "CapabilityBoundingSet=~CAP_SYS_ADMIN", "MemoryDenyWriteExecute="):
        assert re.search(rf"✓ {re.escape(line)}", proc.stdout), f"systemd-analyze security: {line} not ✓"


def test_systemd_execstartpre_mounts_tracefs(tmp_path):
    """The ExecStartPre= command, run for real where tracefs is unmounted (private mount namespace)."""
    need("unshare", "util-linux")
    need("mountpoint", "util-linux")
    pre = unit_directives()["Service"]["ExecStartPre"][0].lstrip("+")
    m = re.fullmatch(r"/bin/sh -c '(.*)'", pre)
    assert m, pre
    script = textwrap.dedent(f"""\
        set -e
        if mountpoint -q /sys/kernel/tracing; then umount -l /sys/kernel/tracing; fi
        ! mountpoint -q /sys/kernel/tracing
        /bin/sh -c '{m.group(1)}'
        mountpoint -q /sys/kernel/tracing
        test -d /sys/kernel/tracing/events/sock
        # A second start finds it mounted and does nothing.
        /bin/sh -c '{m.group(1)}'
        test "$(grep -c ' /sys/kernel/tracing ' /proc/self/mounts)" = 1
        """)
    ok(run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script]),
       "ExecStartPre= in a private mount namespace (needs root)")


# --- .deb ----------------------------------------------------------------------------------


def test_deb_metadata_table_is_complete():
    """The table parses, is the one agent/Cargo.toml carries, and names files that exist."""
    table = deb_table()
    manifest = tomllib.loads((REPO_ROOT / "agent" / "Cargo.toml").read_text())
    assert manifest["package"]["name"] == "vigie"
    assert manifest["package"].get("description"), "cargo-deb needs a description"
    assert manifest["package"]["metadata"]["deb"] == table, "agent/Cargo.toml and deploy/deb/cargo-deb.toml differ"

    assets = {dest: (src, mode) for src, dest, mode in table["assets"]}
    for src, dest, mode in table["assets"]:
        assert re.fullmatch(r"[0-7]{3,4}", mode), (src, mode)
        assert not dest.startswith("/"), dest
        if src.startswith("target/release/"):
            continue  # cargo-deb maps this to the real target directory
        assert (REPO_ROOT / "agent" / src).resolve().is_file(), f"asset source {src} (relative to agent/) missing"
    assert assets["usr/bin/"] == ("target/release/vigie", "755")
    assert assets["lib/systemd/system/vigie.service"][0] == "../deploy/systemd/vigie.service"
    assert assets["etc/vigie/vigie.toml"][0] == "../deploy/vigie.toml"
    assert table["conf-files"] == ["/etc/vigie/vigie.toml"]
    # The scripts handle the unit: no systemd-units table (it would enable and start on install).
    assert "systemd-units" not in table
    scripts = (REPO_ROOT / "agent" / table["maintainer-scripts"]).resolve()
    assert scripts == DEB.resolve()


def test_deb_maintainer_scripts_parse_with_dash():
    dash = need("dash", "dash")
    for name in ("postinst", "prerm", "postrm"):
        path = DEB / name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        first = path.read_text().splitlines()[0]
        assert first == "#!/bin/sh", f"{name}: {first}"
        assert "\nset -e\n" in path.read_text()
        ok(run([dash, "-n", path]), f"dash -n {name}")


def build_deb(tmp_path: Path) -> Path:
    """The package cargo-deb would make from the table (stub binary), built with dpkg-deb."""
    dpkg_deb = need("dpkg-deb", "dpkg")
    table = deb_table()
    version = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    arch = ok(run(["dpkg", "--print-architecture"]), "dpkg --print-architecture").stdout.strip()
    pkg = tmp_path / "pkg"
    for src, dest, mode in table["assets"]:
        source = Path("/bin/true") if src.startswith("target/release/") else (REPO_ROOT / "agent" / src).resolve()
        target = pkg / dest
        if dest.endswith("/"):
            target = target / Path(src).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(int(mode, 8))
    control = pkg / "DEBIAN"
    control.mkdir()
    depends = [d.strip() for d in table["depends"].split(",") if d.strip() != "$auto"]
    description = " ".join(table["extended-description"].split())
    (control / "control").write_text(textwrap.dedent(f"""\
        Package: {table['name']}
        Version: {version}-1
        Architecture: {arch}
        Maintainer: {table['maintainer']}
        Section: {table['section']}
        Priority: {table['priority']}
        Depends: {', '.join(depends)}
        Description: per-access-token telemetry of a Matrix homeserver, from eBPF
         {description}
        """))
    (control / "conffiles").write_text("".join(f"{c}\n" for c in table["conf-files"]))
    for name in ("postinst", "prerm", "postrm"):
        shutil.copy(DEB / name, control / name)
        (control / name).chmod(0o755)
    out = tmp_path / f"vigie_{version}-1_{arch}.deb"
    ok(run([dpkg_deb, "--root-owner-group", "--build", pkg, out]), "dpkg-deb --build")
    info = ok(run([dpkg_deb, "--info", out]), "dpkg-deb --info").stdout
    for name in ("conffiles", "postinst", "prerm", "postrm"):
        assert re.search(rf"\b{name}\b", info), f"{name} missing from the control archive"
    contents = ok(run([dpkg_deb, "--contents", out]), "dpkg-deb --contents").stdout
    for path in ("./usr/bin/vigie", "./lib/systemd/system/vigie.service", "./etc/vigie/vigie.toml"):
        assert path in contents
    return out


def test_deb_installs_upgrades_removes_and_purges(tmp_path):
    """dpkg --root: real maintainer scripts and deb-systemd-helper against a scratch root."""
    dpkg = need("dpkg", "dpkg")
    need("deb-systemd-helper", "init-system-helpers")
    systemctl = need("systemctl", "systemd")
    deb = build_deb(tmp_path)
    root = tmp_path / "root"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    # Scripts run outside a chroot with DPKG_ROOT set; libc6 and mount are not in the scratch root.
    base = [dpkg, f"--root={root}", "--force-script-chrootless", "--force-depends", "--log=/dev/null"]
    wants = root / "etc/systemd/system/multi-user.target.wants/vigie.service"

    proc = ok(run(base + ["--install", deb]), "dpkg --install")
    assert (root / "usr/bin/vigie").is_file()
    assert (root / "etc/vigie/vigie.toml").read_text() == DEFAULT_CONFIG.read_text()
    assert (root / "lib/systemd/system/vigie.service").read_text() == UNIT.read_text()
    # A fresh install neither enables nor starts, and says what to do.
    assert not wants.exists() and not wants.is_symlink(), "a fresh install enabled vigie.service"
    assert "systemctl enable --now vigie.service" in proc.stderr + proc.stdout

    # The admin configures and enables it; an upgrade keeps both.
    (root / "etc/vigie/vigie.toml").write_text(DEFAULT_CONFIG.read_text().replace("[8008]", "[8448]"))
    ok(run([systemctl, f"--root={root}", "enable", "vigie.service"]), "systemctl --root enable")
    assert wants.is_symlink()
    ok(run(base + ["--force-confold", "--install", deb]), "dpkg --install (upgrade)")
    assert wants.is_symlink(), "an upgrade disabled vigie.service"
    assert "[8448]" in (root / "etc/vigie/vigie.toml").read_text(), "an upgrade overwrote the config"

    # The agent ran: DynamicUser's state directory holds the key.
    state = root / "var/lib/private/vigie"
    state.mkdir(parents=True)
    (state / "key").write_bytes(b"k" * 32)
    (root / "var/lib/vigie").symlink_to("private/vigie")

    ok(run(base + ["--remove", "vigie"]), "dpkg --remove")
    assert not (root / "usr/bin/vigie").exists()
    assert not (root / "lib/systemd/system/vigie.service").exists()
    assert (root / "etc/vigie/vigie.toml").exists(), "remove must keep the conffile"
    assert (state / "key").exists(), "remove must keep the key"
    masked = root / "etc/systemd/system/vigie.service"
    assert masked.is_symlink() and os.readlink(masked) == "/dev/null", "removed unit not masked"

    ok(run(base + ["--purge", "vigie"]), "dpkg --purge")
    for gone in ("etc/vigie/vigie.toml", "var/lib/private/vigie", "var/lib/vigie",
                 "etc/systemd/system/vigie.service", "etc/systemd/system/multi-user.target.wants/vigie.service"):
        path = root / gone
        assert not path.exists() and not path.is_symlink(), f"{gone} left after purge"


STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
case "$1" in debian-installed|was-enabled|--quiet) exit 1 ;; esac
exit 0
"""


def test_deb_scripts_restart_and_stop_through_systemd(tmp_path):
    """With systemd running (a tmpfs /run/systemd/system in a private namespace) and stub tools."""
    need("unshare", "util-linux")
    log = tmp_path / "calls.log"
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in ("systemctl", "deb-systemd-invoke", "deb-systemd-helper"):
        (stubs / tool).write_text(STUB.format(log=log))
        (stubs / tool).chmod(0o755)

    def script(name: str, *args: str) -> list[str]:
        log.write_text("")
        env = {k: v for k, v in os.environ.items() if k != "DPKG_ROOT"}
        env["PATH"] = f"{stubs}:{env['PATH']}"
        cmd = (f"mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && "
               f"exec /bin/sh {DEB / name} " + " ".join(args))
        ok(run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", cmd], env=env),
           f"{name} {' '.join(args)}")
        return log.read_text().splitlines()

    fresh = script("postinst", "configure", "''")
    assert "deb-systemd-helper update-state vigie.service" in fresh
    assert not [c for c in fresh if re.search(r"\b(start|restart|try-restart|enable)\b", c)], fresh
    upgrade = script("postinst", "configure", "0.0.9-1")
    assert "systemctl --system daemon-reload" in upgrade
    assert "deb-systemd-invoke try-restart vigie.service" in upgrade
    assert not [c for c in upgrade if " enable " in c], upgrade  # the stub says: never enabled
    assert not [c for c in script("prerm", "upgrade", "0.2.0-1") if "stop" in c]
    assert "deb-systemd-invoke stop vigie.service" in script("prerm", "remove")
    removed = script("postrm", "remove")
    assert "systemctl --system daemon-reload" in removed
    assert "deb-systemd-helper mask vigie.service" in removed


# --- Kubernetes ----------------------------------------------------------------------------


def kubernetes_validate(paths: list[Path], versions=KUBE_VERSIONS) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.fail("kubernetes-validate not importable: tests/.venv/bin/pip install kubernetes-validate==1.37.0",
                    pytrace=False)
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for v in versions:
        cmd += ["-k", v]
    return run(cmd + [str(p) for p in paths])


def assert_validated(proc: subprocess.CompletedProcess, resources: list[str], versions=KUBE_VERSIONS):
    """Every resource passed against every version; no ERROR, no WARN (unknown kind)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert not re.search(r"^(ERROR|WARN|FATAL)", out, re.M), out
    for resource in resources:
        for v in versions:
            mm = ".".join(v.split(".")[:2])
            assert re.search(rf"passed for resource {re.escape(resource)} against version {mm}\b", out), \
                f"{resource} not validated against {mm}:\n{out}"


def crd_strict(schema):
    """The CRD schema with unknown fields refused, as the API server prunes/refuses them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    schema.pop("$comment", None)
    return schema


def validate_servicemonitor(doc: dict):
    schema = json.loads((K8S / "monitoring" / "servicemonitor.schema.json").read_text())
    jsonschema.Draft7Validator(crd_strict(schema)).validate(doc)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "ServiceMonitor"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


CORE_FILES = ["namespace.yaml", "serviceaccount.yaml", "configmap.yaml", "daemonset.yaml", "service.yaml"]


def test_kubernetes_manifests_validate_with_kubernetes_validate(tmp_path):
    files = [K8S / f for f in CORE_FILES]
    resources = []
    for f in files:
        for doc in load_yaml_docs(f):
            resources.append(f"{doc['kind'].lower()}/{doc['metadata']['name']}")
    assert_validated(kubernetes_validate(files), resources)

    # Strict means strict: a misspelt field fails.
    bad = tmp_path / "daemonset.yaml"
    bad.write_text((K8S / "daemonset.yaml").read_text().replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"))
    proc = kubernetes_validate([bad])
    assert proc.returncode != 0 and "readOnlyRootFileSystem" in proc.stdout

    # The ServiceMonitor, which has no bundled schema, against prometheus-operator's CRD schema.
    (sm,) = load_yaml_docs(K8S / "monitoring" / "servicemonitor.yaml")
    validate_servicemonitor(sm)
    broken = copy.deepcopy(sm)
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate_servicemonitor(broken)


def kustomize(kubectl: str, directory: Path) -> list[dict]:
    proc = ok(run([kubectl, "kustomize", directory]), f"kubectl kustomize {directory}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def daemonset_checks(ds: dict, sys_admin: bool):
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec.get("automountServiceAccountToken") is False
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    want = K8S_CAPS | ({"SYS_ADMIN"} if sys_admin else set())
    assert set(sc["capabilities"]["add"]) == want
    # The API server refuses SYS_ADMIN with allowPrivilegeEscalation: false.
    assert sc["allowPrivilegeEscalation"] is (True if sys_admin else False)
    assert sc["readOnlyRootFilesystem"] is True
    # Metrics: the port probed, annotated, passed to the agent, and named for the Service.
    (port,) = c["ports"]
    assert port["name"] == "metrics" and port["containerPort"] == METRICS_PORT
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(METRICS_PORT)
    assert ann["prometheus.io/path"] == "/metrics"
    args = c["args"]
    assert args[:3] == ["run", "--config", "/etc/vigie/vigie.toml"]
    assert args[args.index("--metrics-addr") + 1] == f"$(POD_IP):{METRICS_PORT}"
    assert any(e["name"] == "POD_IP" and e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" for e in c["env"])
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # Volumes: where the agent expects things, host paths read-only except the key's.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    host = {path: volumes[m["name"]].get("hostPath", {}).get("path") for path, m in mounts.items()}
    # The fleet's key: the Secret vigie-key at the key path of the ConfigMap, read-only, mode 0400
    # (the agent refuses a key others may read); no writable volume at all.
    key = volumes[mounts["/var/lib/vigie"]["name"]]
    assert key["secret"]["secretName"] == "vigie-key" and not key["secret"].get("optional")
    assert key["secret"]["defaultMode"] == 0o400 and key["secret"]["items"] == [{"key": "key", "path": "key"}]
    assert mounts["/var/lib/vigie"]["readOnly"]
    assert all(m.get("readOnly") for m in c["volumeMounts"]), "a writable volume"
    assert host["/sys/kernel/tracing"] == "/sys/kernel/tracing" and mounts["/sys/kernel/tracing"]["readOnly"]
    assert host["/sys/kernel/btf"] == "/sys/kernel/btf" and mounts["/sys/kernel/btf"]["readOnly"]
    assert volumes[mounts["/etc/vigie"]["name"]]["configMap"]["name"] == "vigie-config"
    assert mounts["/etc/vigie"]["readOnly"]


def test_kustomize_build_renders_valid_manifests(tmp_path):
    kubectl = need("kubectl", "kubectl", how=(
        "kubectl (with kustomize v5) comes with this machine image (google-cloud-sdk's kubectl package); "
        "Debian's kubernetes-client 1.20 is too old for kustomize components"))
    base = kustomize(kubectl, K8S)
    kinds = sorted(d["kind"] for d in base)
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Service", "ServiceAccount"]
    for doc in base:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "vigie", doc["metadata"]
    rendered = tmp_path / "base.yaml"
    rendered.write_text(yaml.safe_dump_all(base))
    assert_validated(kubernetes_validate([rendered]),
                     [f"{d['kind'].lower()}/{d['metadata']['name']}" for d in base])
    by_kind = {d["kind"]: d for d in base}
    ds = by_kind["DaemonSet"]
    daemonset_checks(ds, sys_admin=False)
    # The image `cargo xtask image` builds, at the workspace's version.
    version = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == f"localhost/vigie:{version}"

    # The Service selects the pods and exposes the named port.
    svc = by_kind["Service"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"

    # The ConfigMap is a config the agent accepts: only keys of deploy/vigie.toml.
    config = tomllib.loads(by_kind["ConfigMap"]["data"]["vigie.toml"])
    default = tomllib.loads(DEFAULT_CONFIG.read_text())
    assert set(config) <= set(default), set(config) - set(default)
    assert config["key_file"] == "/var/lib/vigie/key"
    (key_mount,) = [m for m in ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                    if m["name"] == "key"]
    assert f"{key_mount['mountPath']}/key" == config["key_file"]

    # An overlay outside the base with both optional components.
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(K8S, overlay)
    (overlay / "kustomization.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: kustomize.config.k8s.io/v1beta1
        kind: Kustomization
        resources:
          - {rel}
        components:
          - {rel}/monitoring
          - {rel}/mount-tracefs
        """))
    full = kustomize(kubectl, overlay)
    core = [d for d in full if d["kind"] != "ServiceMonitor"]
    (sm,) = [d for d in full if d["kind"] == "ServiceMonitor"]
    rendered = tmp_path / "overlay.yaml"
    rendered.write_text(yaml.safe_dump_all(core))
    assert_validated(kubernetes_validate([rendered]),
                     [f"{d['kind'].lower()}/{d['metadata']['name']}" for d in core])
    validate_servicemonitor(sm)
    daemonset_checks(next(d for d in full if d["kind"] == "DaemonSet"), sys_admin=True)
    # The ServiceMonitor finds the Service and its port; its job label is "vigie".
    svc = next(d for d in full if d["kind"] == "Service")
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "vigie"


def test_the_documented_key_secret_command_makes_a_32_byte_key(tmp_path):
    """docs/fleet.md's command, run as written (client-side dry run): a Secret vigie-key in the
    namespace the base uses, holding 32 random bytes under the item the DaemonSet mounts."""
    kubectl = need("kubectl", "kubectl")
    (command,) = [line.strip() for line in (REPO_ROOT / "docs" / "fleet.md").read_text().splitlines()
                  if line.strip().startswith("kubectl -n vigie create secret generic vigie-key")]
    keys = []
    for _ in range(2):
        proc = ok(run(["bash", "-c", f"{command} --dry-run=client -o yaml"], env={**os.environ, "PATH": (
            f"{Path(kubectl).parent}:{os.environ['PATH']}")}), "the documented kubectl create secret")
        (secret,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "vigie-key"
        assert secret["metadata"]["namespace"] == "vigie"
        keys.append(base64.b64decode(secret["data"]["key"]))
        path = tmp_path / "secret.yaml"
        path.write_text(proc.stdout)
        assert_validated(kubernetes_validate([path]), ["secret/vigie-key"])
    assert [len(k) for k in keys] == [32, 32] and keys[0] != keys[1], "not 32 fresh random bytes"


# --- Prometheus ----------------------------------------------------------------------------


def promtool() -> str:
    return need("promtool", "prometheus")


ALERTS = ["VigieTokenAnomaly", "VigieBulkHistoryPaging", "VigieMediaSpree", "VigieEventsLost",
          "VigieKernelProgramsSkipped", "VigieAgentDown", "VigieNoProbes", "VigieKeyMismatch"]


def test_promtool_check_rules():
    proc = ok(run([promtool(), "check", "rules", RULES]), "promtool check rules")
    assert "SUCCESS" in proc.stdout
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert list(alerts) == ALERTS
    assert alerts["VigieTokenAnomaly"]["labels"]["severity"] == "critical"
    assert "max by (token, instance) (vigie_token_anomaly_score) >= 1" in alerts["VigieTokenAnomaly"]["expr"]
    assert "vigie resolve" in alerts["VigieTokenAnomaly"]["annotations"]["description"]
    assert "vigie_token_anomaly_reason" in alerts["VigieTokenAnomaly"]["annotations"]["description"]
    assert 'up{job="vigie"} == 0' in alerts["VigieAgentDown"]["expr"]
    assert 'absent(up{job="vigie"})' in alerts["VigieAgentDown"]["expr"]
    assert "increase(vigie_events_lost_total[5m]) > 0" in alerts["VigieEventsLost"]["expr"]
    assert "increase(vigie_kernel_program_misses_total[5m]) > 0" in alerts["VigieKernelProgramsSkipped"]["expr"]
    assert "vigie_probes_attached == 0" in alerts["VigieNoProbes"]["expr"]
    assert "count by (job) (count by (job, fingerprint) (vigie_key_info)) > 1" in alerts["VigieKeyMismatch"]["expr"]
    assert alerts["VigieKeyMismatch"].get("for"), "a key rollout makes hosts disagree for a while"
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("critical", "warning")
        assert alert["annotations"]["summary"]
    # Only metrics of the contract, or recorded here.
    recorded = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        for name in re.findall(r"\bvigie[_:][a-z0-9_:]*", rule["expr"]):
            assert name in CONTRACT_METRICS | recorded, f"unknown metric {name} in {rule.get('alert') or rule['record']}"


def test_promtool_test_rules():
    proc = ok(run([promtool(), "test", "rules", RULES_TEST]), "promtool test rules")
    assert "SUCCESS" in proc.stdout
    # Every alert is tested both firing and silent.
    fired, silent = set(), set()
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fired >= set(ALERTS), set(ALERTS) - fired
    assert silent >= set(ALERTS), set(ALERTS) - silent


def test_fleet_rules_check_and_their_tests_pass():
    ok(run([promtool(), "check", "rules", FLEET_RULES]), "promtool check rules vigie-fleet-rules.yml")
    proc = ok(run([promtool(), "test", "rules", FLEET_RULES_TEST]), "promtool test rules vigie-fleet-rules.test.yml")
    assert "SUCCESS" in proc.stdout
    rules = [r for g in yaml.safe_load(FLEET_RULES.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert list(alerts) == ["VigieFleetTokenAnomaly"]
    recorded = {r["record"] for r in rules if "record" in r}
    used = set()
    for rule in rules:
        used |= set(re.findall(r"\bvigie_[a-z0-9_]*", rule["expr"]))
        for name in re.findall(r"\bvigie[_:][a-z0-9_:]*", rule["expr"]):
            assert name in CONTRACT_METRICS | FLEET_METRICS | recorded, f"unknown metric {name}"
    assert used >= FLEET_METRICS, FLEET_METRICS - used
    fired, silent = set(), set()
    for test in yaml.safe_load(FLEET_RULES_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fired == silent == {"VigieFleetTokenAnomaly"}


def test_promtool_check_config(tmp_path):
    tool = promtool()
    # The example on its own.
    ok(run([tool, "check", "config", SCRAPE]), "promtool check config scrape.yml")
    scrape = yaml.safe_load(SCRAPE.read_text())
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "vigie"  # what VigieAgentDown watches
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{METRICS_PORT}"]

    # A full Prometheus config: global settings, the rules, the job.
    shutil.copy(RULES, tmp_path / "vigie-rules.yml")
    full = {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": ["vigie-rules.yml"],
        "scrape_configs": scrape["scrape_configs"],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(full))
    proc = ok(run([tool, "check", "config", tmp_path / "prometheus.yml"]), "promtool check config (full)")
    assert "SUCCESS: 1 rule files found" in proc.stdout
    assert re.search(r"SUCCESS: \d+ rules found", proc.stdout)

    # The commented kubernetes_sd example is YAML of the same job. (Debian's promtool is built
    # without the kubernetes SD, so it can only be parsed here.)
    lines = SCRAPE.read_text().splitlines()
    start = lines.index("  # - job_name: vigie")
    block = "\n".join(line[4:] if line.startswith("  # ") else "" for line in lines[start:])
    (k8s_job,) = yaml.safe_load(block)
    assert k8s_job["job_name"] == "vigie"
    assert k8s_job["kubernetes_sd_configs"][0]["role"] == "pod"
    assert {"target_label": "instance", "source_labels": ["__meta_kubernetes_pod_node_name"]} in k8s_job["relabel_configs"]


# --- Grafana -------------------------------------------------------------------------------


def test_grafana_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())  # valid JSON
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] == "vigie"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    queries = variable_queries(dash)
    assert queries["token"] == 'label_values(vigie_token_requests_total{instance=~"$instance"}, token)'
    assert label_values_selector(queries["instance"])[1] == "instance"
    for name in ("instance", "token"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"

    panels = list(iter_panels(dash))
    titles = [p["title"] for p in panels]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            for t in p["targets"]:
                assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}

    def exprs(p):
        return " ".join(t["expr"] for t in p.get("targets", []))

    # The panels, in this order.
    order = [
        ("Suspects", "table", ["topk(20, max by (token, instance) (vigie_token_anomaly_score",
                               "vigie_token_anomaly_reason", "> 0"]),
        ("Tokens alerting", "stat", ["vigie_token_anomaly_score", ">= 1"]),
        ("Anomaly score per token", "timeseries", ["vigie_token_anomaly_score"]),
        ("Response bytes per token by endpoint", "timeseries",
         ["sum by (token, endpoint) (rate(vigie_token_response_bytes_total{", 'token=~"$token"', "[$__rate_interval]"]),
        ("Requests per token by endpoint", "timeseries",
         ["sum by (token, endpoint) (rate(vigie_token_requests_total{", "[$__rate_interval]"]),
        ("Distinct rooms per token (10m)", "timeseries", ["vigie_token_distinct_rooms", 'window="10m"']),
        ("Agent health", "row", []),
    ]
    for i, (title, kind, needles) in enumerate(order):
        assert titles[i] == title and panels[i]["type"] == kind, (i, titles[i], panels[i]["type"])
        for needle in needles:
            assert needle in exprs(panels[i]), (title, needle)
    score = panels[2]["fieldConfig"]["defaults"]
    assert score["custom"]["thresholdsStyle"]["mode"].startswith("line")
    assert [s["value"] for s in score["thresholds"]["steps"]] == [None, 1]
    health = " ".join(exprs(p) for p in panels[len(order):])
    for metric in ("vigie_events_total", "vigie_events_lost_total", "vigie_parse_failures_total",
                   "vigie_tracked_connections", "vigie_tracked_tokens", "vigie_probes_attached",
                   "vigie_unattributed_response_bytes_total"):
        assert metric in health, f"agent health row lacks {metric}"
    assert "by (instance, kind)" in health and "by (instance, reason)" in health

    # The grid: 24 columns, no two panels overlapping.
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_grafana_queries_parse_with_promtool(tmp_path):
    tool = promtool()
    queries = dashboard_queries()
    assert len(queries) >= 15
    for q in queries:
        assert "$" not in q, q
        for name in re.findall(r"\bvigie[_:][a-z0-9_:]*", q):
            assert name in CONTRACT_METRICS, f"unknown metric {name} in {q}"
    # The variables' selectors are PromQL too.
    selectors = [label_values_selector(q)[0] for q in variable_queries().values()]
    exprs = queries + [s.replace("$instance", ".*") for s in selectors if s]

    def rules_file(path: Path, expressions: list[str]):
        rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(expressions)]
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, width=1000))

    rules_file(tmp_path / "dashboard.yml", exprs)
    proc = ok(run([tool, "check", "rules", tmp_path / "dashboard.yml"]), "promtool check rules (dashboard queries)")
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout

    # The same check refuses a broken query (so passing above means they parse).
    rules_file(tmp_path / "broken.yml", [queries[0].replace(")", "", 1)])
    assert run([tool, "check", "rules", tmp_path / "broken.yml"]).returncode != 0


def test_grafana_provisioning_files():
    dashboards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vigie.yml").read_text())
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    (ds,) = datasources["datasources"]
    # The dashboard's ${datasource} variable lists data sources of this type.
    assert ds["type"] == load_dashboard()["templating"]["list"][0]["query"] == "prometheus"
    assert ds["url"].startswith("http") and ds["access"] == "proxy"
    scrape_interval = yaml.safe_load(SCRAPE.read_text())["scrape_configs"][0]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape_interval


def test_cargo_deb_builds_the_real_package_and_lists_its_contents(tmp_path):
    """The real .deb, from the real release binary, with cargo-deb (installed by `cargo xtask
    setup`): binary, unit, default config as a conffile, rules and dashboard."""
    cargo_deb = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin" / "cargo-deb"
    assert cargo_deb.exists(), "cargo-deb missing: `cargo xtask setup` installs it"
    binary = REPO_ROOT / "target" / "release" / "vigie"
    assert binary.exists(), "build the agent first: cargo build --release -p vigie"
    r = subprocess.run(["cargo", "deb", "-p", "vigie", "--no-build", "--output", str(tmp_path)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    debs = list(tmp_path.glob("vigie_*.deb"))
    assert len(debs) == 1, debs
    listing = subprocess.run(["dpkg-deb", "-c", str(debs[0])], capture_output=True, text=True, check=True).stdout
    print(listing)
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for path in ["/usr/bin/vigie", "/lib/systemd/system/vigie.service", "/etc/vigie/vigie.toml",
                 "/usr/share/vigie/prometheus/vigie-rules.yml", "/usr/share/vigie/grafana/vigie.json"]:
        assert path in files, f"{path} missing from the package"
    conffiles = subprocess.run(["dpkg-deb", "-I", str(debs[0]), "conffiles"], capture_output=True, text=True).stdout
    assert "/etc/vigie/vigie.toml" in conffiles
    # The packaged binary is the release build, byte for byte.
    extract = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(extract)], check=True)
    assert (extract / "usr/bin/vigie").read_bytes() == binary.read_bytes()

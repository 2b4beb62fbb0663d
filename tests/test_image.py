"""The DaemonSet's image: built by `cargo xtask image --bin $VIGIE_BIN` (buildah), then run with podman the way
deploy/kubernetes/daemonset.yaml runs the pod.

- What is in it: the release binary (same GNU build id), the default config, exactly the shared
  objects `ldd` lists (and the loader) with the dpkg records of their packages, nothing else;
  the OCI archive is the same image; a rebuild gives the same image id.
- `vigie --version` from the image is the built binary's.
- `vigie check` in the container, under the DaemonSet's settings translated one by one (host PID
  and network, the four capabilities and no other, no-new-privileges, read-only root, the
  ConfigMap's config, the key Secret, the node's tracefs and BTF): every line ok, programs
  loaded and detached, the key's fingerprint the one the host computes from the same file.
- `vigie run` from the image serves /metrics with that fingerprint, and SIGTERM (podman stop)
  ends it cleanly with no program left in the kernel.

Nothing skips: a missing tool fails and names its package. Needs root. About 15 s on the 2-core
machine once the release binary is built (each image build takes 2-4 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from harness.metrics import parse
from harness.util import REPO_ROOT, free_port, wait_until
from harness.vigie import check_binary

K8S = REPO_ROOT / "deploy" / "kubernetes"
# The binary under test is the one packed (`cargo xtask image --bin`): no second release build.
BINARY = check_binary()

# crun 1.8 (Debian 12) refuses this machine's hybrid cgroup v1/v2 layout ("cgroups in hybrid
# mode not supported"); runc runs the same OCI bundle.
PODMAN = ["podman", "--runtime", "runc"]
# This machine grants no CAP_SYS_RESOURCE, so podman's default limits (raised above the caller's)
# cannot be set: pass values within ours.
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"`{tool}` not found: install the Debian package {package} (cargo xtask setup does)",
                    pytrace=False)
    return path


def run(cmd: list, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    print(f"$ {' '.join(str(c) for c in cmd)}  -> {proc.returncode}")
    print(proc.stdout[-8000:], proc.stderr[-4000:])
    return proc


def build_id(elf: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(elf)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Build ID: ([0-9a-f]+)", out)
    assert m, f"no GNU build id in {elf}"
    return m.group(1)


def vigie_programs() -> set[int]:
    """Ids of vigie's programs in the kernel now (bpftool), compared before and after."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run([bpftool, "-j", "prog", "show"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"bpftool failed (package bpftool): {out.stderr}"
    return {p["id"] for p in json.loads(out.stdout) if str(p.get("name", "")).startswith("vigie_")}


def programs_held(pids: list[str] | None = None) -> set[int]:
    """Program ids that processes (these, or all) hold an fd of, from /proc/PID/fdinfo. Another
    helper's agent may load programs at any time; a program nobody holds was left behind."""
    held = set()
    for pid in pids if pids is not None else [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    m = re.search(r"^prog_id:\s+(\d+)$", f.read(), re.M)
                if m:
                    held.add(int(m.group(1)))
        except OSError:
            continue  # the process or fd went away meanwhile
    return held


def left_behind(before: set[int]) -> set[int]:
    """vigie programs loaded since `before` that no process holds."""
    return (vigie_programs() - before) - programs_held()


@dataclass
class Image:
    reference: str
    id: str
    archive: Path
    version: str
    build_s: float


def build_image() -> tuple[Image, str]:
    started = time.monotonic()
    r = run(["cargo", "xtask", "image", "--bin", BINARY], cwd=REPO_ROOT, timeout=1800)
    elapsed = time.monotonic() - started
    assert r.returncode == 0, f"cargo xtask image failed:\n{r.stderr[-4000:]}"
    m = re.search(r"==> (?:\[\d+:\d\d\] )?Image (\S+) \((sha256:[0-9a-f]{64})\): ([0-9.]+) MiB uncompressed, archive (\S+) "
                  r"\(([0-9.]+) MiB\), built in ([0-9.]+) s", r.stderr)
    assert m, r.stderr[-3000:]
    version = run([BINARY, "--version"]).stdout.split()[1]
    print(f"image {m.group(1)}: {m.group(3)} MiB uncompressed, OCI archive {m.group(5)} MiB; "
          f"image step {m.group(6)} s, `cargo xtask image` {elapsed:.1f} s in all")
    return Image(m.group(1), m.group(2).removeprefix("sha256:"), Path(m.group(4)), version, elapsed), r.stderr


@pytest.fixture(scope="module")
def image() -> Image:
    for tool, package in [("buildah", "buildah"), ("podman", "podman"), ("runc", "runc"),
                          ("objcopy", "binutils"), ("readelf", "binutils")]:
        need(tool, package)
    img, _ = build_image()
    return img


@pytest.fixture
def rootfs(image):
    """The image's root filesystem, mounted read-only from the containers storage."""
    r = run(PODMAN + ["image", "mount", image.reference])
    assert r.returncode == 0, r.stderr
    yield Path(r.stdout.strip())
    run(PODMAN + ["image", "unmount", image.reference])


def inside(root: Path, path: str, hops: int = 0) -> Path:
    """`path` resolved as the image would (absolute links point into the image, not the host)."""
    assert hops < 20, f"link loop at {path}"
    parts = [p for p in path.split("/") if p]
    current = "/"
    for i, part in enumerate(parts):
        candidate = os.path.join(current, part)
        host = root / candidate.lstrip("/")
        if host.is_symlink():
            target = os.readlink(host)
            base = target if target.startswith("/") else os.path.normpath(os.path.join(current, target))
            rest = "/".join(parts[i + 1:])
            return inside(root, os.path.join(base, rest) if rest else base, hops + 1)
        current = candidate
    return root / current.lstrip("/")


def ldd_paths(binary: Path) -> list[str]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    paths = re.findall(r"(?:=>\s*)?(/\S+)\s+\(0x", out)
    assert paths, out
    return paths


def test_the_image_holds_the_binary_its_config_and_exactly_its_libraries(image, rootfs):
    # The binary is the release build's (debug info stripped, same build id), and it is small.
    image_bin = rootfs / "usr/bin/vigie"
    assert build_id(image_bin) == build_id(BINARY)
    assert image_bin.stat().st_mode & 0o777 == 0o755
    print(f"binary: {BINARY.stat().st_size / 2**20:.1f} MiB built, {image_bin.stat().st_size / 2**20:.1f} MiB in the image")
    assert (rootfs / "etc/vigie/vigie.toml").read_bytes() == (REPO_ROOT / "deploy/vigie.toml").read_bytes()

    # Every shared object ldd lists (the loader included) resolves inside the image to a copy of
    # the host's file; no other shared object is there.
    wanted = set()
    for path in ldd_paths(BINARY):
        found = inside(rootfs, path)
        assert found.is_file(), f"{path} missing from the image"
        assert found.read_bytes() == Path(path).resolve().read_bytes(), path
        wanted.add(found.relative_to(rootfs).as_posix())
    files = {p.relative_to(rootfs).as_posix() for p in rootfs.rglob("*") if p.is_file() and not p.is_symlink()}
    shared = {f for f in files if ".so" in Path(f).name}
    assert shared == wanted, f"extra {shared - wanted}, missing {wanted - shared}"

    # Their packages' dpkg records (for scanners) and copyright files; nothing else at all.
    packages = {"libc6", "libgcc-s1"}
    for package in packages:
        record = (rootfs / "var/lib/dpkg/status.d" / package).read_text()
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                                 text=True, check=True).stdout
        assert f"Package: {package}\n" in record and f"\nVersion: {version}\n" in record, record
        assert inside(rootfs, f"/usr/share/doc/{package}/copyright").is_file()
    others = files - wanted - {"usr/bin/vigie", "etc/vigie/vigie.toml", "usr/lib/os-release"}
    others -= {f"var/lib/dpkg/status.d/{p}" for p in packages}
    assert all(re.fullmatch(r"usr/share/doc/[^/]+/copyright", f) for f in others), others
    assert "ID=debian" in inside(rootfs, "/etc/os-release").read_text()
    for gone in ("bin/sh", "usr/bin/sh", "bin/bash", "usr/bin/apt", "usr/bin/dpkg"):
        assert not inside(rootfs, "/" + gone).exists(), f"{gone} in the image"
    assert not [f for f in files if (rootfs / f).stat().st_mode & 0o6000], "setuid/setgid file in the image"
    assert (rootfs / "var/lib/vigie").stat().st_mode & 0o777 == 0o700


def test_the_image_config_and_the_oci_archive(image):
    r = run(PODMAN + ["image", "inspect", image.reference])
    assert r.returncode == 0, r.stderr
    (info,) = json.loads(r.stdout)
    assert info["Id"] == image.id
    config = info["Config"]
    assert config["Entrypoint"] == ["/usr/bin/vigie"]
    assert config["Cmd"] == ["run", "--config", "/etc/vigie/vigie.toml"]
    assert config["User"] == "0:0"
    assert config["Labels"]["org.opencontainers.image.version"] == image.version
    assert len(info["RootFS"]["Layers"]) == 1
    print(f"image size per podman: {info['Size'] / 2**20:.1f} MiB; archive {image.archive.stat().st_size / 2**20:.1f} MiB")

    # The OCI archive holds the same image: its manifest's config is the image id, under its name.
    assert image.archive == REPO_ROOT / "target" / "image" / f"vigie-{image.version}.oci.tar"
    with tarfile.open(image.archive) as tar:
        index = json.load(tar.extractfile("index.json"))
        (entry,) = index["manifests"]
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == image.reference
        manifest = json.load(tar.extractfile("blobs/sha256/" + entry["digest"].removeprefix("sha256:")))
        assert manifest["config"]["digest"] == f"sha256:{image.id}"

    # The kustomize base names this image.
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (img,) = kustomization["images"]
    assert f"{img['newName']}:{img['newTag']}" == image.reference == f"localhost/vigie:{image.version}"
    workspace = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    assert image.version == workspace


def test_a_rebuild_gives_the_same_image(image):
    again, _ = build_image()
    assert again.id == image.id, "the same tree built twice gave two images (timestamps? file order?)"


def test_version_from_the_image_is_the_built_binary(image):
    r = run(PODMAN + ["run", "--rm", *ULIMITS, image.reference, "--version"])
    assert r.returncode == 0, r.stderr
    host = run([BINARY, "--version"]).stdout.strip()
    assert r.stdout.strip() == host == f"vigie {image.version}"


# --- the DaemonSet's pod, with podman -------------------------------------------------------


def containerd_like_seccomp(path: Path) -> Path:
    """podman's default seccomp profile with what containerd (1.6+) and CRI-O's RuntimeDefault
    add: bpf(2) for CAP_BPF, perf_event_open(2) for CAP_PERFMON. podman 4.3 (containers-common
    0.50) allows them only with CAP_SYS_ADMIN."""
    profile = json.loads(Path("/usr/share/containers/seccomp.json").read_text())
    moved = {"bpf": "CAP_BPF", "perf_event_open": "CAP_PERFMON"}
    for rule in profile["syscalls"]:
        if set(rule["names"]) & set(moved) and not rule.get("includes", {}).get("caps"):
            rule["names"] = [n for n in rule["names"] if n not in moved]  # the "refused without SYS_ADMIN" rule
    for name, cap in moved.items():
        profile["syscalls"].append({"names": [name], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}})
    path.write_text(json.dumps(profile))
    return path


def pod_args(tmp_path: Path, key: bytes, seccomp: Path | None) -> list[str]:
    """`podman run` options for daemonset.yaml's pod, read from the manifest field by field."""
    (ds,) = [d for d in yaml.safe_load_all((K8S / "daemonset.yaml").read_text()) if d]
    (configmap,) = [d for d in yaml.safe_load_all((K8S / "configmap.yaml").read_text()) if d]
    spec = ds["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    sc = c["securityContext"]
    args = [*ULIMITS]
    assert spec["hostPID"] and spec["hostNetwork"]
    args += ["--pid=host", "--network=host"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"]
    args += ["--cap-drop=all"] + [f"--cap-add={cap}" for cap in sc["capabilities"]["add"]]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    args += ["--security-opt=no-new-privileges", "--read-only"]
    args += [f"--user={sc['runAsUser']}:{sc['runAsGroup']}"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    if seccomp is not None:
        args += [f"--security-opt=seccomp={seccomp}"]
    if Path("/sys/module/apparmor/parameters/enabled").exists():
        assert sc["appArmorProfile"]["type"] == "Unconfined"
        args += ["--security-opt=apparmor=unconfined"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in c["volumeMounts"]:
        v = volumes[m["name"]]
        mode = "ro" if m.get("readOnly") else "rw"
        if "hostPath" in v:
            source = Path(v["hostPath"]["path"])
        elif "configMap" in v:
            assert v["configMap"]["name"] == configmap["metadata"]["name"]
            source = tmp_path / "configmap"
            source.mkdir()
            for name, text in configmap["data"].items():
                (source / name).write_text(text)
        elif "secret" in v:
            # kubelet's layout of a Secret volume: the files in a timestamped directory, reached
            # through the `..data` link, each item a link through it (how updates swap atomically).
            assert v["secret"]["secretName"] == "vigie-key"
            source = tmp_path / "secret"
            data = source / "..2026_12_01_00_00_00.000000001"
            data.mkdir(parents=True)
            (source / "..data").symlink_to(data.name)
            for item in v["secret"]["items"]:
                (data / item["path"]).write_bytes(key)
                (data / item["path"]).chmod(v["secret"]["defaultMode"])
                (source / item["path"]).symlink_to(f"..data/{item['path']}")
        else:
            raise AssertionError(f"volume kind not translated: {v}")
        args += ["-v", f"{source}:{m['mountPath']}:{mode}"]
    return args


@pytest.fixture
def node(tmp_path):
    """The node's side: tracefs mounted (as on a systemd node), a fleet key, and its fingerprint
    computed on the host from the same file."""
    if subprocess.run(["mountpoint", "-q", "/sys/kernel/tracing"]).returncode != 0:
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=True)
    key = os.urandom(32)
    host_key = tmp_path / "host-key"
    host_key.write_bytes(key)
    host_key.chmod(0o600)
    r = run([BINARY, "check", "--no-trial", "--server-port", "1", "--key-file", host_key])
    m = re.search(r"^\[ok  \] key: \S+: fingerprint ([0-9a-f]{16}) ", r.stdout, re.M)
    assert m, r.stdout
    return key, m.group(1)


def test_check_runs_in_the_image_with_the_daemonsets_privileges(image, node, tmp_path):
    key, fingerprint = node
    args = pod_args(tmp_path, key, containerd_like_seccomp(tmp_path / "seccomp.json"))
    before = vigie_programs()
    r = run(PODMAN + ["run", "--rm", *args, image.reference, "check", "--config", "/etc/vigie/vigie.toml"])
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()

    def line(what: str) -> str:
        (found,) = [l for l in lines if l.startswith("[") and l[7:].startswith(f"{what}:")]
        return found

    assert line("capabilities") == "[ok  ] capabilities: CAP_BPF=true CAP_PERFMON=true CAP_SYS_ADMIN=false CAP_SYS_PTRACE=true"
    assert line("tracefs") == "[ok  ] tracefs: mounted at /sys/kernel/tracing"
    assert line("BTF").startswith("[ok  ] BTF: /sys/kernel/btf/vmlinux present")
    assert line("capture source").startswith("[ok  ] capture source: sock")
    assert re.fullmatch(r"\[ok  \] trial load: \d+ attachments of the sock source loaded, verified and attached, "
                        r"then detached", line("trial load")), line("trial load")
    # The key the pod sees is the Secret at the ConfigMap's key_file, and it is the node's key.
    assert line("key").startswith(f"[ok  ] key: /var/lib/vigie/key: fingerprint {fingerprint} ")
    assert "vigie can run on this host" in r.stdout
    assert not [l for l in lines if l.startswith("[FAIL]")]
    # The kernel frees a detached raw tracepoint's program after a grace period, not at exit.
    assert wait_until(lambda: not left_behind(before), timeout=10, interval=0.2), \
        f"the trial load left programs behind: {sorted(left_behind(before))}"

    # Under podman's own profile (bpf only with CAP_SYS_ADMIN) the same pod cannot load: the
    # runtime's seccomp default matters, as daemonset.yaml says.
    stock = tmp_path / "stock"
    stock.mkdir()
    r = run(PODMAN + ["run", "--rm", *pod_args(stock, key, None), image.reference, "check",
                      "--config", "/etc/vigie/vigie.toml"])
    assert r.returncode != 0
    assert re.search(r"^\[FAIL\] trial load: .*Operation not permitted", r.stdout, re.M), r.stdout


def test_the_agent_runs_from_the_image_and_exports_the_key_fingerprint(image, node, tmp_path):
    key, fingerprint = node
    port = free_port()
    name = f"vigie-image-test-{os.getpid()}"
    args = pod_args(tmp_path, key, containerd_like_seccomp(tmp_path / "seccomp.json"))
    before = vigie_programs()
    # The DaemonSet's own arguments, with the metrics address on loopback instead of the pod IP.
    (ds,) = [d for d in yaml.safe_load_all((K8S / "daemonset.yaml").read_text()) if d]
    ds_args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    i = ds_args.index("--metrics-addr")
    cmd_args = ds_args[:i + 1] + [f"127.0.0.1:{port}"] + ds_args[i + 2:]
    r = run(PODMAN + ["run", "-d", "--name", name, *args, image.reference, *cmd_args])
    assert r.returncode == 0, r.stderr
    try:
        def scrape():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    return parse(resp.read().decode())
            except OSError:
                return None

        metrics = wait_until(scrape, timeout=60, interval=0.5)
        assert metrics, "no /metrics from the agent in the image:\n" + run(PODMAN + ["logs", name]).stderr
        assert metrics.get_value("vigie_key_info", fingerprint=fingerprint) == 1
        assert len(metrics.series("vigie_key_info")) == 1
        assert metrics.get_value("vigie_build_info", version=image.version) == 1
        attached = metrics.get_value("vigie_probes_attached")
        assert attached > 0
        pid = run(PODMAN + ["inspect", "--format", "{{.State.Pid}}", name]).stdout.strip()
        held = programs_held([pid]) & vigie_programs()
        assert held, f"the agent in the image (pid {pid}) holds no vigie program"
        print(f"agent in the image: pid {pid}, {len(held)} vigie programs held, {attached:.0f} attachments")
    finally:
        stop = run(PODMAN + ["stop", "-t", "20", name], timeout=60)
        status = run(PODMAN + ["inspect", "--format", "{{.State.ExitCode}}", name])
        logs = run(PODMAN + ["logs", name])
        run(PODMAN + ["rm", "-f", name])
    assert stop.returncode == 0, stop.stderr
    assert status.stdout.strip() == "0", f"exit {status.stdout.strip()} on SIGTERM:\n{logs.stderr}"
    assert not left_behind(before), "programs left after SIGTERM"
    assert not (held & vigie_programs()), "the agent's programs outlived it"

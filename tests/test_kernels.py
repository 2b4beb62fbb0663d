"""The kernel matrix: vigie on other Linux kernels than the host's, booted under qemu.

Per kernel, `cargo xtask kernels --kernel K` (xtask/src/kernels.rs) boots a pinned Debian
cloud kernel under qemu TCG (no KVM) with an initramfs holding busybox, the agent
(VIGIE_BIN), nginx and curl. In the guest: `vigie check`, then `vigie run` on nginx's port
while curl makes requests with distinct bearer tokens; the guest reports, the host compares.
Nothing here is mocked: the guest kernel verifies and runs vigie's real BPF programs.

Asserted per kernel, each as its own test so that a failure says how far the kernel got:
the guest booted; `vigie check` ran and says vigie can run; and every token's requests and
response bytes in /metrics equal curl's own counts exactly.

Never skips: a missing qemu, a kernel package Debian no longer serves, a guest that never
booted, all fail with the reason. The host's own kernel (6.18) is covered by the rest of the
suite. VIGIE_KERNELS (default: all of xtask's, "5.10,6.1,6.12") picks kernels; each takes
10 to 30 s of emulation on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness.util import HarnessError
from harness.vigie import check_binary

REPO = Path(__file__).resolve().parent.parent
KERNELS = [k.strip() for k in os.environ.get("VIGIE_KERNELS", "5.10,6.1,6.12").split(",") if k.strip()]
if not KERNELS:
    # An empty parameter set would collect no test and pytest would only skip: a matrix that
    # ran nothing must not look like one that passed (pytest.ini's empty_parameter_set_mark
    # makes that so for every file; this says why here).
    pytest.fail(f"VIGIE_KERNELS={os.environ.get('VIGIE_KERNELS')!r} names no kernel: unset it for all of "
                "5.10,6.1,6.12, or name some", pytrace=False)
GUEST_TIMEOUT = 150  # seconds of qemu per kernel before xtask kills it (a run takes 10 to 30)
pytestmark = pytest.mark.timeout(GUEST_TIMEOUT + 200)


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.fixture(scope="module", params=KERNELS)
def kernel_run(request, tmp_path_factory) -> dict:
    """Boot one kernel with `cargo xtask kernels` and return its result JSON."""
    kernel = request.param
    try:
        vigie = check_binary().resolve()
    except HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    results = tmp_path_factory.mktemp(f"kernel-{kernel}")
    cmd = ["cargo", "run", "--quiet", "--locked", "-p", "xtask", "--", "kernels",
           "--kernel", kernel, "--results", str(results), "--timeout", str(GUEST_TIMEOUT)]
    env = dict(os.environ, VIGIE_BIN=str(vigie))
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=GUEST_TIMEOUT + 150)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`{' '.join(cmd)}` did not finish in {e.timeout:.0f} s", pytrace=False)
    elapsed = time.monotonic() - t0
    print(p.stdout)
    print(p.stderr[-4000:])
    path = results / f"{kernel}.json"
    if not path.exists():
        pytest.fail(
            f"kernel {kernel}: xtask wrote no result (exit {p.returncode}); its output:\n"
            f"{_tail(p.stdout)}\n{_tail(p.stderr)}",
            pytrace=False,
        )
    r = json.loads(path.read_text())
    r["_xtask_exit"] = p.returncode
    r["_elapsed"] = elapsed
    print(f"kernel {kernel}: xtask took {elapsed:.1f} s, result in {path}")
    return r


def _problems(r: dict) -> str:
    return "\n  ".join(r.get("problems") or ["(none listed)"])


def test_guest_boots(kernel_run):
    r = kernel_run
    assert r.get("booted") is True, (
        f"kernel {r['kernel']} ({r.get('package')} {r.get('version')}) did not boot to /init.\n"
        f"problems:\n  {_problems(r)}\nconsole tail:\n{r.get('console_tail', '')}"
    )
    assert r.get("uname"), "the guest reported no `uname -r`"
    assert r["uname"].startswith(r["kernel"] + "."), f"asked for {r['kernel']}, the guest runs {r['uname']}"
    assert not r.get("kernel_alarms"), f"the guest kernel oopsed or warned:\n" + "\n".join(r["kernel_alarms"])


def test_vigie_check(kernel_run):
    r = kernel_run
    c = r.get("check") or {}
    assert c.get("ran"), f"`vigie check` did not run on {r['kernel']}:\n  {_problems(r)}\n{r.get('console_tail', '')}"
    output = "\n".join(c.get("output") or [])
    print(output)
    assert c.get("ok_lines", 0) > 0, f"`vigie check` printed no [ok] line on {r['kernel']}:\n{output}"
    assert c["rc"] == 0, (
        f"`vigie check` on Linux {r['uname']} exited {c['rc']}: vigie says it cannot run on this kernel.\n"
        + "\n".join(c.get("failures") or [])
        + f"\n(full output:)\n{output}"
    )


def test_capture_counts_are_exact(kernel_run):
    r = kernel_run
    s = r.get("smoke") or {}
    assert s.get("agent_ready"), (
        f"`vigie run` never became ready on Linux {r.get('uname')}, so nothing was captured.\n"
        f"agent stderr (tail):\n{s.get('agent_stderr_tail', '')}\nproblems:\n  {_problems(r)}"
    )
    rows = s.get("tokens") or []
    assert len(rows) >= 2, f"the guest reported {len(rows)} tokens; problems:\n  {_problems(r)}"
    table = "\n".join(
        f"  token {t['index']} {t['label']}: requests client {t['client_requests']} vigie {t['vigie_requests']:.0f}, "
        f"bytes client {t['client_bytes']} vigie {t['vigie_bytes']:.0f}"
        for t in rows
    )
    print(f"Linux {r['uname']}, capture source {s.get('capture_source')}:\n{table}")
    for t in rows:
        assert t["client_requests"] > 0 and t["client_bytes"] > 0, f"token {t['index']} made no request:\n{table}"
        assert t["vigie_requests"] == t["client_requests"] and t["vigie_bytes"] == t["client_bytes"], (
            f"Linux {r['uname']}: vigie's counts differ from the client's (exact equality required):\n{table}"
        )
    assert r.get("ok") is True, f"xtask judged kernel {r['kernel']} failed:\n  {_problems(r)}"
    assert r.get("_xtask_exit") == 0, f"`cargo xtask kernels` exited {r.get('_xtask_exit')}"

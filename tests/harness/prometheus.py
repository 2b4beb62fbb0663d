"""A real Prometheus (Debian's package) scraping a vigie agent and evaluating vigie's rules."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from .util import free_port

REPO = Path(__file__).resolve().parent.parent.parent
RULES = REPO / "deploy" / "prometheus" / "vigie-rules.yml"
FLEET_RULES = REPO / "deploy" / "prometheus" / "vigie-fleet-rules.yml"


class Prometheus:
    def __init__(self, workdir: Path, target: str | list[str], *, scrape_interval: str = "1s",
                 scrape_options: dict | None = None, rules: list[Path] | None = None):
        """`target`: one agent's address, or several (a fleet: one `instance` each).
        `scrape_options` are merged into the vigie job's scrape config (e.g. `scheme`,
        `tls_config`, `basic_auth`). `rules`: the rule files (default vigie-rules.yml)."""
        targets = [target] if isinstance(target, str) else list(target)
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(binary).exists():
            raise AssertionError("prometheus not installed (Debian package prometheus; cargo xtask setup installs it)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = self.workdir / "prometheus.yml"
        # JSON is YAML: no YAML library needed to write the config.
        config.write_text(json.dumps({
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(r) for r in (rules or [RULES])],
            "scrape_configs": [{"job_name": "vigie", "static_configs": [{"targets": targets}],
                                **(scrape_options or {})}],
        }))
        self.log = self.workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready in 30 s: {self.log.read_text()[-2000:]}")
            time.sleep(0.3)

    def query(self, expr: str) -> list[dict]:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}: {body}")
        result = body["data"]["result"]
        return result if isinstance(result, list) else [result]

    def alerts(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/alerts", timeout=10) as r:
            return json.loads(r.read())["data"]["alerts"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

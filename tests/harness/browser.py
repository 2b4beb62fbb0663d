"""A Matrix client in a real browser: matrix-js-sdk (the SDK Element Web is built on) in headless
Chromium, for judging detection on traffic the suite did not write.

The harness's own clients send what we think a browser sends (`world.browser_headers`). Here
Chromium sends it: its user agent, `Origin` and `Sec-Fetch-*`, CORS preflights, its connection
habits; and matrix-js-sdk makes the requests Element's code makes (its sync loop with a lazy
loading filter, `createMessagesRequest` for history). tests/js/browser_client.js is the page;
this module builds it (esbuild, from tests/js/node_modules, which `cargo xtask setup` installs
with `npm ci`), serves it from its own origin on 127.0.0.1 with the token and the task
(`/config`, from memory: the token is never written to a file, a URL or a log), and reads back
what the client did (`/status`) and when it made the task's first request (`/first`).

`BrowserClient(...).start()` opens one Chromium on one page for one token; `stop(why)` makes the
page stop before its next request; `close()` ends the browser.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .util import LOOPBACK, TESTS_DIR, HarnessError, stop_process, tail

JS_DIR = TESTS_DIR / "js"
BUNDLE = JS_DIR / "dist" / "browser_client.js"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAGE = b"<!doctype html><meta charset=utf-8><title>vigie test client</title><script src=/client.js></script>\n"

_bundle_lock = threading.Lock()


def bundle() -> bytes:
    """The page's script, built from tests/js when its source is newer than the bundle."""
    with _bundle_lock:
        if not (JS_DIR / "node_modules" / "matrix-js-sdk").is_dir():
            raise HarnessError("tests/js/node_modules is missing: `cargo xtask setup` installs it (npm ci in tests/js)")
        source = JS_DIR / "browser_client.js"
        if not BUNDLE.exists() or BUNDLE.stat().st_mtime < source.stat().st_mtime:
            r = subprocess.run(["npm", "run", "--silent", "build"], cwd=JS_DIR, capture_output=True, text=True,
                               timeout=120)
            if r.returncode != 0:
                raise HarnessError(f"building {BUNDLE.name} failed: {r.stderr.strip()[-2000:]}")
        return BUNDLE.read_bytes()


class BrowserClient:
    """One headless Chromium running tests/js/browser_client.js for one token and one task.

    `task` is what the page does once its sync loop is prepared:
    - `{"kind": "export", "room": ROOM}`: Element's "Export chat", 1,000 events a page from
      the live end to the room's start;
    - `{"kind": "scrape", "pace": S, "limit": N, "interleave": K, "after": [...],
      "fromSync": bool}`: every joined room to its start, as `draws.DrawnScrape` does;
    - `{"kind": "catchup", "pages": [LO, HI], "dwell": [LO_S, HI_S], "reply": P}`: every joined
      room opened once, LO-HI back-pages of 20 events through the SDK's timeline (as Element's
      room view scrolls), a dwell on each, the read marker moved, a reply with probability P.
    Then it keeps syncing until the browser is closed.
    """

    def __init__(self, *, base_url: str, user_id: str, device_id: str, token: str, task: dict, seed: int,
                 workdir: Path, name: str):
        self.name = name
        self.workdir = workdir
        self._config = json.dumps({"baseUrl": base_url, "userId": user_id, "deviceId": device_id, "token": token,
                                   "task": task, "seed": seed}).encode()
        self.status: dict = {}
        self.t_first: float | None = None
        self.synced = threading.Event()
        self.done = threading.Event()
        self._stop: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._proc: subprocess.Popen | None = None
        self._log = workdir / f"{name}-chromium.log"

    def _handler(self):
        client = self
        script = bundle()

        class Handler(BaseHTTPRequestHandler):
            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path == "/":
                    self._send(PAGE, "text/html")
                elif self.path == "/client.js":
                    self._send(script, "text/javascript")
                elif self.path == "/config":
                    self._send(client._config, "application/json")
                elif self.path == "/stop":
                    self._send(json.dumps({"stop": client._stop is not None, "why": client._stop}).encode(),
                               "application/json")
                else:
                    self.send_error(404)

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/first":
                    if client.t_first is None:
                        client.t_first = time.monotonic()
                elif self.path == "/status":
                    try:
                        client.status = json.loads(body)
                    except ValueError:
                        pass
                    outcome = client.status.get("outcome", "")
                    if outcome != "starting":
                        client.synced.set()
                    if outcome not in ("starting", "synced"):
                        client.done.set()
                self._send(b"{}", "application/json")

            def log_message(self, *args):  # the page's polls are not worth a line each
                pass

        return Handler

    def start(self, timeout: float = 60.0) -> None:
        """Open the page and wait until its sync loop is prepared."""
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler())
        threading.Thread(target=self._server.serve_forever, daemon=True, name=f"{self.name}-page").start()
        url = f"http://{LOOPBACK}:{self._server.server_address[1]}/"
        profile = self.workdir / f"{self.name}-profile"
        profile.mkdir(parents=True, exist_ok=True)
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                 f"--user-data-dir={profile}", url],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if not self.synced.wait(timeout):
            self.close()
            raise HarnessError(f"{self.name}: the browser client did not sync within {timeout:.0f} s "
                               f"(status {self.status}); chromium's log:\n{tail(self._log, 30)}")

    def stop(self, why: str = "stopped") -> None:
        """The page stops its task before its next request (the sync loop goes on)."""
        self._stop = why

    def close(self) -> None:
        stop_process(self._proc, grace=5.0)
        self._proc = None
        # The profile (caches, local storage) goes with the browser; chromium's log stays.
        shutil.rmtree(self.workdir / f"{self.name}-profile", ignore_errors=True)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

"""A Matrix client-server API client that counts every byte the server sends it.

Layers:
- `CountingSocket`: a `socket.socket` subclass whose every receive (`recv`, `recv_into`,
  `recvfrom[_into]`, `recvmsg[_into]`, and so `makefile()` readers, which go through
  `recv_into`) adds to `rx`, and every send to `tx`. `MSG_PEEK` reads are not counted.
- `CountingSSLSocket` / `counting_tls_context()`: the same over TLS, counting the plaintext
  received after decryption (what the server's TLS library was asked to write).
- `Connection`: one persistent HTTP/1.1 keep-alive connection (`http.client`) over a
  `CountingSocket` (or, with `tls=`, a `CountingSSLSocket`). It reconnects transparently when the server has closed it, and each
  `request()` returns the exact number of bytes the server sent for that request: status
  line, headers, interim `100 Continue` responses, chunk framing and body.
- `Recorder`: thread-safe per-token tallies (requests, bytes, per endpoint class), and a count
  of requests in flight.
- `MatrixClient`: the client-server calls the scenarios need, each recorded with the endpoint
  class vigie is expected to give it. The class is decided here, per call, independently of
  vigie's classifier.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import select
import socket
import ssl
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import quote, urlencode

# Endpoint classes, as vigie labels them.
ENDPOINT_CLASSES = (
    "sync",
    "sliding_sync",
    "initial_sync",
    "messages",
    "context",
    "search",
    "members",
    "state",
    "event",
    "room_keys",
    "keys",
    "joined_rooms",
    "public_rooms",
    "send",
    "login",
    "media_download",
    "media_thumbnail",
    "media_upload",
    "other",
)

CLIENT_V3 = "/_matrix/client/v3"
CLIENT_V1 = "/_matrix/client/v1"
MEDIA_V3 = "/_matrix/media/v3"
SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"

_RECV_ERRORS = (OSError, http.client.HTTPException)


class _CountsSent:
    """`send`/`sendall` that count what went out (`self.tx`), for both counting sockets."""

    def send(self, data, flags=0):
        n = super().send(data, flags)
        self.tx += n
        return n

    def sendall(self, data, flags=0):
        # Loop over send() so a partial failure still counts what went out.
        view = memoryview(data).cast("B")
        while view:
            n = self.send(view, flags)
            view = view[n:]


class CountingSocket(_CountsSent, socket.socket):
    """A TCP socket that counts every byte received (`rx`) and sent (`tx`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rx = 0
        self.tx = 0
        self.rx_calls = 0

    def _count_rx(self, n: int, flags: int) -> None:
        if not flags & socket.MSG_PEEK:
            self.rx += n
            self.rx_calls += 1

    def recv(self, bufsize, flags=0):
        data = super().recv(bufsize, flags)
        self._count_rx(len(data), flags)
        return data

    def recv_into(self, buffer, nbytes=0, flags=0):
        n = super().recv_into(buffer, nbytes, flags)
        self._count_rx(n, flags)
        return n

    def recvfrom(self, bufsize, flags=0):
        data, addr = super().recvfrom(bufsize, flags)
        self._count_rx(len(data), flags)
        return data, addr

    def recvfrom_into(self, buffer, nbytes=0, flags=0):
        n, addr = super().recvfrom_into(buffer, nbytes, flags)
        self._count_rx(n, flags)
        return n, addr

    def recvmsg(self, bufsize, ancbufsize=0, flags=0):
        result = super().recvmsg(bufsize, ancbufsize, flags)
        self._count_rx(len(result[0]), flags)
        return result

    def recvmsg_into(self, buffers, ancbufsize=0, flags=0):
        result = super().recvmsg_into(buffers, ancbufsize, flags)
        self._count_rx(result[0], flags)
        return result


    def sendto(self, data, *args):
        n = super().sendto(data, *args)
        self.tx += n
        return n

    def sendmsg(self, buffers, *args):
        n = super().sendmsg(buffers, *args)
        self.tx += n
        return n

    def sendfile(self, file, offset=0, count=None):
        # Never os.sendfile(): it would bypass the counting send().
        return self._sendfile_use_send(file, offset, count)


class CountingHTTPConnection(http.client.HTTPConnection):
    """`http.client.HTTPConnection` whose socket is a `CountingSocket`."""

    def connect(self):
        sock = CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            if self.source_address:
                sock.bind(self.source_address)
            sock.connect((self.host, self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class CountingSSLSocket(_CountsSent, ssl.SSLSocket):
    """A TLS socket that counts the *plaintext* bytes received (`rx`) and sent (`tx`): what
    the application reads after decryption, i.e. what the server's TLS library was given to
    write. Install with `context.sslsocket_class = CountingSSLSocket` (see `counting_tls_context`).

    `recv(n, socket.MSG_DONTWAIT)` is emulated (SSL sockets refuse flags) so that
    `Connection` can drain a kept-alive connection the same way over TLS; when no
    application data is ready it raises BlockingIOError.
    """

    # SSLSocket instances are built by `_create`, not `__init__`: class-level defaults.
    rx = 0
    tx = 0
    rx_calls = 0

    def _count_rx(self, n: int) -> None:
        self.rx += n
        self.rx_calls += 1

    def recv(self, bufsize=1024, flags=0):
        if flags & ~socket.MSG_DONTWAIT:
            raise ValueError(f"unsupported flags {flags:#x} on a TLS socket")
        if flags & socket.MSG_DONTWAIT:
            timeout = self.gettimeout()
            self.settimeout(0.0)
            try:
                data = super().recv(bufsize)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise BlockingIOError("no application data ready") from None
            finally:
                self.settimeout(timeout)
        else:
            data = super().recv(bufsize)
        self._count_rx(len(data))
        return data

    def recv_into(self, buffer, nbytes=None, flags=0):
        n = super().recv_into(buffer, nbytes, flags)
        self._count_rx(n)
        return n



def counting_tls_context(cafile: str | os.PathLike | None = None, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client context whose sockets are `CountingSSLSocket`s. With `cafile`, the server's
    certificate is verified against it (hostname checks off: tests connect to 127.0.0.1);
    without, nothing is verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if cafile is not None:
        ctx.load_verify_locations(cafile=str(cafile))
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    ctx.sslsocket_class = CountingSSLSocket
    return ctx


class CountingHTTPSConnection(CountingHTTPConnection):
    """HTTP/1.1 over TLS; the socket is a `CountingSSLSocket` counting plaintext bytes."""

    def __init__(self, host, port=None, *, context: ssl.SSLContext, **kwargs):
        super().__init__(host, port, **kwargs)
        if not issubclass(context.sslsocket_class, CountingSSLSocket):
            raise ValueError("the TLS context must make CountingSSLSocket sockets (counting_tls_context())")
        self.tls_context = context

    def connect(self):
        super().connect()
        raw = self.sock
        try:
            self.sock = self.tls_context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class CountingHTTPS10Connection(CountingHTTPSConnection):
    _http_vsn = 10
    _http_vsn_str = "HTTP/1.0"


class CountingHTTP10Connection(CountingHTTPConnection):
    """Speaks HTTP/1.0: the server closes the connection after each response."""

    _http_vsn = 10
    _http_vsn_str = "HTTP/1.0"


class _ConsumedCounter:
    """A buffered reader shared by several pipelined responses: counts the bytes each one
    consumes, and ignores `close()` from `http.client` (the next response still needs it)."""

    def __init__(self, raw_reader):
        self._r = raw_reader
        self.consumed = 0

    def _count(self, data):
        self.consumed += len(data)
        return data

    def read(self, *args):
        return self._count(self._r.read(*args))

    def read1(self, *args):
        return self._count(self._r.read1(*args))

    def readline(self, *args):
        return self._count(self._r.readline(*args))

    def readinto(self, b):
        n = self._r.readinto(b)
        self.consumed += n or 0
        return n

    def peek(self, *args):
        return self._r.peek(*args)

    def close(self):
        pass

    def flush(self):
        pass

    @property
    def closed(self):
        return False

    def really_close(self):
        self._r.close()


class _ReaderSock:
    def __init__(self, reader):
        self._reader = reader

    def makefile(self, *args, **kwargs):
        return self._reader


@dataclass
class Response:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes
    wire_bytes: int  # every byte received from the server for this request
    sent_bytes: int  # every byte sent for this request (request line, headers, body)
    stray_bytes: int  # bytes found waiting on the connection before this request was sent
    attempts: int  # 1, or 2 when the first try hit a connection the server had closed
    conn_id: str

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


_conn_ids = itertools.count(1)


class Connection:
    """One persistent HTTP/1.1 connection that counts bytes per request.

    Not thread-safe: one thread uses a connection at a time.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 60.0,
        idle_reconnect: float = 45.0,
        name: str = "",
        http10: bool = False,
        tls: ssl.SSLContext | None = None,
    ):
        """tls: speak HTTPS with this context (from `counting_tls_context()`); bytes are then
        counted as plaintext, after decryption."""
        self.http10 = http10
        self.tls = tls
        self.host = host
        self.port = port
        self.timeout = timeout
        # Twisted drops idle HTTP connections after 60 s; reconnect before that rather than
        # racing the server's close.
        self.idle_reconnect = idle_reconnect
        self.name = name or f"conn{next(_conn_ids)}"
        self._conn: CountingHTTPConnection | None = None
        self._sock: CountingSocket | None = None
        self._used = False
        self._last_use = 0.0
        self.connects = 0
        self.reconnects_eof = 0
        self.reconnects_idle = 0
        self.retries = 0
        self.rx_closed = 0  # bytes received on sockets that have since been closed
        self.tx_closed = 0
        self.stray_total = 0

    # -- connection management -------------------------------------------------------
    @property
    def rx_total(self) -> int:
        return self.rx_closed + (self._sock.rx if self._sock is not None else 0)

    @property
    def tx_total(self) -> int:
        return self.tx_closed + (self._sock.tx if self._sock is not None else 0)

    def _open(self) -> None:
        if self.tls is not None:
            cls = CountingHTTPS10Connection if self.http10 else CountingHTTPSConnection
            conn = cls(self.host, self.port, timeout=self.timeout, context=self.tls)
        else:
            cls = CountingHTTP10Connection if self.http10 else CountingHTTPConnection
            conn = cls(self.host, self.port, timeout=self.timeout)
        conn.connect()
        self._conn = conn
        self._sock = conn.sock
        self._used = False
        self._last_use = time.monotonic()
        self.connects += 1

    def close(self) -> None:
        if self._sock is not None:
            self.rx_closed += self._sock.rx
            self.tx_closed += self._sock.tx
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._conn = None
        self._sock = None
        self._used = False

    def _drain_if_closed(self) -> int:
        """Before reusing the connection: reconnect if the server closed it or it sat idle too
        long. Returns bytes that were waiting unread (normally 0): they belong to the
        previous request."""
        if self._sock is None:
            self._open()
            return 0
        stray = 0
        if time.monotonic() - self._last_use > self.idle_reconnect:
            self.reconnects_idle += 1
            self.close()
            self._open()
            return 0
        sock = self._sock
        eof = False
        while True:
            readable, _, _ = select.select([sock], [], [], 0)
            # Over TLS, decrypted bytes may already wait inside the TLS library.
            if not readable and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                eof = True
                break
            if not data:
                eof = True
                break
            stray += len(data)
        if stray:
            self.stray_total += stray
        if eof or stray:
            if eof:
                self.reconnects_eof += 1
            self.close()
            self._open()
        return stray

    # -- requests -----------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send one request and read its whole response; count its bytes exactly."""
        headers = dict(headers or {})
        stray = 0
        for attempt in (1, 2):
            stray += self._drain_if_closed()
            reused = self._used
            conn, sock = self._conn, self._sock
            assert conn is not None and sock is not None
            rx0, tx0 = sock.rx, sock.tx
            try:
                conn.request(method, path, body=body, headers=headers)
                self._used = True
                resp = conn.getresponse()
                data = resp.read()
            except _RECV_ERRORS:
                got = sock.rx - rx0
                self.close()
                # The server closed a kept-alive connection just as we reused it: it never
                # read this request (no byte came back), so send it again on a new one.
                if attempt == 1 and reused and got == 0:
                    self.retries += 1
                    continue
                raise
            wire = sock.rx - rx0
            sent = sock.tx - tx0
            self._last_use = time.monotonic()
            if resp.will_close or conn.sock is None:
                self.close()
            return Response(
                status=resp.status,
                reason=resp.reason,
                headers=resp.headers,
                body=data,
                wire_bytes=wire,
                sent_bytes=sent,
                stray_bytes=stray,
                attempts=attempt,
                conn_id=self.name,
            )
        raise AssertionError("unreachable")


    def pipeline(self, requests: list[tuple[str, str, bytes | None, dict[str, str]]],
                 trickle: int | None = None, trickle_pause: float = 0.005) -> list[Response]:
        """Write several requests in one send, then read their responses in order (HTTP/1.1
        pipelining). Each response's bytes are the bytes its parser consumed.

        trickle: send the bytes in pieces of this size with a pause between them (a slow
        client: the server receives the request head split at arbitrary places)."""
        assert not self.http10
        stray = self._drain_if_closed()
        sock = self._sock
        assert sock is not None
        raw = bytearray()
        for method, path, body, headers in requests:
            h = {"Host": f"{self.host}:{self.port}", "Accept-Encoding": "identity", **headers}
            if body is not None:
                h["Content-Length"] = str(len(body))
            raw += f"{method} {path} HTTP/1.1\r\n".encode()
            raw += "".join(f"{k}: {v}\r\n" for k, v in h.items()).encode() + b"\r\n"
            raw += body or b""
        rx0, tx0 = sock.rx, sock.tx
        if trickle:
            for i in range(0, len(raw), trickle):
                sock.sendall(bytes(raw[i:i + trickle]))
                time.sleep(trickle_pause)
        else:
            sock.sendall(bytes(raw))
        self._used = True
        reader = _ConsumedCounter(sock.makefile("rb"))
        out = []
        will_close = False
        try:
            for i, (method, path, body, headers) in enumerate(requests):
                start = reader.consumed
                resp = http.client.HTTPResponse(_ReaderSock(reader), method=method)
                resp.begin()
                data = resp.read()
                will_close = will_close or resp.will_close
                out.append(Response(
                    status=resp.status, reason=resp.reason, headers=resp.headers, body=data,
                    wire_bytes=reader.consumed - start,
                    sent_bytes=(sock.tx - tx0) if i == 0 else 0,
                    stray_bytes=stray if i == 0 else 0, attempts=1, conn_id=self.name,
                ))
        finally:
            reader.really_close()
        if reader.consumed != sock.rx - rx0:
            raise AssertionError(
                f"pipelined responses consumed {reader.consumed} bytes, socket received {sock.rx - rx0}")
        self._last_use = time.monotonic()
        if will_close:
            self.close()
        return out


# -- accounting -------------------------------------------------------------------------


@dataclass
class RequestRecord:
    token: str | None
    endpoint: str
    method: str
    path: str  # with any access_token redacted
    status: int
    wire_bytes: int
    sent_bytes: int
    body_bytes: int
    started: float
    duration: float
    conn_id: str
    attempts: int = 1
    user: str | None = None


class Recorder:
    """Thread-safe per-token request/byte tallies for everything the clients did."""

    def __init__(self):
        self._lock = threading.Lock()
        self.records: list[RequestRecord] = []
        self.in_flight = 0
        self.retries = 0
        self.stray_bytes = 0
        self._last_by_conn: dict[str, RequestRecord] = {}

    @contextmanager
    def tracking(self):
        with self._lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def add(self, record: RequestRecord, stray_bytes: int = 0) -> None:
        with self._lock:
            if stray_bytes:
                # Bytes left unread after the previous response on this connection: count
                # them for the request they came with.
                self.stray_bytes += stray_bytes
                prev = self._last_by_conn.get(record.conn_id)
                if prev is not None:
                    prev.wire_bytes += stray_bytes
            if record.attempts > 1:
                self.retries += record.attempts - 1
            self.records.append(record)
            self._last_by_conn[record.conn_id] = record

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self.records)

    def totals(self) -> dict[str | None, dict]:
        """`{token: {"requests", "bytes", "by_endpoint": {ep: n}, "bytes_by_endpoint": {ep: b}}}`."""
        out: dict[str | None, dict] = {}
        for r in self.snapshot():
            t = out.setdefault(
                r.token,
                {"requests": 0, "bytes": 0, "by_endpoint": defaultdict(int), "bytes_by_endpoint": defaultdict(int)},
            )
            t["requests"] += 1
            t["bytes"] += r.wire_bytes
            t["by_endpoint"][r.endpoint] += 1
            t["bytes_by_endpoint"][r.endpoint] += r.wire_bytes
        for t in out.values():
            t["by_endpoint"] = dict(t["by_endpoint"])
            t["bytes_by_endpoint"] = dict(t["bytes_by_endpoint"])
        return out

    def dump(self, path: str | os.PathLike, redact: Iterable[str] = ()) -> None:
        """Write every record as one JSON line (tokens replaced by their index in `redact`)."""
        names = {tok: f"token#{i}" for i, tok in enumerate(redact)}
        with open(path, "w") as f:
            for r in self.snapshot():
                d = r.__dict__.copy()
                d["token"] = names.get(r.token, None if r.token is None else "token#?")
                f.write(json.dumps(d) + "\n")


# -- Matrix client ----------------------------------------------------------------------


class MatrixError(Exception):
    def __init__(self, method: str, path: str, status: int, body: bytes):
        self.status = status
        self.body = body
        try:
            self.errcode = json.loads(body).get("errcode")
        except Exception:  # noqa: BLE001
            self.errcode = None
        super().__init__(f"{method} {path} -> {status}: {body[:300]!r}")


def redact_path(path: str) -> str:
    if "access_token=" not in path:
        return path
    head, _, query = path.partition("?")
    parts = ["access_token=<redacted>" if p.startswith("access_token=") else p for p in query.split("&")]
    return head + "?" + "&".join(parts)


class MatrixClient:
    """Client-server API calls over one counting keep-alive connection.

    token_in_query: send the access token as `?access_token=` instead of `Authorization: Bearer`.
    room_id_style: "raw" (`!abc:test.local` as is in paths), "encoded" (`%21abc%3Atest.local`),
    or "alternate" (switch at every call).
    """

    def __init__(
        self,
        host: str,
        port: int,
        access_token: str | None = None,
        *,
        user_id: str | None = None,
        token_in_query: bool = False,
        recorder: Recorder | None = None,
        room_id_style: str = "raw",
        timeout: float = 60.0,
        name: str = "",
        user_agent: str = "vigie-tests/1",
        extra_headers: dict[str, str] | None = None,
        http10: bool = False,
        tls: ssl.SSLContext | None = None,
    ):
        """extra_headers go on every request (e.g. {"Connection": "close"}); http10 makes the
        client speak HTTP/1.0; tls (from `counting_tls_context()`) makes it speak HTTPS and
        count plaintext bytes."""
        assert room_id_style in ("raw", "encoded", "alternate")
        self.extra_headers = dict(extra_headers or {})
        self.access_token = access_token
        self.user_id = user_id
        self.token_in_query = token_in_query
        self.recorder = recorder if recorder is not None else Recorder()
        self.room_id_style = room_id_style
        self.user_agent = user_agent
        self.conn = Connection(host, port, timeout=timeout, name=name, http10=http10, tls=tls)
        self._txn = itertools.count(1)
        self._style_flip = itertools.count()

    def close(self) -> None:
        self.conn.close()

    # -- plumbing -----------------------------------------------------------------------
    def _enc(self, part: str) -> str:
        """A room/event id as a path segment, raw or percent-encoded per the client's style."""
        style = self.room_id_style
        if style == "alternate":
            style = "raw" if next(self._style_flip) % 2 == 0 else "encoded"
        if style == "raw":
            return part
        return quote(part, safe="")

    def request(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        query: dict[str, Any] | None = None,
        json_body: Any = None,
        body: bytes | None = None,
        content_type: str | None = None,
        auth: bool = True,
        ok: Iterable[int] = (200,),
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send a request, record it under this client's token and `endpoint`, return it.

        Raises MatrixError (after recording) when the status is not in `ok`.
        """
        assert endpoint in ENDPOINT_CLASSES, endpoint
        full, headers, body, token = self._prepare(path, query, json_body, body, content_type, auth, headers)
        started = time.time()
        t0 = time.monotonic()
        with self.recorder.tracking():
            resp = self.conn.request(method, full, body=body, headers=headers)
            self.recorder.add(
                RequestRecord(
                    token=token,
                    endpoint=endpoint,
                    method=method,
                    path=redact_path(full),
                    status=resp.status,
                    wire_bytes=resp.wire_bytes,
                    sent_bytes=resp.sent_bytes,
                    body_bytes=len(resp.body),
                    started=started,
                    duration=time.monotonic() - t0,
                    conn_id=resp.conn_id,
                    attempts=resp.attempts,
                    user=self.user_id,
                ),
                stray_bytes=resp.stray_bytes,
            )
        if resp.status not in tuple(ok):
            raise MatrixError(method, redact_path(full), resp.status, resp.body)
        return resp

    def _prepare(self, path, query, json_body, body, content_type, auth, headers):
        q = {k: v for k, v in (query or {}).items() if v is not None}
        hdrs = {"User-Agent": self.user_agent, **self.extra_headers, **(headers or {})}
        token = self.access_token if auth else None
        if token is not None:
            if self.token_in_query:
                q["access_token"] = token
            else:
                hdrs["Authorization"] = f"Bearer {token}"
        full = path + ("?" + urlencode(q) if q else "")
        if json_body is not None:
            body = json.dumps(json_body).encode()
            content_type = content_type or "application/json"
        if content_type:
            hdrs["Content-Type"] = content_type
        return full, hdrs, body, token

    def pipeline(self, calls: list[tuple[str, str, str, dict | None]], trickle: int | None = None
                 ) -> list[Response]:
        """Pipelined requests: calls are (method, path, endpoint, query). Records each.
        With one call and `trickle`, a single request sent a few bytes at a time."""
        prepared = []
        for method, path, endpoint, query in calls:
            assert endpoint in ENDPOINT_CLASSES, endpoint
            full, hdrs, body, token = self._prepare(path, query, None, None, None, True, None)
            prepared.append((method, full, endpoint, body, hdrs, token))
        started = time.time()
        t0 = time.monotonic()
        with self.recorder.tracking():
            responses = self.conn.pipeline([(m, f, b, h) for m, f, _, b, h, _ in prepared], trickle=trickle)
            for (method, full, endpoint, _, _, token), resp in zip(prepared, responses):
                self.recorder.add(
                    RequestRecord(
                        token=token, endpoint=endpoint, method=method, path=redact_path(full),
                        status=resp.status, wire_bytes=resp.wire_bytes, sent_bytes=resp.sent_bytes,
                        body_bytes=len(resp.body), started=started, duration=time.monotonic() - t0,
                        conn_id=resp.conn_id, user=self.user_id,
                    ),
                    stray_bytes=resp.stray_bytes,
                )
        return responses

    def _json(self, *args, **kwargs) -> Any:
        return self.request(*args, **kwargs).json()

    def _new_txn(self) -> str:
        return f"{os.getpid()}.{id(self) & 0xFFFF:x}.{next(self._txn)}.{time.monotonic_ns()}"

    # -- anonymous --------------------------------------------------------------------------
    def versions(self) -> dict:
        return self._json("GET", "/_matrix/client/versions", "other", auth=False)

    def login(self, username: str, password: str, device_id: str | None = None) -> dict:
        body = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": password,
        }
        if device_id:
            body["device_id"] = device_id
        return self._json("POST", f"{CLIENT_V3}/login", "login", json_body=body, auth=False)

    # -- account / misc ("other") ---------------------------------------------------------------
    def whoami(self) -> dict:
        return self._json("GET", f"{CLIENT_V3}/account/whoami", "other")

    def create_filter(self, filter_def: dict) -> str:
        assert self.user_id
        path = f"{CLIENT_V3}/user/{quote(self.user_id, safe='')}/filter"
        return self._json("POST", path, "other", json_body=filter_def)["filter_id"]

    def create_room(self, *, name: str | None = None, invite: list[str] | None = None,
                    preset: str = "private_chat", visibility: str | None = None,
                    topic: str | None = None) -> str:
        body: dict[str, Any] = {"preset": preset}
        if name:
            body["name"] = name
        if topic:
            body["topic"] = topic
        if invite:
            body["invite"] = invite
        if visibility:
            body["visibility"] = visibility
        return self._json("POST", f"{CLIENT_V3}/createRoom", "other", json_body=body)["room_id"]

    def join(self, room_id_or_alias: str) -> str:
        path = f"{CLIENT_V3}/join/{self._enc(room_id_or_alias)}"
        return self._json("POST", path, "other", json_body={})["room_id"]

    def invite(self, room_id: str, user_id: str) -> None:
        path = f"{CLIENT_V3}/rooms/{self._enc(room_id)}/invite"
        self._json("POST", path, "other", json_body={"user_id": user_id})

    def typing(self, room_id: str, typing: bool, timeout_ms: int = 5000) -> None:
        assert self.user_id
        path = f"{CLIENT_V3}/rooms/{self._enc(room_id)}/typing/{quote(self.user_id, safe='')}"
        body: dict[str, Any] = {"typing": typing}
        if typing:
            body["timeout"] = timeout_ms
        self._json("PUT", path, "other", json_body=body)

    def read_receipt(self, room_id: str, event_id: str) -> None:
        path = f"{CLIENT_V3}/rooms/{self._enc(room_id)}/receipt/m.read/{self._enc(event_id)}"
        self._json("POST", path, "other", json_body={})

    def read_markers(self, room_id: str, fully_read: str) -> None:
        """Move the private read marker (`m.fully_read`, which no other member sees)."""
        path = f"{CLIENT_V3}/rooms/{self._enc(room_id)}/read_markers"
        self._json("POST", path, "other", json_body={"m.fully_read": fully_read})

    # -- rooms ----------------------------------------------------------------------------------
    def send_message(self, room_id: str, body: str, txn_id: str | None = None) -> str:
        path = f"{CLIENT_V3}/rooms/{self._enc(room_id)}/send/m.room.message/{quote(txn_id or self._new_txn(), safe='')}"
        content = {"msgtype": "m.text", "body": body}
        return self._json("PUT", path, "send", json_body=content)["event_id"]

    def messages(self, room_id: str, *, dir: str = "b", from_token: str | None = None,
                 limit: int | None = None, filter_json: dict | None = None) -> dict:
        path = f"{CLIENT_V3}/rooms/{self._enc(room_id)}/messages"
        query = {"dir": dir, "from": from_token, "limit": limit,
                 "filter": json.dumps(filter_json) if filter_json else None}
        return self._json("GET", path, "messages", query=query)

    def members(self, room_id: str, at: str | None = None) -> dict:
        path = f"{CLIENT_V3}/rooms/{self._enc(room_id)}/members"
        return self._json("GET", path, "members", query={"at": at})

    def joined_rooms(self) -> list[str]:
        return self._json("GET", f"{CLIENT_V3}/joined_rooms", "joined_rooms")["joined_rooms"]

    def state(self, room_id: str) -> list:
        return self._json("GET", f"{CLIENT_V3}/rooms/{self._enc(room_id)}/state", "state")

    def context(self, room_id: str, event_id: str, limit: int = 10) -> dict:
        path = f"{CLIENT_V3}/rooms/{self._enc(room_id)}/context/{self._enc(event_id)}"
        return self._json("GET", path, "context", query={"limit": limit})

    def event(self, room_id: str, event_id: str) -> dict:
        path = f"{CLIENT_V3}/rooms/{self._enc(room_id)}/event/{self._enc(event_id)}"
        return self._json("GET", path, "event")

    def search(self, term: str, rooms: list[str] | None = None) -> dict:
        crit: dict[str, Any] = {"search_term": term, "keys": ["content.body"], "order_by": "recent"}
        if rooms:
            crit["filter"] = {"rooms": rooms, "limit": 10}
        body = {"search_categories": {"room_events": crit}}
        return self._json("POST", f"{CLIENT_V3}/search", "search", json_body=body)

    def public_rooms(self, limit: int = 20) -> dict:
        return self._json("GET", f"{CLIENT_V3}/publicRooms", "public_rooms", query={"limit": limit})

    # -- sync -----------------------------------------------------------------------------------
    def sync(self, *, since: str | None = None, timeout_ms: int | None = None,
             filter_id: str | None = None, full_state: bool | None = None,
             set_presence: str | None = None) -> dict:
        query = {
            "since": since,
            "timeout": timeout_ms,
            "filter": filter_id,
            "full_state": None if full_state is None else ("true" if full_state else "false"),
            "set_presence": set_presence,
        }
        return self._json("GET", f"{CLIENT_V3}/sync", "sync", query=query)

    def sliding_sync(self, body: dict, *, pos: str | None = None, timeout_ms: int | None = None) -> dict:
        query = {"pos": pos, "timeout": timeout_ms if pos else None}
        return self._json("POST", SLIDING_SYNC, "sliding_sync", query=query, json_body=body)

    # -- keys -----------------------------------------------------------------------------------
    def keys_query(self, user_ids: list[str]) -> dict:
        body = {"device_keys": {u: [] for u in user_ids}, "timeout": 10000}
        return self._json("POST", f"{CLIENT_V3}/keys/query", "keys", json_body=body)

    def room_keys_version(self) -> Response:
        """Key backup version: 404 M_NOT_FOUND when there is none, which still is a request."""
        return self.request("GET", f"{CLIENT_V3}/room_keys/version", "room_keys", ok=(200, 404))

    # -- media ----------------------------------------------------------------------------------
    def upload(self, data: bytes, content_type: str = "application/octet-stream",
               filename: str | None = None, expect_continue: bool = False) -> str:
        """expect_continue: send `Expect: 100-continue` (as curl does for large bodies); the
        body still follows at once, and the server's interim `100 Continue` is counted."""
        resp = self.request("POST", f"{MEDIA_V3}/upload", "media_upload",
                            query={"filename": filename}, body=data, content_type=content_type,
                            headers={"Expect": "100-continue"} if expect_continue else None)
        return resp.json()["content_uri"]

    @staticmethod
    def _split_mxc(mxc: str) -> tuple[str, str]:
        assert mxc.startswith("mxc://"), mxc
        server, _, media_id = mxc[len("mxc://"):].partition("/")
        return server, media_id

    def download(self, mxc: str) -> bytes:
        server, media_id = self._split_mxc(mxc)
        path = f"{CLIENT_V1}/media/download/{quote(server, safe='')}/{quote(media_id, safe='')}"
        return self.request("GET", path, "media_download").body

    def thumbnail(self, mxc: str, width: int = 32, height: int = 32, method: str = "scale") -> bytes:
        server, media_id = self._split_mxc(mxc)
        path = f"{CLIENT_V1}/media/thumbnail/{quote(server, safe='')}/{quote(media_id, safe='')}"
        return self.request("GET", path, "media_thumbnail",
                            query={"width": width, "height": height, "method": method}).body

"""Sending one request to one worker, and telling what happened as an
:class:`~gpufleet.router.retry.Outcome`. Nothing here decides to retry.

A small HTTP/1.1 client over pooled keep-alive sockets, written for this one job (POST a
JSON body to a vLLM server, read a JSON answer or an SSE stream). urllib3 + http.client
did the same with about a quarter of the request path's CPU (header parsing through the
``email`` package, a liveness poll per pooled connection, two writes per request); this
costs a few buffered ``readline`` calls. Only plain ``http://`` worker URLs are served
(the workers are reached over the tailnet, which encrypts).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from .retry import Outcome, classify_status

_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailers", "transfer-encoding", "upgrade", "content-length", "server", "date"))
_MAX_LINE = 65536
_MAX_HEADERS = 200


class UpstreamBroken(Exception):
    """The worker closed or broke the connection, or answered something that is not HTTP."""


class _Conn:
    __slots__ = ("sock", "rfile", "reused")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=65536)
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.sock.close()


class _Pool:
    def __init__(self, host: str, port: int, prefix: str, maxsize: int):
        self.host, self.port, self.prefix, self.maxsize = host, port, prefix, maxsize
        self.host_header = f"{host}:{port}".encode()
        self.idle: list[_Conn] = []

    def get(self, connect_timeout: float) -> _Conn:
        while self.idle:
            conn = self.idle.pop()
            conn.reused = True
            return conn
        sock = socket.create_connection((self.host, self.port), timeout=connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock)

    def put(self, conn: _Conn) -> None:
        if len(self.idle) < self.maxsize:
            self.idle.append(conn)
        else:
            conn.close()


class UpstreamResponse:
    """An answer whose head has been read; the body is read by the caller."""

    def __init__(self, pool: _Pool, conn: _Conn, status: int, headers: list[tuple[str, str]],
                 length: int | None, chunked: bool, keep_alive: bool):
        self._pool, self._conn = pool, conn
        self.status = status
        self.headers = headers
        self._length = length
        self.chunked = chunked
        self._keep_alive = keep_alive
        self._done = False

    def set_timeout(self, seconds: float) -> None:
        with contextlib.suppress(OSError):
            self._conn.sock.settimeout(seconds)

    def read(self) -> bytes:
        """The whole body."""
        if self.chunked:
            return b"".join(self.iter_chunks())
        rfile = self._conn.rfile
        if self._length is not None:
            data = rfile.read(self._length)
            if len(data) != self._length:
                raise UpstreamBroken(f"body cut short ({len(data)} of {self._length} bytes)")
        else:
            data = rfile.read()  # delimited by the end of the connection
            self._keep_alive = False
        self._done = True
        return data

    def iter_chunks(self) -> Iterator[bytes]:
        """The body as it arrives: one item per HTTP chunk (an SSE event), never buffered."""
        rfile = self._conn.rfile
        if not self.chunked:
            remaining = self._length
            while remaining is None or remaining > 0:
                data = rfile.read1(65536 if remaining is None else min(65536, remaining))
                if not data:
                    if remaining:
                        raise UpstreamBroken("body cut short")
                    self._keep_alive = False
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data
            self._done = True
            return
        while True:
            line = rfile.readline(_MAX_LINE)
            if not line.endswith(b"\n"):
                raise UpstreamBroken("stream cut short")
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise UpstreamBroken(f"bad chunk size {line[:40]!r}") from None
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = rfile.readline(_MAX_LINE)
                    if trailer in (b"\r\n", b"\n"):
                        break
                    if not trailer:
                        raise UpstreamBroken("stream cut short")
                self._done = True
                return
            data = rfile.read(size)
            if len(data) != size or rfile.read(2) != b"\r\n":
                raise UpstreamBroken("chunk cut short")
            yield data

    def finish(self, *, reuse: bool) -> None:
        """Hand the connection back for the next request, or close it (which also cancels
        the request on the worker)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if reuse and self._done and self._keep_alive:
            self._pool.put(conn)
        else:
            conn.close()


@dataclass
class Attempt:
    outcome: Outcome
    response: UpstreamResponse | None = None
    error: str = ""


class Upstreams:
    def __init__(self, api_key: str | None, connect_timeout_s: float, first_byte_timeout_s: float,
                 read_timeout_s: float, pool_maxsize: int = 256):
        self.connect_timeout_s = connect_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s
        self.read_timeout_s = read_timeout_s
        self.pool_maxsize = pool_maxsize
        head = b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        if api_key:
            head += b"Authorization: Bearer " + api_key.encode("latin-1") + b"\r\n"
        self._fixed_headers = head
        self._pools: dict[str, _Pool] = {}

    def _pool(self, base_url: str) -> _Pool:
        pool = self._pools.get(base_url)
        if pool is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"worker URL {base_url!r} is not http://host:port")
            pool = self._pools[base_url] = _Pool(parts.hostname, parts.port or 80, parts.path.rstrip("/"),
                                                 self.pool_maxsize)
        return pool

    def send(self, base_url: str, path: str, body: bytes) -> Attempt:
        """POST and read the response head (connect and first-byte timeouts apply)."""
        try:
            pool = self._pool(base_url)
        except ValueError as exc:
            return Attempt(Outcome.CONNECT_ERROR, None, str(exc))
        request = b"".join((b"POST ", (pool.prefix + path).encode(), b" HTTP/1.1\r\nHost: ", pool.host_header,
                            b"\r\n", self._fixed_headers, b"Content-Length: ", str(len(body)).encode(),
                            b"\r\n\r\n", body))
        for _ in range(2):
            try:
                conn = pool.get(self.connect_timeout_s)
            except TimeoutError as exc:
                return Attempt(Outcome.TIMEOUT, None, f"connect timed out: {exc}")
            except OSError as exc:
                return Attempt(Outcome.CONNECT_ERROR, None, f"connect failed: {exc}")
            try:
                conn.sock.settimeout(self.first_byte_timeout_s)
                conn.sock.sendall(request)
                resp = self._read_head(pool, conn)
                return Attempt(classify_status(resp.status), resp)
            except TimeoutError as exc:
                conn.close()
                return Attempt(Outcome.TIMEOUT, None, f"no answer in time: {exc}")
            except (UpstreamBroken, OSError) as exc:
                conn.close()
                if conn.reused and not getattr(exc, "answered", False):
                    continue  # the worker closed an idle kept-alive connection: once more on a new one
                return Attempt(Outcome.RESET, None, str(exc) or type(exc).__name__)
        return Attempt(Outcome.RESET, None, "connection closed")

    def _read_head(self, pool: _Pool, conn: _Conn) -> UpstreamResponse:
        rfile = conn.rfile
        line = rfile.readline(_MAX_LINE)
        if not line:
            raise UpstreamBroken("connection closed before an answer")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            err = UpstreamBroken(f"not an HTTP answer: {line[:60]!r}")
            err.answered = True
            raise err
        status = int(parts[1])
        keep_alive = parts[0] == b"HTTP/1.1"
        headers: list[tuple[str, str]] = []
        length = None
        chunked = False
        for _ in range(_MAX_HEADERS):
            line = rfile.readline(_MAX_LINE)
            if line in (b"\r\n", b"\n"):
                break
            if not line.endswith(b"\n"):
                err = UpstreamBroken("answer head cut short")
                err.answered = True
                raise err
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip(), value.strip()
            lower = name.lower()
            if lower == "content-length":
                length = int(value) if value.isdigit() else None
            elif lower == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif lower == "connection":
                keep_alive = "close" not in value.lower() and (keep_alive or "keep-alive" in value.lower())
            headers.append((name, value))
        return UpstreamResponse(pool, conn, status, headers, None if chunked else length, chunked, keep_alive)

    def close(self) -> None:
        for pool in self._pools.values():
            while pool.idle:
                pool.idle.pop().close()


def pass_headers(resp: UpstreamResponse) -> list[tuple[str, str]]:
    return [(k, v) for k, v in resp.headers if k.lower() not in _HOP_BY_HOP]


def discard(resp: UpstreamResponse | None, *, reuse: bool) -> None:
    if resp is not None:
        resp.finish(reuse=reuse)

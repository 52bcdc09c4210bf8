"""Sending one request to one worker, and telling what happened as an
:class:`~gpufleet.router.retry.Outcome`. Nothing here decides to retry.

A small, strict HTTP/1.1 client over pooled keep-alive sockets, written for this one job
(POST a JSON body to a vLLM server, read a JSON answer or an SSE stream) and measured
against the maintained alternatives (``docs/router.md``, "The upstream client"). The
worker is untrusted, so the answer is parsed as RFC 9112 asks of a proxy:

- the status line is ``HTTP/1.x`` and three digits; header names are tokens, values hold
  no control characters, at most ``MAX_HEADERS`` lines and ``MAX_HEAD_BYTES`` bytes;
- one ``Content-Length`` of digits, or ``Transfer-Encoding: chunked`` (never both), chunk
  sizes of hex digits only;
- anything else is :class:`Malformed` (a worker fault, answered 502) and the connection
  is closed, never handed to the next request (a lenient parse would desynchronise it);
- hop-by-hop headers and those named in ``Connection`` are not passed on.

Pools: a connection idle longer than ``max_idle_s`` (below uvicorn's 5 s keep-alive) is
closed instead of reused, and one that the worker closed while idle is noticed by a
zero-timeout ``poll`` before reuse. A request that still finds its pooled connection dead
(closed under it before any byte of an answer) is sent once more on a fresh connection and
is not the worker's fault. :meth:`Upstreams.retire` closes the pools of workers that left.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from gevent import monkey

from .retry import Outcome, classify_status

_poll = monkey.get_original("select", "poll")
_DEAD_IF = 0x001 | 0x008 | 0x010 | 0x2000  # readable (an idle connection has nothing to say), ERR, HUP, RDHUP
_TRUST_IDLE_S = 0.05  # idle for less, a connection is reused without the poll (no server closes that soon)

_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "trailers", "transfer-encoding", "upgrade", "content-length", "server", "date",
                         "x-request-id"))
MAX_HEADERS = 100
MAX_HEAD_BYTES = 65536
_MAX_LINE = 8192
_READ = 65536
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?\r\n")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([\t\x20-\x7e\x80-\xff]*)\r\n")
_FIELDS = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)+")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;[\t\x20-\x7e\x80-\xff]*)?\r\n")
_LENGTH = re.compile(rb"[0-9]{1,15}")


class UpstreamBroken(Exception):
    """The worker closed or broke the connection."""


class Malformed(UpstreamBroken):
    """The worker's bytes are not a valid HTTP/1.1 answer."""


class TooLarge(Exception):
    """A body over the caller's bound."""


class _Conn:
    __slots__ = ("sock", "rfile", "idle_since", "_poller")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=_READ)
        self.idle_since = 0.0
        self._poller = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def looks_alive(self) -> bool:
        """An idle kept-alive connection has nothing to read: readable means the worker
        closed it (or sent bytes nobody asked for). One non-blocking ``poll``."""
        if self._poller is None:
            self._poller = _poll()
            self._poller.register(self.sock.fileno(), _DEAD_IF)
        return not self._poller.poll(0)


class _Pool:
    def __init__(self, host: str, port: int, prefix: str, maxsize: int, max_idle_s: float):
        self.host, self.port, self.prefix, self.maxsize, self.max_idle_s = host, port, prefix, maxsize, max_idle_s
        self.host_header = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        self.idle: list[_Conn] = []
        self.closed = False

    def get(self, connect_timeout: float) -> tuple[_Conn, bool]:
        """A connection, and whether it was reused."""
        if self.idle:
            now = time.monotonic()
            conn = self.idle.pop()  # the most recently used: the others are older still
            idle = now - conn.idle_since
            if idle <= self.max_idle_s and (idle < _TRUST_IDLE_S or conn.looks_alive()):
                return conn, True
            conn.close()
            self.clear()  # older than a dead or too old one: not worth a try
        return self.connect(connect_timeout), False

    def connect(self, connect_timeout: float) -> _Conn:
        sock = socket.create_connection((self.host, self.port), timeout=connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock)

    def put(self, conn: _Conn) -> None:
        if self.closed or len(self.idle) >= self.maxsize:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def clear(self) -> None:
        while self.idle:
            self.idle.pop().close()


class UpstreamResponse:
    """An answer whose head has been read; the body is read by the caller."""

    def __init__(self, pool: _Pool, conn: _Conn, status: int, headers: list[tuple[str, str]],
                 length: int | None, chunked: bool, keep_alive: bool):
        self._pool, self._conn = pool, conn
        self.status = status
        self.headers = headers
        self.length = length
        self.chunked = chunked
        self._keep_alive = keep_alive
        self.complete = length == 0 and not chunked

    def set_timeout(self, seconds: float) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self._conn.sock.settimeout(seconds)

    def read(self, limit: int) -> bytes:
        """The whole body; :class:`TooLarge` past ``limit`` bytes (memory stays bounded)."""
        if self.length is not None and self.length > limit:
            raise TooLarge(f"the answer's Content-Length {self.length} is over the limit of {limit} bytes")
        if self.length is not None and not self.chunked:
            data = self._conn.rfile.read(self.length)
            if len(data) != self.length:
                raise UpstreamBroken(f"body cut short ({len(data)} of {self.length} bytes)")
            self.complete = True
            return data
        parts, size = [], 0
        for data in self.iter_body():
            size += len(data)
            if size > limit:
                raise TooLarge(f"the answer is over the limit of {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def iter_body(self) -> Iterator[bytes]:
        """The body as it arrives: one item per HTTP chunk (an SSE event) or read, never
        buffered beyond one read."""
        rfile = self._conn.rfile
        if not self.chunked:
            remaining = self.length
            while remaining is None or remaining > 0:
                data = rfile.read1(_READ if remaining is None else min(_READ, remaining))
                if not data:
                    if remaining:
                        raise UpstreamBroken("body cut short")
                    self._keep_alive = False  # delimited by the end of the connection
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data
            self.complete = True
            return
        while True:
            line = rfile.readline(_MAX_LINE)
            if not line:
                raise UpstreamBroken("stream cut short")
            match = _CHUNK_SIZE.fullmatch(line)
            if match is None:
                raise Malformed(f"invalid chunk size line {line[:40]!r}")
            size = int(match.group(1), 16)
            if size == 0:
                _read_fields(rfile, "trailer")
                self.complete = True
                return
            while size:
                data = rfile.read(min(size, _READ))
                if not data:
                    raise UpstreamBroken("chunk cut short")
                size -= len(data)
                yield data
            if rfile.read(2) != b"\r\n":
                raise Malformed("chunk data not followed by CRLF")

    def finish(self) -> None:
        """Hand the connection back for the next request if the answer was read to its end
        and may be followed by another; else close it (which also cancels the request on
        the worker). Idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.complete and self._keep_alive:
            self._pool.put(conn)
        else:
            conn.close()


def _read_fields(rfile, what: str) -> list[tuple[bytes, bytes]]:
    """Header (or trailer) lines up to the blank line, strictly: checked in one regex
    match of the whole block, then split in one ``findall``."""
    lines = []
    total = 0
    while True:
        line = rfile.readline(_MAX_LINE)
        if line == b"\r\n":
            break
        if not line:
            raise UpstreamBroken(f"{what} cut short")
        total += len(line)
        if len(lines) >= MAX_HEADERS or total > MAX_HEAD_BYTES:
            raise Malformed(f"more than {MAX_HEADERS} {what} lines or {MAX_HEAD_BYTES} bytes")
        lines.append(line)
    if not lines:
        return []
    block = b"".join(lines)
    if _FIELDS.fullmatch(block) is None:
        bad = next((x for x in lines if _FIELD.fullmatch(x) is None), b"")
        raise Malformed(f"invalid {what} line {bad[:60]!r}")
    return _FIELD.findall(block)


@dataclass
class Attempt:
    outcome: Outcome
    response: UpstreamResponse | None = None
    error: str = ""


class Upstreams:
    def __init__(self, api_key: str | None, connect_timeout_s: float, first_byte_timeout_s: float,
                 read_timeout_s: float, pool_maxsize: int = 256, max_idle_s: float = 2.0):
        self.connect_timeout_s = connect_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s
        self.read_timeout_s = read_timeout_s
        self.pool_maxsize = pool_maxsize
        self.max_idle_s = max_idle_s
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
            pool = _Pool(parts.hostname, parts.port or 80, parts.path.rstrip("/"), self.pool_maxsize,
                         self.max_idle_s)
            self._pools[base_url] = pool
        return pool

    def send(self, base_url: str, path: str, body: bytes, request_id: str, on_socket=None) -> Attempt:
        """POST and read the response head (connect and first-byte timeouts apply).
        ``on_socket(sock)`` is told the socket in use (so that a cancel can shut it); when
        it returns False the request was cancelled: nothing is sent."""
        try:
            pool = self._pool(base_url)
            request = b"".join((b"POST ", (pool.prefix + path).encode(), b" HTTP/1.1\r\nHost: ", pool.host_header,
                                b"\r\n", self._fixed_headers, b"X-Request-Id: ", request_id.encode(),
                                b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n\r\n", body))
        except (ValueError, UnicodeError) as exc:
            return Attempt(Outcome.CONNECT_ERROR, None, str(exc))
        fresh = False
        while True:
            try:
                if fresh:
                    conn, reused = pool.connect(self.connect_timeout_s), False
                else:
                    conn, reused = pool.get(self.connect_timeout_s)
            except TimeoutError as exc:
                return Attempt(Outcome.TIMEOUT, None, f"connect timed out: {exc}")
            except (OSError, UnicodeError, ValueError) as exc:  # refused, unreachable, a host name idna rejects
                return Attempt(Outcome.CONNECT_ERROR, None, f"connect failed: {exc}")
            if on_socket is not None and not on_socket(conn.sock):
                conn.close()
                return Attempt(Outcome.CANCELLED, None, "client gone")
            try:
                conn.sock.settimeout(self.first_byte_timeout_s)
                conn.sock.sendall(request)
                resp = self._read_head(pool, conn)
                return Attempt(classify_status(resp.status), resp)
            except TimeoutError as exc:
                conn.close()
                return Attempt(Outcome.TIMEOUT, None, f"no answer in time: {exc}")
            except Malformed as exc:
                conn.close()
                return Attempt(Outcome.MALFORMED, None, str(exc))
            except (UpstreamBroken, OSError) as exc:
                conn.close()
                if reused and isinstance(exc, _NothingYet | ConnectionError):
                    # the worker closed an idle kept-alive connection under us (before any
                    # byte of an answer): not its fault; once more, on a fresh connection
                    pool.clear()
                    fresh = True
                    continue
                return Attempt(Outcome.RESET, None, str(exc) or type(exc).__name__)

    def _read_head(self, pool: _Pool, conn: _Conn) -> UpstreamResponse:
        rfile = conn.rfile
        for _ in range(4):  # interim 1xx answers are skipped
            line = rfile.readline(_MAX_LINE)
            if not line:
                raise _NothingYet("connection closed before an answer")
            match = _STATUS.fullmatch(line)
            if match is None:
                raise Malformed(f"invalid status line {line[:60]!r}")
            status = int(match.group(2))
            fields = _read_fields(rfile, "header")
            if status >= 200:
                break
            if status == 101:
                raise Malformed("101 Switching Protocols to a POST")
        else:
            raise Malformed("too many interim answers")
        keep_alive = match.group(1) == b"1"
        length = None
        chunked = False
        hidden = set()
        headers = []
        for raw_name, raw_value in fields:
            raw_value = raw_value.strip(b" \t")
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            lower = name.lower()
            if lower == "content-length":
                if length is not None or not _LENGTH.fullmatch(raw_value):
                    raise Malformed(f"invalid or repeated Content-Length {raw_value[:40]!r}")
                length = int(raw_value)
            elif lower == "transfer-encoding":
                if chunked or value.lower() != "chunked":
                    raise Malformed(f"unsupported Transfer-Encoding {raw_value[:40]!r}")
                chunked = True
            elif lower == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                if "close" in tokens:
                    keep_alive = False
                hidden |= tokens
            headers.append((name, value))
        if chunked and length is not None:
            raise Malformed("both Content-Length and Transfer-Encoding")
        if status in (204, 304):
            length, chunked = 0, False
        elif length is None and not chunked:
            keep_alive = False  # the body ends with the connection
        headers = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP and k.lower() not in hidden]
        return UpstreamResponse(pool, conn, status, headers, length, chunked, keep_alive)

    def retire(self, keep_urls) -> None:
        """Close the pools of every worker URL not in ``keep_urls`` (workers that left)."""
        for url in [u for u in self._pools if u not in keep_urls]:
            pool = self._pools.pop(url)
            pool.closed = True  # connections in use are closed when their answer ends
            pool.clear()


class _NothingYet(UpstreamBroken):
    """The connection ended before the first byte of an answer."""

"""Sending one request to one worker over pooled urllib3 connections, and telling what
happened as a :class:`~gpufleet.router.retry.Outcome`. Nothing here decides to retry."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from .retry import Outcome, classify_status

_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailers", "transfer-encoding", "upgrade", "content-length", "content-encoding",
                         "server", "date"))


class OneWriteConnection(urllib3.connection.HTTPConnection):
    """urllib3 writes the request head and a bytes body in two ``send`` calls; here they go
    out in one, which saves a system call and a packet per request."""

    _body: bytes | None = None
    _skip: bytes | None = None

    def request(self, method, url, body=None, headers=None, **kwargs):
        self._body = body if isinstance(body, bytes) and body else None
        try:
            return super().request(method, url, body=body, headers=headers, **kwargs)
        finally:
            self._body = self._skip = None

    def _send_output(self, message_body=None, encode_chunked=False):
        # http.client's buffer of header lines (the same from Python 3.10 to 3.13)
        body, self._body = self._body, None
        buffer = getattr(self, "_buffer", None)
        if message_body is not None or body is None or not isinstance(buffer, list):
            return super()._send_output(message_body, encode_chunked=encode_chunked)
        buffer.extend((b"", b""))
        head = b"\r\n".join(buffer)
        del buffer[:]
        self._skip = body
        self.send(head + body)

    def send(self, data):
        if self._skip is not None and data is self._skip:
            self._skip = None  # already sent with the head
            return
        return super().send(data)


@dataclass
class Attempt:
    outcome: Outcome
    response: urllib3.BaseHTTPResponse | None = None
    error: str = ""


class Upstreams:
    def __init__(self, api_key: str | None, connect_timeout_s: float, first_byte_timeout_s: float,
                 read_timeout_s: float, pool_maxsize: int = 256):
        self.timeout = urllib3.Timeout(connect=connect_timeout_s, read=first_byte_timeout_s)
        self.read_timeout_s = read_timeout_s
        self.pool_maxsize = pool_maxsize
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._pools: dict[str, tuple[urllib3.HTTPConnectionPool, str]] = {}

    def _pool(self, base_url: str) -> tuple[urllib3.HTTPConnectionPool, str]:
        entry = self._pools.get(base_url)
        if entry is None:
            parts = urlsplit(base_url)
            pool = urllib3.connection_from_url(base_url, maxsize=self.pool_maxsize, block=False,
                                               retries=False, timeout=self.timeout)
            if parts.scheme == "http":
                pool.ConnectionCls = OneWriteConnection
            entry = self._pools[base_url] = (pool, parts.path.rstrip("/"))
        return entry

    def send(self, base_url: str, path: str, body: bytes, extra_headers: dict | None = None) -> Attempt:
        """POST and wait for the response headers (connect and first-byte timeouts apply)."""
        pool, prefix = self._pool(base_url)
        headers = self.headers if not extra_headers else {**self.headers, **extra_headers}
        try:
            resp = pool.urlopen("POST", prefix + path, body=body, headers=headers, retries=False,
                                redirect=False, preload_content=False, assert_same_host=False,
                                timeout=self.timeout)
        except (ConnectTimeoutError, NewConnectionError) as exc:
            is_timeout = isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError)
            return Attempt(Outcome.TIMEOUT if is_timeout else Outcome.CONNECT_ERROR, None, _short(exc))
        except ReadTimeoutError as exc:
            return Attempt(Outcome.TIMEOUT, None, _short(exc))
        except (ProtocolError, OSError, urllib3.exceptions.HTTPError) as exc:
            return Attempt(Outcome.RESET, None, _short(exc))
        return Attempt(classify_status(resp.status), resp)

    def extend_read_timeout(self, resp) -> None:
        """After the first byte: the stream may pause up to ``read_timeout_s`` between chunks."""
        with contextlib.suppress(AttributeError, OSError):
            sock = resp.connection.sock
            if sock is not None:
                sock.settimeout(self.read_timeout_s)


def iter_body(resp):
    """The upstream body as it arrives: one item per HTTP chunk (SSE events), never buffered."""
    if resp.chunked and resp.supports_chunked_reads():
        for chunk in resp.read_chunked(decode_content=False):
            if chunk:
                yield chunk
        return
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            return
        yield chunk


def pass_headers(resp) -> list[tuple[str, str]]:
    return [(k, v) for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP]


def discard(resp, *, reuse: bool) -> None:
    """Finish with a response: return the connection to the pool after reading the rest,
    or close it (which cancels the request on the worker)."""
    if resp is None:
        return
    try:
        if reuse:
            resp.drain_conn()
        else:
            resp.close()
    except Exception:  # noqa: BLE001 - a broken connection is simply not reused
        with contextlib.suppress(Exception):
            resp.close()
    with contextlib.suppress(Exception):
        resp.release_conn()


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "…"

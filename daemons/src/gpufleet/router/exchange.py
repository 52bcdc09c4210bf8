"""One proxied request's resources and accounting, released in one place.

An :class:`Exchange` is made when a request arrives and closed exactly once when its
answer ends, whatever the path: answer sent, error, exception in a step or in gunicorn's
header handling, client gone, greenlet killed (the WSGI entry closes it in a ``finally``
or from the body's ``close``). Closing releases the current lease, hands back or closes
the upstream connection, lowers the in-flight gauge and counts the request: nothing
between acquire and the end of the answer can forget them.

:class:`ClientWatch` notices a client that went away while its request still waits on a
worker (a non-streamed answer, or a stream before its first byte): a greenlet polls the
client sockets of waiting requests twice a second for a hang-up, and shuts that request's
upstream socket, so the worker (vLLM) sees the disconnect and aborts the generation.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

from gevent import monkey

log = logging.getLogger(__name__)

_poll = monkey.get_original("select", "poll")
_HUNG_UP = 0x008 | 0x010 | 0x2000  # POLLERR, POLLHUP, POLLRDHUP (Linux): the peer closed or reset


class Ledger:
    """The per-process pieces an exchange reports to."""

    def __init__(self, metrics, leases, breakers, watch: ClientWatch | None = None):
        self.metrics, self.leases, self.breakers, self.watch = metrics, leases, breakers, watch


class Exchange:
    __slots__ = ("ledger", "request_id", "started", "model", "status", "worker_id", "lease", "response",
                 "cancelled", "closed", "_sock", "_client_fd", "key_name", "attempts", "ttft", "usage")

    def __init__(self, ledger: Ledger, request_id: str):
        self.ledger = ledger
        self.request_id = request_id
        self.started = time.perf_counter()
        self.model = ""        # the metrics' model label, once known
        self.status = 0
        self.worker_id = ""    # the worker of the answer (empty when none was involved)
        self.lease = None      # the lease of the current attempt
        self.response = None   # the current attempt's upstream answer
        self.cancelled = False
        self.closed = False
        self._sock = None      # the upstream socket in use (shut by a cancel)
        self._client_fd = None
        # figures for metrics.account: the API key's name, workers tried, client-seen TTFT, (prompt, completion)
        self.key_name, self.attempts, self.ttft, self.usage = "", 0, None, None
        ledger.metrics.inflight.inc()

    # -- attempts ----------------------------------------------------------------------------

    def hold(self, lease) -> None:
        self.end_attempt()
        self.lease = lease
        self.worker_id = lease.worker_id
        self.attempts += 1

    def attach(self, sock) -> bool:
        """The upstream socket now in use; False when the request was cancelled already."""
        self._sock = sock
        return not self.cancelled

    def end_attempt(self) -> None:
        """Release the current attempt's lease and connection (a failed attempt, or the end)."""
        response, self.response = self.response, None
        self._sock = None
        lease, self.lease = self.lease, None
        try:
            if response is not None:
                response.finish()
        finally:
            if lease is not None:
                self.ledger.leases.release(lease)

    # -- the client ------------------------------------------------------------------------

    def watch_client(self, environ) -> None:
        sock = environ.get("gunicorn.socket")
        watch = self.ledger.watch
        if sock is None or watch is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._client_fd = sock.fileno()
            watch.add(self._client_fd, self)

    def unwatch_client(self) -> None:
        fd, self._client_fd = self._client_fd, None
        if fd is not None:
            self.ledger.watch.discard(fd)

    def cancel(self) -> None:
        """The client went away before its answer: stop waiting on the worker."""
        self.cancelled = True
        if self._sock is not None:
            _shut(self._sock)

    def client_left(self) -> None:
        """The client went away during a stream (the next write failed)."""
        self.ledger.metrics.client_disconnects.inc()

    def stream_broke(self) -> None:
        self.ledger.breakers.failure(self.worker_id)
        self.ledger.metrics.stream_errors.inc()

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        """Exactly once, whatever happened before."""
        if self.closed:
            return
        self.closed = True
        metrics = self.ledger.metrics
        try:
            self.unwatch_client()
            self.end_attempt()
        finally:
            duration = time.perf_counter() - self.started
            metrics.inflight.dec()
            metrics.count_request(self.model, self.status or 500, self.worker_id if self.status else "")
            if self.model:
                metrics.observe_latency(self.model, duration)
            metrics.account(self, duration)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request %s: %s %d from %s in %.3f s", self.request_id, self.model or "-",
                          self.status or 500, self.worker_id or "-", duration)


def _shut(sock) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class ClientWatch:
    """Hang-ups of the clients whose requests wait on a worker, found within ``interval_s``."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self._watched: dict[int, Exchange] = {}
        self._thread: threading.Thread | None = None

    def add(self, fd: int, exchange: Exchange) -> None:
        self._watched[fd] = exchange
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="client-watch", daemon=True)
            self._thread.start()

    def discard(self, fd: int) -> None:
        self._watched.pop(fd, None)

    def sweep(self) -> int:
        """Cancel the exchanges whose client hung up; how many."""
        if not self._watched:
            return 0
        poller = _poll()
        for fd in list(self._watched):
            with contextlib.suppress(OSError, ValueError):
                poller.register(fd, _HUNG_UP)
        gone = 0
        for fd, _events in poller.poll(0):
            exchange = self._watched.pop(fd, None)
            if exchange is not None:
                log.info("request %s: the client went away before its answer; cancelling it upstream",
                         exchange.request_id)
                exchange.cancel()
                gone += 1
        return gone

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the watch must outlive any one bad socket
                log.exception("client watch sweep failed")

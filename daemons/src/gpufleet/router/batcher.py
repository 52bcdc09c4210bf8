"""Redis commands of the request path, sent many per round-trip.

Each process has one sender (a greenlet under gunicorn's gevent worker) with its own
connection. A request queues its command and waits; the sender takes everything queued,
sends it as one pipeline, and hands each reply back. With one request in flight this
costs a greenlet switch; under load, the commands of every request that arrived during
the previous round-trip share the next one (one write, one read, one wake-up of Redis),
which is what keeps the shared leases cheap at thousands of requests per second.
Fire-and-forget commands (lease releases) ride along in the same pipelines.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from redis.exceptions import NoScriptError, ResponseError

from .redisconn import REDIS_ERRORS

log = logging.getLogger(__name__)


class _Waiter:
    __slots__ = ("event", "result", "error")

    def __init__(self):
        self.event = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class RedisBatcher:
    def __init__(self, client, scripts: dict[str, str], reply_timeout_s: float = 2.0):
        self.client = client
        self.scripts = scripts  # sha → source, loaded again after a NOSCRIPT (a restarted Redis)
        self.reply_timeout_s = reply_timeout_s
        self._queue: deque = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0   # read by the tests: several commands share a round-trip
        self.commands = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="redis-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def call(self, *args, timeout: float | None = None):
        """Send one command in the next pipeline and return its reply (or raise);
        :class:`TimeoutError` when no reply came within ``timeout`` (the request path's
        latency budget) or ``reply_timeout_s``."""
        if self._thread is None:
            return self._direct(args)
        waiter = _Waiter()
        self._queue.append((args, waiter))
        self._wake.set()
        limit = self.reply_timeout_s if timeout is None else timeout
        if not waiter.event.wait(limit):
            raise TimeoutError(f"no reply from redis within {limit * 1000:.0f} ms")
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    def send(self, *args) -> None:
        """Queue a command whose reply nobody waits for."""
        if self._thread is None:
            try:
                self._direct(args)
            except REDIS_ERRORS:
                pass
            return
        self._queue.append((args, None))
        self._wake.set()

    def _direct(self, args):
        try:
            return self.client.execute_command(*args)
        except NoScriptError:
            self._load_scripts()
            return self.client.execute_command(*args)

    def _load_scripts(self) -> None:
        for source in self.scripts.values():
            self.client.script_load(source)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while self._queue:
                batch = []
                while self._queue and len(batch) < 1000:
                    batch.append(self._queue.popleft())
                self._execute(batch)

    def _execute(self, batch) -> None:
        self.batches += 1
        self.commands += len(batch)
        try:
            replies = self._pipeline(batch)
            if any(isinstance(r, NoScriptError) for r in replies):
                self._load_scripts()
                replies = self._pipeline(batch)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the error, the sender lives on
            for _, waiter in batch:
                if waiter is not None:
                    waiter.error = exc
                    waiter.event.set()
            return
        for (_, waiter), reply in zip(batch, replies, strict=True):
            if waiter is not None:
                if isinstance(reply, ResponseError):
                    waiter.error = reply
                else:
                    waiter.result = reply
                waiter.event.set()

    def _pipeline(self, batch) -> list:
        pipe = self.client.pipeline(transaction=False)
        for args, _ in batch:
            pipe.execute_command(*args)
        return pipe.execute(raise_on_error=False)

"""The router's Redis connection and whether it is usable right now.

While Redis is marked down, the request path does not touch it at all (no connect timeout
per request); the background refresher probes it and marks it up again. Redis that answers
but slower than the request path's latency budget (``budget_s``) counts as down: the
request path uses its local fallback, ``/readyz`` and ``/metrics`` say degraded, and the
refresher marks it up once a ping answers within the budget again.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from gpufleet.common.config import redact_url

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class RedisLink:
    def __init__(self, url: str, timeout_s: float, max_connections: int = 512, budget_s: float = 0.25):
        self.url = url
        self.timeout_s = timeout_s
        self.budget_s = budget_s
        self.client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            health_check_interval=0, max_connections=max_connections, retry_on_timeout=False)
        self.up = False
        self.ever_up = False
        self.reason = "redis not reached yet"  # why it is not up
        self._lock = threading.Lock()
        self.on_change = None  # called with the new value of ``up``

    @property
    def slow(self) -> bool:
        """Down only because it answered slower than the budget (it may still be asked, with patience)."""
        return not self.up and self.reason == "redis slow"

    def mark_down(self, exc: BaseException) -> None:
        with self._lock:
            was, self.up = self.up, False
            if self.ever_up:
                self.reason = "redis slow" if isinstance(exc, TimeoutError) else "redis unreachable"
        if was:
            log.warning("%s at %s (%s): serving with the last known workers and keys", self.reason,
                        redact_url(self.url), exc)
            if self.on_change:
                self.on_change(False)

    def mark_up(self) -> None:
        with self._lock:
            was, self.up = self.up, True
            self.ever_up = True
        if not was:
            log.info("redis at %s is reachable", redact_url(self.url))
            if self.on_change:
                self.on_change(True)

    def probe(self) -> bool:
        """Whether Redis answers; marked up only when it answers within the budget."""
        started = time.monotonic()
        try:
            self.client.ping()
        except REDIS_ERRORS as exc:
            self.mark_down(exc)
            return False
        elapsed = time.monotonic() - started
        if elapsed > self.budget_s:
            self.mark_down(TimeoutError(f"a ping took {elapsed * 1000:.0f} ms"))
        else:
            self.mark_up()
        return True

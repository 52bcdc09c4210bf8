"""Retry policy: which upstream outcomes are retried, how many times, and a budget.

The budget is a token bucket filled by a fraction of the requests (``ratio``) plus a small
floor per second (``min_per_s``), and drained by one token per retry. With the default
ratio of 0.2, retries add at most about 20 % to the load the fleet sees, however many
workers fail: a fleet-wide outage is not multiplied by the retry count.
"""

from __future__ import annotations

import threading
import time
from enum import Enum


class Outcome(Enum):
    OK = "ok"                    # 2xx/3xx: done
    CLIENT_ERROR = "client_error"  # 4xx: the request's fault; passed through, never retried
    SERVER_ERROR = "server_error"  # 5xx
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"          # connect, first-byte or read timeout
    RESET = "reset"              # connection dropped before a complete answer
    MALFORMED = "malformed"      # not valid HTTP/1.1 (RFC 9112): bad status line, framing, headers
    TOO_LARGE = "too_large"      # a non-streamed answer over the size bound
    CANCELLED = "cancelled"      # the client went away: nobody's fault, nothing to retry

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE

    @property
    def counts_against_worker(self) -> bool:
        return self in _RETRYABLE or self is Outcome.TOO_LARGE


# a larger answer would be as large on another worker; a gone client wants nothing more
_RETRYABLE = frozenset((Outcome.SERVER_ERROR, Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.RESET,
                        Outcome.MALFORMED))


def classify_status(status: int) -> Outcome:
    if status >= 500:
        return Outcome.SERVER_ERROR
    if status >= 400:
        return Outcome.CLIENT_ERROR
    return Outcome.OK


class RetryBudget:
    """Token bucket: ``deposit()`` per request, ``try_spend()`` per retry."""

    def __init__(self, ratio: float = 0.2, min_per_s: float = 5.0, capacity: float | None = None,
                 clock=time.monotonic):
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.capacity = capacity if capacity is not None else max(10.0, min_per_s * 10)
        self.clock = clock
        self._tokens = self.capacity
        self._last = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.min_per_s)
        self._last = now

    def deposit(self) -> None:
        with self._lock:
            self._refill()
            self._tokens = min(self.capacity, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        with self._lock:
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    @property
    def tokens(self) -> float:
        with self._lock:
            self._refill()
            return self._tokens


class RetryPolicy:
    """At most ``retries`` retries of a request, each on a worker not tried yet, each paid
    from the budget."""

    def __init__(self, retries: int, budget: RetryBudget):
        self.retries = retries
        self.budget = budget

    def should_retry(self, outcome: Outcome, attempts: int, streamed_to_client: bool) -> bool:
        if not outcome.retryable or streamed_to_client or attempts > self.retries:
            return False
        return self.budget.try_spend()

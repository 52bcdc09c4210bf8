"""API keys: ``Authorization: Bearer <key>`` checked against ``apikey:{sha256}`` in Redis,
through a short in-process cache.

Positive entries live ``ttl_s`` (a revoke is also pushed by the ``keys`` event, which
clears the cache at once); negative entries live ``negative_ttl_s`` and their number is
bounded, so a flood of invalid keys costs one Redis read per distinct key per TTL, not one
per request. While Redis is down, cached keys stay valid (stale), and a key never seen
gets 503 (it cannot be checked) rather than a false 401.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from .redisconn import REDIS_ERRORS, RedisLink


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    models: frozenset[str]  # empty: every model
    rpm: int = 0

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


class KeyUnavailable(Exception):
    """The key is not cached and Redis cannot be asked."""


class KeyCache:
    def __init__(self, link: RedisLink, keys, ttl_s: float = 5.0, negative_ttl_s: float = 2.0,
                 max_negative: int = 10000, clock=time.monotonic, on_lookup=None, batcher=None):
        self.link = link
        self.keys = keys
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_negative = max_negative
        self.clock = clock
        self._positive: dict[str, tuple[float, ApiKey]] = {}
        self._negative: dict[str, float] = {}
        self.on_lookup = on_lookup
        self.batcher = batcher  # when given, lookups share its round-trips and the request path's budget

    def clear(self) -> None:
        self._positive = {}
        self._negative = {}

    def check(self, presented: str) -> ApiKey | None:
        """The key's record, None for an unknown key; KeyUnavailable when it cannot tell."""
        digest = hashlib.sha256(presented.encode()).hexdigest()
        now = self.clock()
        hit = self._positive.get(digest)
        if hit is not None and (hit[0] > now or not self.link.up):
            return hit[1]
        miss = self._negative.get(digest)
        if miss is not None and (miss > now or not self.link.up):
            return None
        if not self.link.up and not self.link.slow:
            raise KeyUnavailable("redis is unreachable and this key is not cached")
        try:
            if self.on_lookup:
                self.on_lookup()
            if self.batcher is not None:
                # a key never seen has no fallback: worth waiting past the budget for a slow Redis
                fields = self.batcher.call("HGETALL", self.keys.apikey(digest),
                                           timeout=self.link.budget_s if hit is not None else None)
            else:
                fields = self.link.client.hgetall(self.keys.apikey(digest))
        except (*REDIS_ERRORS, TimeoutError) as exc:
            self.link.mark_down(exc)
            if hit is not None:
                return hit[1]
            raise KeyUnavailable(str(exc)) from None
        if not fields:
            self._positive.pop(digest, None)
            if len(self._negative) >= self.max_negative:
                self._negative = {d: t for d, t in self._negative.items() if t > now}
                if len(self._negative) >= self.max_negative:
                    self._negative.clear()
            self._negative[digest] = now + self.negative_ttl_s
            return None
        models = frozenset(m.strip() for m in (fields.get("models") or "").split(",") if m.strip())
        try:
            rpm = int(float(fields.get("rpm") or 0))
        except ValueError:
            rpm = 0
        record = ApiKey(fields.get("key_id", ""), fields.get("name", ""), models, rpm)
        self._positive[digest] = (now + self.ttl_s, record)
        self._negative.pop(digest, None)
        return record

"""Requests per minute per API key (the key's ``rpm``; 0 = unlimited), shared by every
router process and replica.

A fixed window per key and minute: ``ratelimit:{key_id}:{unix minute}`` counted with one
script call (INCR, and EXPIRE on the first hit), sent through the process's Redis batcher.
Keys without a limit cost nothing. While Redis is unreachable the limit is not enforced
(fail open: an outage of the shared store must not turn into refusing paying traffic).
"""

from __future__ import annotations

import hashlib
import time

from .batcher import RedisBatcher
from .redisconn import REDIS_ERRORS, RedisLink

COUNT_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], 120) end
return n
"""


class RateLimiter:
    def __init__(self, link: RedisLink, batcher: RedisBatcher, prefix: str, clock=time.time):
        self.link = link
        self.batcher = batcher
        self.prefix = prefix
        self.clock = clock
        self._sha = hashlib.sha1(COUNT_LUA.encode()).hexdigest()  # how Redis names scripts
        batcher.scripts[self._sha] = COUNT_LUA

    def check(self, key_id: str, rpm: int) -> float | None:
        """None when the request may go; else the seconds until the next window."""
        if rpm <= 0 or not self.link.up:
            return None
        now = self.clock()
        minute = int(now // 60)
        try:
            count = int(self.batcher.call("EVALSHA", self._sha, 1, f"{self.prefix}ratelimit:{key_id}:{minute}"))
        except (*REDIS_ERRORS, TimeoutError) as exc:
            self.link.mark_down(exc)
            return None
        if count <= rpm:
            return None
        return max(1.0, (minute + 1) * 60 - now)

"""Shared, leak-proof leases: the outstanding requests of each worker, over every router
process and replica.

``inflight:{worker_id}`` is a sorted set of lease ids scored by their expiry (Redis
server time, in ms). A request takes a lease on the worker it is sent to and gives it
back when it ends; while it lives, the process that holds it renews all its leases in
one pipelined call every ``ttl/3``. Counting trims the expired members first, so a router
killed with ``kill -9`` leaves no phantom load for longer than the TTL.

Acquisition is one ``EVALSHA``: the script trims and counts every candidate, takes the
first one with the fewest leases in the order the policy gave (``policies.pick_least``),
and adds the lease to it: reading the loads and taking the lease is one atomic step, so
two routers cannot both see a worker as the least loaded and pile onto it. Acquisitions and
releases go through the process's :class:`~gpufleet.router.batcher.RedisBatcher`: under
load, those of many requests share one pipelined round-trip.

While Redis is down the leases are process-local counts (:class:`LocalCounts`), and the
choice is made in-process with the same policy.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from gpufleet.common.rediskeys import RedisKeys

from .batcher import RedisBatcher
from .redisconn import REDIS_ERRORS, RedisLink

log = logging.getLogger(__name__)

# Shared by the scripts that count leases: drop the expired leases of one worker (a router
# killed with kill -9 renews nothing) and the tokens they carried (cache-aware leases say
# how much work they are, in ``inflight_tokens:{worker}``: lease id → tokens, and ``total``).
# At most 1000 per call, so one call stays short; the next takes the rest. Returns the count.
TRIM_LUA = """
local function trim(key, tkey, now)
  local dead = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, 1000)
  if #dead > 0 then
    redis.call('ZREM', key, unpack(dead))
    local gone = 0
    for _, v in ipairs(redis.call('HMGET', tkey, unpack(dead))) do gone = gone + (tonumber(v) or 0) end
    redis.call('HDEL', tkey, unpack(dead))
    if gone > 0 then redis.call('HINCRBY', tkey, 'total', -gone) end
  end
  local n = redis.call('ZCARD', key)
  if n == 0 then redis.call('DEL', tkey) end
  return n
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: (inflight, inflight_tokens) of each candidate, in preference order. ARGV: lease id, ttl ms.
# Returns {chosen index (1-based), count of each candidate before the acquisition...}.
ACQUIRE_LUA = TRIM_LUA + """
local ttl = tonumber(ARGV[2])
local counts = {0}
local best, bestn = 1, nil
for i = 1, #KEYS / 2 do
  local n = trim(KEYS[2 * i - 1], KEYS[2 * i], now)
  counts[i + 1] = n
  if bestn == nil or n < bestn then best, bestn = i, n end
end
redis.call('ZADD', KEYS[2 * best - 1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[2 * best - 1], ttl * 3)
counts[1] = best
return counts
"""

# KEYS: (inflight, inflight_tokens) per lease; ARGV: ttl ms, then one lease id per pair.
# Extends live leases only.
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS / 2 do
  if redis.call('ZADD', KEYS[2 * i - 1], 'XX', 'CH', now + ttl, ARGV[i + 1]) == 1 then
    redis.call('PEXPIRE', KEYS[2 * i - 1], ttl * 3)
    redis.call('PEXPIRE', KEYS[2 * i], ttl * 3)
  end
end
return #KEYS / 2
"""

# KEYS: inflight, inflight_tokens of one worker; ARGV: lease id. A lease that carries tokens.
RELEASE_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local tokens = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
  if tokens then
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('HINCRBY', KEYS[2], 'total', -tokens)
  end
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
end
return 1
"""

# KEYS: inflight, inflight_tokens of one worker; ARGV: lease id, its tokens from now on (a
# cache-aware lease whose prompt is prefilled: only its decoding is left).
SETTLE_LUA = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
  if old then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
    redis.call('HINCRBY', KEYS[2], 'total', tonumber(ARGV[2]) - old)
  end
end
return 1
"""

# KEYS: (inflight, inflight_tokens) pairs. Returns the live count of each (trimming expired leases).
COUNT_LUA = TRIM_LUA + """
local out = {}
for i = 1, #KEYS / 2 do out[i] = trim(KEYS[2 * i - 1], KEYS[2 * i], now) end
return out
"""


@dataclass
class Lease:
    worker_id: str
    lease_id: str
    shared: bool  # held in Redis (True) or in the process-local counts
    tokens: int | None = None  # the work it stands for, in tokens (cache-aware leases only)
    decode_tokens: int = 0     # what is left of it once the prompt is prefilled
    released: bool = False


class LocalCounts:
    def __init__(self):
        self.counts: dict[str, int] = {}
        self.tokens: dict[str, int] = {}

    def add(self, worker_id: str, delta: int, tokens: int = 0) -> None:
        n = self.counts.get(worker_id, 0) + delta
        if n > 0:
            self.counts[worker_id] = n
            if tokens:
                self.tokens[worker_id] = self.tokens.get(worker_id, 0) + delta * tokens
        else:
            self.counts.pop(worker_id, None)
            self.tokens.pop(worker_id, None)


class LeaseManager:
    def __init__(self, link: RedisLink, keys: RedisKeys, router_id: str, ttl_s: float = 10.0):
        self.link = link
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)
        self.renew_interval_s = max(0.2, ttl_s / 3)
        self.local = LocalCounts()      # fallback leases while Redis is down
        self._live: dict[str, Lease] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{router_id}:{os.getpid()}:"
        self._acquire = link.client.register_script(ACQUIRE_LUA)
        self._renew = link.client.register_script(RENEW_LUA)
        self._count = link.client.register_script(COUNT_LUA)
        self._release = link.client.register_script(RELEASE_LUA)
        self._settle = link.client.register_script(SETTLE_LUA)
        self.batcher = RedisBatcher(_fresh_client(link.client),
                                    {self._acquire.sha: ACQUIRE_LUA, self._release.sha: RELEASE_LUA,
                                     self._settle.sha: SETTLE_LUA},
                                    reply_timeout_s=max(1.0, 4 * link.timeout_s))
        self._stop = threading.Event()

    def acquire(self, ordered: Sequence[str], local_choice) -> Lease:
        """A lease on the least loaded of ``ordered`` (in Redis), or, while Redis is down or
        slower than its budget, on ``local_choice(local_counts)``."""
        lease_id = self.new_id()
        if self.link.up:
            keys = self.key_pairs(ordered)
            try:
                result = self.batcher.call("EVALSHA", self._acquire.sha, len(keys), *keys, lease_id, self.ttl_ms,
                                           timeout=self.link.budget_s)
                return self.track(Lease(ordered[int(result[0]) - 1], lease_id, True))
            except (*REDIS_ERRORS, TimeoutError) as exc:
                self.abandon(ordered, lease_id, exc)
        worker_id = local_choice(self.local.counts)
        self.local.add(worker_id, 1)
        return Lease(worker_id, lease_id, False)

    # -- what the cache-aware acquisition (affinity.py) shares with this one ------------------

    def new_id(self) -> str:
        return self._prefix + str(next(self._ids))

    def key_pairs(self, worker_ids: Sequence[str]) -> list[str]:
        keys = []
        for w in worker_ids:
            keys += (self.keys.inflight(w), self.keys.inflight_tokens(w))
        return keys

    def track(self, lease: Lease) -> Lease:
        self._live[lease.lease_id] = lease
        return lease

    def abandon(self, ordered: Sequence[str], lease_id: str, exc: BaseException) -> None:
        """An acquisition that failed or outlived the budget: the script may still run after
        we stopped waiting, so take back what it would add; Redis counts as down."""
        for w in ordered:
            self.batcher.send("EVALSHA", self._release.sha, 2, self.keys.inflight(w), self.keys.inflight_tokens(w),
                              lease_id)
        self.link.mark_down(exc)

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        if not lease.shared:
            self.local.add(lease.worker_id, -1, lease.tokens or 0)
            return
        self._live.pop(lease.lease_id, None)
        if self.link.up:
            if lease.tokens is not None:
                self.batcher.send("EVALSHA", self._release.sha, 2, self.keys.inflight(lease.worker_id),
                                  self.keys.inflight_tokens(lease.worker_id), lease.lease_id)
            else:
                self.batcher.send("ZREM", self.keys.inflight(lease.worker_id), lease.lease_id)
        # else: it expires on its own within the TTL

    def prefilled(self, lease: Lease) -> None:
        """The worker has prefilled the lease's prompt (its first token came): from now on the
        lease stands for its decoding only (fire and forget, batched)."""
        if lease.released or lease.tokens is None or lease.tokens <= lease.decode_tokens:
            return
        if not lease.shared:
            counts = self.local.tokens
            if lease.worker_id in counts:
                counts[lease.worker_id] -= lease.tokens - lease.decode_tokens
        elif self.link.up:
            self.batcher.send("EVALSHA", self._settle.sha, 2, self.keys.inflight(lease.worker_id),
                              self.keys.inflight_tokens(lease.worker_id), lease.lease_id, lease.decode_tokens)
        lease.tokens = lease.decode_tokens

    def counts(self, worker_ids: Sequence[str]) -> dict[str, int]:
        """Live shared counts (for /metrics and tests); local counts while Redis is down."""
        if self.link.up and worker_ids:
            try:
                values = self._count(keys=self.key_pairs(worker_ids))
                return {w: int(n) + self.local.counts.get(w, 0) for w, n in zip(worker_ids, values, strict=True)}
            except REDIS_ERRORS as exc:
                self.link.mark_down(exc)
        return {w: self.local.counts.get(w, 0) for w in worker_ids}

    # -- background: the batched sender and the renewals ------------------------------------

    def start(self) -> None:
        self.batcher.start()
        threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.batcher.stop()

    def renew(self) -> None:
        live = list(self._live.values())
        if not live or not self.link.up:
            return
        try:
            for start in range(0, len(live), 500):
                batch = live[start:start + 500]
                self._renew(keys=self.key_pairs([le.worker_id for le in batch]),
                            args=[self.ttl_ms] + [le.lease_id for le in batch])
        except REDIS_ERRORS as exc:
            self.link.mark_down(exc)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_interval_s):
            self.renew()


def _fresh_client(client):
    """A client with its own connection pool (the sender holds one connection for itself)."""
    return redis.Redis(connection_pool=redis.ConnectionPool(**client.connection_pool.connection_kwargs))

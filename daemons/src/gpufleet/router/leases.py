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

# KEYS: the candidates' inflight keys, in preference order. ARGV: lease id, ttl ms.
# Returns {chosen index (1-based), count of each candidate before the acquisition...}.
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local counts = {0}
local best, bestn = 1, nil
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local n = redis.call('ZCARD', key)
  counts[i + 1] = n
  if bestn == nil or n < bestn then best, bestn = i, n end
end
redis.call('ZADD', KEYS[best], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[best], ttl * 3)
counts[1] = best
return counts
"""

# KEYS: inflight keys; ARGV: ttl ms, then one lease id per key. Extends live leases only.
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', now + ttl, ARGV[i + 1]) == 1 then
    redis.call('PEXPIRE', key, ttl * 3)
  end
end
return #KEYS
"""

# KEYS: inflight keys. Returns the live count of each (trimming expired leases).
COUNT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  out[i] = redis.call('ZCARD', key)
end
return out
"""


@dataclass
class Lease:
    worker_id: str
    lease_id: str
    shared: bool  # held in Redis (True) or in the process-local counts
    released: bool = False


class LocalCounts:
    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, worker_id: str, delta: int) -> None:
        n = self.counts.get(worker_id, 0) + delta
        if n > 0:
            self.counts[worker_id] = n
        else:
            self.counts.pop(worker_id, None)


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
        self.batcher = RedisBatcher(_fresh_client(link.client), {self._acquire.sha: ACQUIRE_LUA},
                                    reply_timeout_s=max(1.0, 4 * link.timeout_s))
        self._stop = threading.Event()

    def acquire(self, ordered: Sequence[str], local_choice) -> Lease:
        """A lease on the least loaded of ``ordered`` (in Redis), or, while Redis is down or
        slower than its budget, on ``local_choice(local_counts)``."""
        lease_id = self._prefix + str(next(self._ids))
        if self.link.up:
            keys = [self.keys.inflight(w) for w in ordered]
            try:
                result = self.batcher.call("EVALSHA", self._acquire.sha, len(ordered), *keys, lease_id, self.ttl_ms,
                                           timeout=self.link.budget_s)
                lease = Lease(ordered[int(result[0]) - 1], lease_id, True)
                self._live[lease_id] = lease
                return lease
            except (*REDIS_ERRORS, TimeoutError) as exc:
                # the script may still run after we stopped waiting: take back what it would add
                for key in keys:
                    self.batcher.send("ZREM", key, lease_id)
                self.link.mark_down(exc)
        worker_id = local_choice(self.local.counts)
        self.local.add(worker_id, 1)
        return Lease(worker_id, lease_id, False)

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        if not lease.shared:
            self.local.add(lease.worker_id, -1)
            return
        self._live.pop(lease.lease_id, None)
        if self.link.up:
            self.batcher.send("ZREM", self.keys.inflight(lease.worker_id), lease.lease_id)
        # else: it expires on its own within the TTL

    def counts(self, worker_ids: Sequence[str]) -> dict[str, int]:
        """Live shared counts (for /metrics and tests); local counts while Redis is down."""
        if self.link.up and worker_ids:
            try:
                values = self._count(keys=[self.keys.inflight(w) for w in worker_ids])
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
                self._renew(keys=[self.keys.inflight(le.worker_id) for le in batch],
                            args=[self.ttl_ms] + [le.lease_id for le in batch])
        except REDIS_ERRORS as exc:
            self.link.mark_down(exc)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_interval_s):
            self.renew()


def _fresh_client(client):
    """A client with its own connection pool (the sender holds one connection for itself)."""
    return redis.Redis(connection_pool=redis.ConnectionPool(**client.connection_pool.connection_kwargs))

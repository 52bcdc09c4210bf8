"""The shared leases against a real Redis: atomic least-loaded acquisition, expiry,
renewal, batching, and the process-local fallback."""

from __future__ import annotations

import threading
import time

import pytest

from gpufleet.common.rediskeys import RedisKeys
from gpufleet.router.leases import LeaseManager
from gpufleet.router.redisconn import RedisLink

WORKERS = ["w1", "w2", "w3"]


@pytest.fixture
def link(redis_url):
    link = RedisLink(redis_url, timeout_s=2.0)
    assert link.probe()
    return link


def counts(manager):
    return [manager.counts(WORKERS)[w] for w in WORKERS]


def test_acquire_takes_the_least_loaded_in_the_given_order(link):
    leases = LeaseManager(link, RedisKeys(), "r1", ttl_s=30)
    first = leases.acquire(WORKERS, None)
    assert first.worker_id == "w1"  # equal loads: the first in the policy's order
    assert counts(leases) == [1, 0, 0]
    second = leases.acquire(WORKERS, None)
    assert second.worker_id == "w2"
    third = leases.acquire(["w3", "w1", "w2"], None)
    assert third.worker_id == "w3"
    fourth = leases.acquire(["w2", "w1"], None)  # both at 1: the first of this order
    assert fourth.worker_id == "w2"
    assert counts(leases) == [1, 2, 1]
    leases.release(second)
    assert counts(leases) == [1, 1, 1]
    leases.release(second)  # twice is harmless
    assert counts(leases) == [1, 1, 1]


def test_leases_expire_unless_renewed(link):
    dead = LeaseManager(link, RedisKeys(), "dead", ttl_s=1)
    alive = LeaseManager(link, RedisKeys(), "alive", ttl_s=1)
    dead.acquire(["w1"], None)
    alive.acquire(["w2"], None)
    for _ in range(4):
        time.sleep(0.4)
        alive.renew()  # the process that lives renews; the "killed" one does not
    assert counts(alive) == [0, 1, 0]


def test_concurrent_acquisitions_are_atomic_and_batched(link):
    leases = LeaseManager(link, RedisKeys(), "r1", ttl_s=30)
    leases.start()
    try:
        barrier = threading.Barrier(60)
        taken = []

        def take():
            barrier.wait()
            taken.append(leases.acquire(WORKERS, None))

        threads = [threading.Thread(target=take) for _ in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert counts(leases) == [20, 20, 20]
        assert leases.batcher.batches < leases.batcher.commands  # several acquisitions per round-trip
        for lease in taken:
            leases.release(lease)
        deadline = time.monotonic() + 5
        while sum(counts(leases)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counts(leases) == [0, 0, 0]
    finally:
        leases.stop()


def test_redis_down_falls_back_to_local_counts(link):
    leases = LeaseManager(link, RedisKeys(), "r1", ttl_s=30)
    link.mark_down(ConnectionError("test"))
    chosen = []
    for _ in range(3):
        lease = leases.acquire(WORKERS, lambda local: min(WORKERS, key=lambda w: local.get(w, 0)))
        assert not lease.shared
        chosen.append(lease)
    assert sorted(le.worker_id for le in chosen) == WORKERS
    assert leases.local.counts == {"w1": 1, "w2": 1, "w3": 1}
    for lease in chosen:
        leases.release(lease)
    assert leases.local.counts == {}
    assert link.client.keys("gpufleet:inflight:*") == []

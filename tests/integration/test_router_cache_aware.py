"""The cache_aware policy against a real Redis (the script agrees with the pure function; the
index and the token leases stay bounded and leak-proof) and as real routers in front of
real simulators (affinity, the overload bound, two routers sharing one index)."""

from __future__ import annotations

import random
import time

import pytest
import requests
from test_router_helpers import MODEL, RouterFleet, metric_sum, run_load

from gpufleet.common.rediskeys import RedisKeys
from gpufleet.router.affinity import AffinityRouter, Profile, block_hashes
from gpufleet.router.leases import LeaseManager
from gpufleet.router.policies import CacheAwareParams, CacheSettings, cache_aware_pick
from gpufleet.router.redisconn import RedisLink
from support.procs import wait_until

KEYS = RedisKeys()


@pytest.fixture
def link(redis_url):
    link = RedisLink(redis_url, timeout_s=2.0)
    assert link.probe()
    return link


def affinity(link, settings: CacheSettings, ttl_s: float = 30) -> AffinityRouter:
    return AffinityRouter(LeaseManager(link, KEYS, "r1", ttl_s=ttl_s), settings)


def blocks(tag: str, n: int) -> tuple[str, ...]:
    return block_hashes((tag * 64 * n)[:64 * n], 64, 4096)


# -- the script and the pure function --------------------------------------------------------------

def test_the_script_and_the_pure_function_agree_on_random_inputs(link):
    rng = random.Random(11)
    client = link.client
    for trial in range(300):
        params = CacheAwareParams(block_tokens=rng.choice([1, 16, 32]),
                                  overload_factor=rng.choice([1.0, 1.1, 1.25, 2.0]),
                                  overload_slack=rng.choice([0.0, 0.5, 2.0, 8.0, 1e9]),
                                  queue_tokens=rng.choice([0.0, 256.0]), kv_tokens=rng.choice([0.0, 1024.0]))
        settings = CacheSettings(max_blocks=64, params=params)
        router = affinity(link, settings)
        n = rng.randint(1, 6)
        workers = [f"t{trial}w{i}" for i in range(n)]
        request = blocks(f"{trial}-", rng.randint(0, 40))
        outstanding, lease_tokens, matched = [], [], []
        for w in workers:
            # outstanding work: a few leases with tokens, as other routers left them
            total = 0
            outstanding.append(rng.randint(0, 6))
            for j in range(outstanding[-1]):
                tokens = rng.randint(0, 5000)
                client.zadd(KEYS.inflight(w), {f"other:{j}": time.time() * 1000 + 60_000})
                client.hset(KEYS.inflight_tokens(w), f"other:{j}", tokens)
                client.hincrby(KEYS.inflight_tokens(w), "total", tokens)
                total += tokens
            lease_tokens.append(total)
            # what the index holds for it: a prefix of the request, sometimes with a stale entry
            have = rng.randint(0, len(request))
            now_ms = int(client.time()[0]) * 1000
            if have:
                client.zadd(KEYS.prefix_index(w), {h: now_ms - j for j, h in enumerate(request[:have])})
            if have and rng.random() < 0.2:
                client.zadd(KEYS.prefix_index(w), {request[0]: now_ms - 10_000_000})  # expired: matches nothing
                have = 0
            matched.append(have)
        reported = [rng.choice([0.0, 0.1, 1 / 3, 512.5, 1e4]) for _ in workers]
        profile = Profile(rng.randint(0, 3000), rng.randint(0, 300), request)
        want_index, want_tokens = cache_aware_pick(outstanding, lease_tokens, reported, matched, profile.prompt_tokens,
                                                   profile.decode_tokens, params)
        lease, got_matched = router.acquire(workers, reported, profile)
        assert (workers.index(lease.worker_id), lease.tokens) == (want_index, want_tokens), trial
        assert got_matched in (matched[want_index], 0), trial
        assert lease.shared
        # the lease counts, and the request's blocks are now in the chosen worker's index
        assert int(client.hget(KEYS.inflight_tokens(lease.worker_id), "total")) == lease_tokens[want_index] + \
            want_tokens
        if request:
            assert client.zscore(KEYS.prefix_index(lease.worker_id), request[-1]) is not None


def test_the_index_is_bounded_and_expires(link):
    settings = CacheSettings(max_blocks=100, capacity_blocks=150, ttl_s=2)
    router = affinity(link, settings)
    for i in range(4):
        router.acquire(["w1"], [0.0], Profile(100, 10, blocks(f"r{i}", 100)))
        time.sleep(0.15)  # block j scores now - j ms: a later request's blocks are all newer
    index = KEYS.prefix_index("w1")
    assert link.client.zcard(index) == 150
    # the newest request is whole; the oldest ones lost their tails first
    newest = blocks("r3", 100)
    assert all(link.client.zscore(index, h) is not None for h in newest)
    assert link.client.zscore(index, blocks("r2", 100)[0]) is not None
    assert link.client.zscore(index, blocks("r2", 100)[-1]) is None
    assert 0 < link.client.pttl(index) <= 2000
    time.sleep(2.2)
    assert not link.client.exists(index)


def test_the_largest_prompt_the_settings_allow_is_recorded_and_found(link):
    router = affinity(link, CacheSettings(max_blocks=4096))
    prompt = blocks("L", 4096)
    first, _ = router.acquire(["w1", "w2"], [0.0, 0.0], Profile(70000, 0, prompt))
    router.leases.release(first)
    _, matched = router.acquire(["w2", "w1"], [0.0, 0.0], Profile(70000, 0, prompt))
    assert matched == 4096 and link.client.zcard(KEYS.prefix_index("w1")) == 4096


def test_stale_entries_do_not_count_and_a_fresh_copy_does(link):
    router = affinity(link, CacheSettings(max_blocks=50, ttl_s=1))
    prompt = blocks("s", 50)
    first, _ = router.acquire(["a", "b"], [0.0, 0.0], Profile(800, 0, prompt))
    router.leases.release(first)
    _, matched = router.acquire(["b", "a"], [0.0, 0.0], Profile(800, 0, prompt))
    assert matched == 50  # a has it: a is chosen over b, first in the order
    time.sleep(1.1)
    lease, matched = router.acquire(["b", "a"], [0.0, 0.0], Profile(800, 0, prompt))
    assert matched == 0  # expired everywhere: plain load order


def test_a_hot_prefix_is_refreshed_at_most_once_a_second_and_new_blocks_always_recorded(link):
    router = affinity(link, CacheSettings(max_blocks=50))
    index = KEYS.prefix_index("w1")
    shared = blocks("h", 40)
    router.acquire(["w1"], [0.0], Profile(800, 0, shared))
    first = link.client.zscore(index, shared[0])
    longer = shared + blocks("tail", 5)[:5]
    _, matched = router.acquire(["w1"], [0.0], Profile(900, 0, longer))
    assert matched == 40
    assert link.client.zscore(index, shared[0]) == first  # not rewritten within the second
    assert link.client.zscore(index, longer[-1]) is not None  # the new blocks are
    time.sleep(1.1)
    router.acquire(["w1"], [0.0], Profile(900, 0, longer))
    assert link.client.zscore(index, shared[0]) > first + 1000


def test_token_leases_release_and_a_killed_routers_leases_expire(link):
    dead = affinity(link, CacheSettings(), ttl_s=1)
    alive = affinity(link, CacheSettings(), ttl_s=30)
    held = [dead.acquire(["w1"], [0.0], Profile(1000, 100, ()))[0] for _ in range(3)]
    assert int(link.client.hget(KEYS.inflight_tokens("w1"), "total")) == 3300
    dead.leases.release(held[0])
    wait_until(lambda: int(link.client.hget(KEYS.inflight_tokens("w1"), "total")) == 2200, timeout=5,
               what="the release")
    # the other two are never released nor renewed (their router was "killed"): once expired,
    # the next acquisition trims them and the tokens they carried
    time.sleep(1.2)
    lease, _ = alive.acquire(["w1"], [0.0], Profile(10, 0, ()))
    assert link.client.zcard(KEYS.inflight("w1")) == 1
    assert int(link.client.hget(KEYS.inflight_tokens("w1"), "total")) == 10
    alive.leases.release(lease)
    wait_until(lambda: not link.client.exists(KEYS.inflight("w1"), KEYS.inflight_tokens("w1")), timeout=5,
               what="every key of an idle worker gone")


def test_what_a_process_routed_through_redis_keeps_its_affinity_when_redis_goes(link):
    router = affinity(link, CacheSettings(max_blocks=20))
    homes = {}
    for tag in "pqrs":
        lease, _ = router.acquire(["a", "b", "c"], [0.0] * 3, Profile(400, 10, blocks(tag, 20)))
        router.leases.release(lease)
        homes[tag] = lease.worker_id
    link.mark_down(ConnectionError("test"))
    for tag in "pqrs":
        lease, matched = router.acquire(["c", "b", "a"], [0.0] * 3, Profile(400, 10, blocks(tag, 20)))
        assert (lease.shared, lease.worker_id, matched) == (False, homes[tag], 20)
        router.leases.release(lease)


def test_redis_down_falls_back_to_the_local_index_and_counts(link):
    router = affinity(link, CacheSettings(max_blocks=20))
    link.mark_down(ConnectionError("test"))
    prompt = blocks("d", 20)
    first, _ = router.acquire(["a", "b"], [0.0, 0.0], Profile(400, 10, prompt))
    assert not first.shared and router.leases.local.tokens == {"a": 410}
    router.leases.release(first)
    second, matched = router.acquire(["b", "a"], [0.0, 0.0], Profile(400, 10, prompt))
    assert second.worker_id == "a" and matched == 20 and second.tokens == 80 + 10
    # held, its 90 tokens of work are less than b's full prefill: a again
    third, _ = router.acquire(["b", "a"], [0.0, 0.0], Profile(400, 10, prompt))
    assert third.worker_id == "a" and router.leases.local.tokens == {"a": 180}
    router.leases.release(second)
    router.leases.release(third)
    assert router.leases.local.counts == {} and router.leases.local.tokens == {}
    assert link.client.keys("gpufleet:*") == []


# -- real routers in front of real simulators ----------------------------------------------------

SIM_ARGS = ("--max-model-len", "200000", "--max-num-seqs", "256")


@pytest.fixture
def fleet(daemons, redis_url):
    return RouterFleet(daemons, redis_url)


def system_prompt(tenant: int, chars: int = 8000) -> str:
    words = f"tenant {tenant} rules: answer briefly, cite sources, be kind. "
    return (words * (chars // len(words) + 1))[:chars]


def ask(router, tenant: int, question: str, max_tokens: int = 4, chars: int = 8000, **extra):
    body = [{"role": "system", "content": system_prompt(tenant, chars)}, {"role": "user", "content": question}]
    resp = requests.post(router.url + "/v1/chat/completions", headers=router.headers(), timeout=120,
                         json={"model": MODEL, "messages": body, "max_tokens": max_tokens, **extra})
    assert resp.status_code == 200, resp.text
    return resp


def served_by(sims, fn) -> str:
    """The simulator that finished the one request ``fn`` sends (requests one at a time)."""
    before = [s.finished() for s in sims]
    fn()
    wait_until(lambda: sum(s.finished() for s in sims) == sum(before) + 1, timeout=10, what="the request counted")
    changed = [s.id for s, b in zip(sims, before, strict=True) if s.finished() != b]
    assert len(changed) == 1, changed
    return changed[0]


def test_repeated_prefixes_land_on_the_worker_that_has_them(fleet):
    sims = [fleet.sim(f"w{i}", *SIM_ARGS) for i in range(3)]
    router = fleet.router(processes=2, GPUFLEET_ROUTER_POLICY="cache_aware")
    homes = {}
    for tenant in range(6):
        homes[tenant] = served_by(sims, lambda t=tenant: ask(router, t, "first question"))
    for round_ in range(3):
        for tenant in range(6):
            got = served_by(sims, lambda t=tenant, r=round_: ask(router, t, f"question {r} of tenant {t}"))
            assert got == homes[tenant], (tenant, round_, homes)
    # new prefixes go where the load is least (all idle here: spread, not piled on one worker)
    assert len(set(homes.values())) >= 2, homes
    m = router.metrics()
    prompt = metric_sum(m, "gpufleet_router_cache_prompt_tokens_total")
    matched = metric_sum(m, "gpufleet_router_cache_matched_tokens_total")
    assert prompt > 0 and matched / prompt > 0.65, (matched, prompt)  # 18 of 24 requests hit ~all their prompt


def test_a_hot_prefix_stays_on_its_worker_until_it_saturates_then_spreads(fleet):
    # a 16k-token prompt: once cached, a request costs its worker ~130 tokens of work, so by
    # cost alone all 45 requests below would stay on the worker that has it; the bound (more
    # outstanding requests than 1.25 × the mean + 4 lose the affinity) spreads them
    sims = [fleet.sim(f"w{i}", *SIM_ARGS, "--ttft-ms", "20", "--itl-ms", "40", "--prefill-ms-per-token", "0.005")
            for i in range(3)]
    knobs = {"GPUFLEET_ROUTER_CACHE_MAX_BLOCKS": 1100, "GPUFLEET_ROUTER_CACHE_DECODE_TOKENS": 100,
             "GPUFLEET_ROUTER_CACHE_OVERLOAD_FACTOR": 1.25, "GPUFLEET_ROUTER_CACHE_OVERLOAD_SLACK": 4}
    router = fleet.router(processes=2, GPUFLEET_ROUTER_POLICY="cache_aware", GPUFLEET_ROUTER_REDIS_BUDGET_S=2,
                          **knobs)
    chars = 64_000
    home = served_by(sims, lambda: ask(router, 0, "warm up", chars=chars))
    ids = [s.id for s in sims]

    def burst(n: int, tag: str) -> list[float]:
        before = [s.finished() for s in sims]
        results = run_load(lambda i: ask(router, 0, f"{tag} {i}", max_tokens=100, chars=chars, stream=True,
                                         ).status_code, n, n)
        assert results.count(200) == n, results[:3]
        wait_until(lambda: sum(s.finished() for s in sims) == sum(before) + n, timeout=20, what="the burst counted")
        return [s.finished() - b for s, b in zip(sims, before, strict=True)]

    # a few concurrent requests (under the bound): all of them go to the worker that has the prefix
    few = burst(4, "few")
    assert few[ids.index(home)] == 4, few
    # many: the home worker keeps the largest share, but past the bound the prefix spreads
    many = burst(45, "many")
    assert many[ids.index(home)] == max(many) and many[ids.index(home)] <= 35, many
    assert all(many[i] >= 3 for i in range(3)), many


def test_two_routers_share_one_prefix_index(fleet):
    sims = [fleet.sim(f"w{i}", *SIM_ARGS) for i in range(3)]
    a = fleet.router(processes=1, name="router-a", GPUFLEET_ROUTER_POLICY="cache_aware")
    b = fleet.router(processes=1, name="router-b", GPUFLEET_ROUTER_POLICY="cache_aware")
    for tenant in range(4):
        home = served_by(sims, lambda t=tenant: ask(a, t, "through A"))
        for i in range(4):
            assert served_by(sims, lambda t=tenant, i=i: ask(b, t, f"through B {i}")) == home, (tenant, i)
        # and back: what B recorded, A sees
        assert served_by(sims, lambda t=tenant: ask(a, t, "through A again")) == home, tenant


def test_odd_requests_are_served_not_failed_by_the_policy(fleet):
    fleet.sim("w0", *SIM_ARGS)
    router = fleet.router(processes=1, GPUFLEET_ROUTER_POLICY="cache_aware")
    url, headers = router.url + "/v1/chat/completions", router.headers()
    for messages in ([], [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url",
                                                                                      "image_url": {"url": "x"}}]}],
                     [{"role": "user", "content": "é" * 300_000}]):
        resp = requests.post(url, headers=headers, timeout=60,
                             json={"model": MODEL, "messages": messages, "max_tokens": 2})
        # the worker's own answer (200, or its 400 for content it refuses), never the router's 500
        assert resp.status_code != 500 and "internal_error" not in resp.text, resp.text
    resp = requests.post(router.url + "/v1/completions", headers=headers, timeout=60,
                         json={"model": MODEL, "prompt": [[1, 2], "x", None], "max_tokens": 2})
    assert resp.status_code != 500, resp.text
    assert metric_sum(router.metrics(), "gpufleet_router_requests_total", status="500") == 0

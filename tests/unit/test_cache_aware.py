"""The cache_aware policy's pure parts: the score (affinity, the load bound, ties, caps),
the request's text in chained blocks, and the process-local index of the fallback."""

import json

import pytest

from gpufleet.common.config import ConfigError
from gpufleet.router.affinity import EMPTY, LocalIndex, block_hashes, profile_of, prompt_text
from gpufleet.router.config import RouterConfig
from gpufleet.router.policies import CacheAwareParams, CacheSettings, cache_aware_pick, reported_load

P = CacheAwareParams(block_tokens=16, overload_factor=1.25, overload_slack=2.0)
SETTINGS = CacheSettings(chars_per_token=4.0, max_blocks=8, params=P)


def pick(lease_tokens, matched, prompt=2000, decode=100, reported=None, outstanding=None, params=P):
    reported = reported or [0.0] * len(lease_tokens)
    outstanding = outstanding or [0] * len(lease_tokens)
    return cache_aware_pick(outstanding, lease_tokens, reported, matched, prompt, decode, params)


# -- the score -----------------------------------------------------------------------------------

def test_affinity_wins_over_a_slightly_lighter_worker():
    # b has 1,600 of the 2,000 prompt tokens cached; a is 500 tokens lighter
    assert pick([0, 500, 0], [0, 100, 0]) == (1, 400 + 100)


def test_the_lease_carries_the_uncached_prefill_plus_the_decode_estimate():
    assert pick([0, 0], [0, 0], prompt=2000, decode=50) == (0, 2050)
    assert pick([0, 0], [0, 125], prompt=2000, decode=50) == (1, 50)  # fully cached


def test_matched_blocks_count_at_most_the_prompt():
    # 200 blocks × 16 tokens > 2,000: the hit is capped at the prompt, never a negative prefill
    assert pick([0, 0], [0, 200], prompt=2000, decode=0) == (1, 0)


def test_cost_alone_prefers_a_lighter_worker_over_a_cached_but_much_busier_one():
    assert pick([0, 2500], [0, 125])[0] == 0
    assert pick([0, 1900], [0, 125])[0] == 1


def test_a_worker_with_too_many_outstanding_requests_loses_its_affinity():
    # b holds the prompt and its leases are cheap (cached requests), but it has 12 requests
    # outstanding: over 1.25 × mean (4.67) + 2 = 7.8, so its cache earns nothing and the
    # lightest worker wins
    assert pick([300, 1200, 0], [0, 125, 0], outstanding=[1, 12, 1]) == (2, 2100)
    # at the bound: 4 ≤ 1.25 × 2 + 2 keeps the affinity; 5 > 1.25 × 2.33 + 2 loses it
    assert pick([300, 500, 0], [0, 125, 0], outstanding=[1, 4, 1])[0] == 1
    assert pick([300, 500, 0], [0, 125, 0], outstanding=[1, 5, 1])[0] == 2


def test_the_bound_scales_with_the_mean():
    # every worker busy: the same 12 is now under 1.25 × 11 + 2
    assert pick([3000, 1200, 3000], [0, 125, 0], outstanding=[10, 12, 11])[0] == 1
    tight = P._replace(overload_factor=1.0, overload_slack=0.0)
    assert pick([0, 10], [0, 125], outstanding=[1, 2], params=tight)[0] == 0
    assert pick([0, 10], [0, 125], outstanding=[2, 2], params=tight)[0] == 1


def test_empty_index_is_least_loaded_in_tokens():
    assert pick([300, 100, 200], [0, 0, 0]) == (1, 2100)


def test_ties_go_to_the_first_candidate_in_preference_order():
    assert pick([0, 0, 0], [0, 0, 0])[0] == 0
    assert pick([5, 0, 0], [0, 0, 0])[0] == 1
    assert pick([0, 0], [3, 3])[0] == 0


def test_reported_load_adds_queue_depth_and_kv_usage():
    assert reported_load(2, 0.5, P) == 2 * P.queue_tokens + 0.5 * P.kv_tokens
    # a worker's report is input: nonsense counts as nothing, not as a poisoned score
    for depth, usage in ((float("nan"), float("nan")), (float("inf"), 7.0), (-3, -1)):
        assert reported_load(depth, usage, P) == 0.0
    # a reported queue steers away from an otherwise equal worker
    assert pick([0, 0], [0, 0], reported=[reported_load(3, 0.0, P), 0.0])[0] == 1


def test_no_prompt_no_blocks_is_least_loaded():
    assert pick([10, 0], [0, 0], prompt=0, decode=0) == (1, 0)


# -- the request's text, in blocks ----------------------------------------------------------------

def chat(*contents, **extra):
    return {"model": "m", "messages": [{"role": "user", "content": c} for c in contents], **extra}


def test_equal_prefixes_give_equal_leading_hashes_and_differ_after():
    system = "You are a helpful assistant. " * 20
    wide = SETTINGS._replace(max_blocks=64)
    a = profile_of({"model": "m", "messages": [{"role": "system", "content": system},
                                               {"role": "user", "content": "What is 2+2? " * 10}]}, wide)
    b = profile_of({"model": "m", "messages": [{"role": "system", "content": system},
                                               {"role": "user", "content": "Name a colour. " * 10}]}, wide)
    shared = (len("<system>") + len(system)) // SETTINGS.block_chars
    assert shared >= 2 and a.blocks[:shared] == b.blocks[:shared]
    assert a.blocks[shared + 1:] and not set(a.blocks[shared + 1:]) & set(b.blocks[shared + 1:])


def test_a_change_in_an_early_block_changes_every_later_hash():
    text = "x" * 64 * 5
    changed = "y" + text[1:]
    assert not set(block_hashes(text, 64, 8)) & set(block_hashes(changed, 64, 8))


def test_key_order_and_spacing_do_not_matter():
    one = json.loads('{"model": "m", "messages": [{"role": "user", "content": "%s"}]}' % ("z" * 300))
    two = json.loads('{"messages":[{"content":"%s","role":"user"}],"model":"m"}' % ("z" * 300))
    assert profile_of(one, SETTINGS) == profile_of(two, SETTINGS)


def test_tools_and_roles_are_part_of_the_text():
    base = chat("q" * 300)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert profile_of(base, SETTINGS).blocks != profile_of({**base, "tools": tools}, SETTINGS).blocks
    other_role = {"model": "m", "messages": [{"role": "system", "content": "q" * 300}]}
    assert profile_of(base, SETTINGS).blocks[0] != profile_of(other_role, SETTINGS).blocks[0]


def test_blocks_are_capped_and_the_prompt_estimate_is_not():
    huge = chat("w" * 1_000_000)
    profile = profile_of(huge, SETTINGS)
    assert len(profile.blocks) == SETTINGS.max_blocks
    assert profile.prompt_tokens >= 1_000_000 // 4
    text, total = prompt_text(huge, 640)
    assert len(text) == 640 and total > 1_000_000


def test_only_full_blocks_are_hashed():
    assert profile_of(chat("a" * 10), SETTINGS).blocks == ()
    assert len(profile_of(chat("a" * (64 * 3 - len("<user>") - 2)), SETTINGS).blocks) == 2  # 191 chars


def test_decode_estimate_is_max_tokens_capped():
    assert profile_of(chat("a", max_tokens=20), SETTINGS).decode_tokens == 20
    assert profile_of(chat("a", max_completion_tokens=7), SETTINGS).decode_tokens == 7
    assert profile_of(chat("a", max_tokens=10**9), SETTINGS).decode_tokens == SETTINGS.decode_tokens
    assert profile_of(chat("a", max_tokens="lots"), SETTINGS).decode_tokens == SETTINGS.decode_tokens


@pytest.mark.parametrize("payload", [
    {"model": "m"},
    {"model": "m", "messages": []},
    {"model": "m", "messages": "not a list"},
    {"model": "m", "messages": [None, 3, "x", {"role": None}]},
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                                             {"type": "text", "text": "t" * 200}, 5, None]}]},
    {"model": "m", "messages": [{"role": "user", "content": {"odd": True}}]},
    {"model": "m", "messages": [{"role": "user", "content": "\ud800" * 100}]},
    {"model": "m", "prompt": [1, 2, 3] * 100},
    {"model": "m", "prompt": ["a" * 100, ["b"], {"c": 1}]},
    {"model": "m", "prompt": 12.5},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": "nonsense"},
])
def test_odd_requests_give_a_profile_not_an_error(payload):
    profile = profile_of(payload, SETTINGS)
    assert profile.prompt_tokens >= 0 and len(profile.blocks) <= SETTINGS.max_blocks


def test_a_profile_of_something_that_is_not_an_object_is_empty():
    assert profile_of([1, 2], SETTINGS) == EMPTY
    assert profile_of(None, SETTINGS) == EMPTY


def test_completions_prompt_is_its_text():
    a = profile_of({"model": "m", "prompt": "p" * 300}, SETTINGS)
    b = profile_of({"model": "m", "prompt": "p" * 300 + "different tail" * 10}, SETTINGS)
    assert a.blocks == b.blocks[:len(a.blocks)] and a.prompt_tokens == 75


# -- the process-local index (Redis-less fallback) -------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_local_index_finds_the_longest_recorded_prefix():
    index = LocalIndex(100, ttl_s=60, clock=Clock())
    blocks = block_hashes("k" * 64 * 6, 64, 8)
    index.record("w1", blocks[:4])
    assert index.matched("w1", blocks) == 4
    assert index.matched("w2", blocks) == 0
    assert index.matched("w1", ()) == 0


def test_local_index_expires_and_evicts_the_least_recently_used():
    clock = Clock()
    index = LocalIndex(5, ttl_s=60, clock=clock)
    old = block_hashes("o" * 64 * 4, 64, 8)
    new = block_hashes("n" * 64 * 3, 64, 8)
    index.record("w", old)
    clock.now += 1
    index.record("w", new)  # 7 blocks into 5: the two oldest go (old's tail first)
    assert index.matched("w", new) == 3
    assert index.matched("w", old) == 2
    clock.now += 61
    assert index.matched("w", new) == 0


# -- the knobs ---------------------------------------------------------------------------------------

def test_the_knobs_are_read_and_checked():
    base = {"GPUFLEET_REDIS_URL": "redis://h:1/0", "GPUFLEET_ROUTER_POLICY": "cache-aware"}
    cfg = RouterConfig.from_env({**base, "GPUFLEET_ROUTER_CACHE_BLOCK_TOKENS": "32",
                                 "GPUFLEET_ROUTER_CACHE_OVERLOAD_SLACK": "2.5",
                                 "GPUFLEET_ROUTER_CACHE_CAPACITY_BLOCKS": "3072"})
    assert cfg.policy == "cache_aware"
    assert (cfg.cache.params.block_tokens, cfg.cache.params.overload_slack, cfg.cache.capacity_blocks) == \
        (32, 2.5, 3072)
    assert cfg.cache.block_chars == 128
    assert RouterConfig.from_env(base).cache == CacheSettings()
    for name, value in (("GPUFLEET_ROUTER_CACHE_OVERLOAD_FACTOR", "0.5"), ("GPUFLEET_ROUTER_CACHE_MAX_BLOCKS", "0"),
                        ("GPUFLEET_ROUTER_CACHE_TTL_S", "nan"), ("GPUFLEET_ROUTER_CACHE_CHARS_PER_TOKEN", "x")):
        with pytest.raises(ConfigError, match=name):
            RouterConfig.from_env({**base, name: value})

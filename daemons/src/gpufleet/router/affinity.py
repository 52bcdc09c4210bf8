"""Cache-aware routing: where a request's prompt is probably cached already.

The router has no tokenizer. A request's text in a canonical form (chat: the tool
definitions, then each message's role and content in order; completions: the prompt) is
cut into blocks of ``block_tokens × chars_per_token`` characters (64 by default, about the
16 tokens of a vLLM block), and each full block gets a hash that covers the block and every
block before it: equal prefixes give equal leading hashes, and the first differing block
makes every later hash differ. At most ``max_blocks`` blocks are hashed, so a huge prompt
costs bounded work.

``prefix:{worker_id}`` (a sorted set in Redis) is an approximate index of what a worker
has recently been sent: block hashes scored by their last use (Redis time in ms; block j
of a request scores ``now - j``, so among blocks recorded together the tail is the oldest
and goes first, as in vLLM's LRU). Entries older than ``ttl_s`` do not count and are
dropped; the set is trimmed to ``capacity_blocks`` members and expires when unused.
Because hashes are chained, a worker holding block j of a prompt (almost always) holds
blocks 1..j too, so the matched prefix is found by a binary search over the request's
blocks: about log2(blocks) lookups per candidate.

One script (``CHOOSE_LUA``), sent through the process's batcher, trims expired leases,
reads each candidate's outstanding tokens, finds its matched prefix, scores every
candidate with the rule of :func:`~gpufleet.router.policies.cache_aware_pick`, takes the
lease (carrying the tokens of work it stands for) and records the prompt's blocks in the
chosen worker's index: every router process and replica shares the index and the loads,
and two routers cannot both see the same worker as the cheapest.

While Redis is down (or slower than the request path's budget), a process-local index
(:class:`LocalIndex`, which also records what the process routed while Redis was up) and
the local leases serve the same rule in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from .leases import TRIM_LUA, Lease, LeaseManager
from .policies import CacheSettings, cache_aware_pick, reported_load
from .redisconn import REDIS_ERRORS

log = logging.getLogger(__name__)

LOCAL_CAPACITY_MAX = 8192  # blocks per worker in a process's fallback index (memory bound)


class Profile(NamedTuple):
    """What the cache-aware score needs of one request."""

    prompt_tokens: int
    decode_tokens: int
    blocks: tuple[str, ...]


EMPTY = Profile(0, 0, ())


# -- the request's text, in blocks ------------------------------------------------------------

def _dump(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _content(content) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                yield part["text"]
            elif isinstance(part, str):
                yield part
            else:
                yield _dump(part)
    elif content is not None:
        yield _dump(content)


def text_pieces(payload: dict) -> Iterator[str]:
    """The request's prompt as pieces of text, in the order a chat template lays them out:
    equal conversations give equal text, whatever the JSON's key order or spacing."""
    messages = payload.get("messages")
    if messages is not None:
        tools = payload.get("tools")
        if tools:
            yield "<tools>" + _dump(tools) + "\n"
        for message in messages if isinstance(messages, list) else (messages,):
            if not isinstance(message, dict):
                yield _dump(message) + "\n"
                continue
            yield f"<{message.get('role')}>"
            yield from _content(message.get("content"))
            extra = {k: v for k, v in message.items() if k not in ("role", "content")}
            if extra:
                yield _dump(extra)
            yield "\n"
        return
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        yield ",".join(map(str, prompt))  # token ids: still equal ids, equal text
    elif isinstance(prompt, list):
        for p in prompt:
            yield p if isinstance(p, str) else _dump(p)
            yield "\n"
    elif prompt is not None:
        yield _dump(prompt)


def prompt_text(payload: dict, limit: int) -> tuple[str, int]:
    """(the first ``limit`` characters of the prompt's text, its whole length)."""
    head: list[str] = []
    kept = total = 0
    for piece in text_pieces(payload):
        total += len(piece)
        if kept < limit:
            head.append(piece[:limit - kept])
            kept += len(head[-1])
    return "".join(head), total


def block_hashes(text: str, block_chars: int, max_blocks: int) -> tuple[str, ...]:
    """Chained hashes of the full blocks of ``text`` (a partial last block is not cached
    by vLLM either): hash j covers blocks 1..j."""
    digest = hashlib.blake2b(digest_size=8)
    out = []
    for start in range(0, min(len(text) // block_chars, max_blocks) * block_chars, block_chars):
        digest.update(text[start:start + block_chars].encode("utf-8", "surrogatepass"))
        out.append(digest.copy().hexdigest())
    return tuple(out)


def profile_of(payload, settings: CacheSettings) -> Profile:
    """The request's profile; an empty one (no affinity, still balanced by load) for anything
    unexpected: the policy never fails a request."""
    try:
        if not isinstance(payload, dict):
            return EMPTY
        block_chars = settings.block_chars
        text, total = prompt_text(payload, block_chars * settings.max_blocks)
        prompt_tokens = int(-(-total // settings.chars_per_token))
        asked = payload.get("max_completion_tokens", payload.get("max_tokens"))
        decode = settings.decode_tokens
        if isinstance(asked, int) and not isinstance(asked, bool) and asked >= 0:
            decode = min(asked, decode)
        return Profile(prompt_tokens, decode, block_hashes(text, block_chars, settings.max_blocks))
    except Exception:  # noqa: BLE001 - odd input costs the request its affinity, nothing more
        log.debug("no cache-aware profile for this request", exc_info=True)
        return EMPTY


# -- the index and the choice in Redis ---------------------------------------------------------

# KEYS: (inflight, inflight_tokens, prefix) of each candidate, in preference order.
# ARGV: lease id, lease ttl ms, n candidates, prompt tokens, decode tokens, block tokens,
#       overload factor, overload slack, index ttl ms, index capacity,
#       then n reported loads (tokens), then the prompt's block hashes in one string (16 hex
#       digits each: one argument instead of hundreds is most of the client's packing cost).
# Returns {chosen index (1-based), tokens of its lease, matched blocks of each candidate
# (0 for a candidate over the load bound: not looked up)}.
CHOOSE_LUA = TRIM_LUA + """
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local prompt = tonumber(ARGV[4])
local decode = tonumber(ARGV[5])
local block_tokens = tonumber(ARGV[6])
local factor = tonumber(ARGV[7])
local slack = tonumber(ARGV[8])
local index_ttl = tonumber(ARGV[9])
local capacity = tonumber(ARGV[10])
local hashes = ARGV[11 + n]
local nblocks = math.floor(#hashes / 16)
local function block(j) return string.sub(hashes, 16 * j - 15, 16 * j) end
local fresh = now - index_ttl
local counts, loads, total = {}, {}, 0
for i = 1, n do
  counts[i] = trim(KEYS[3 * i - 2], KEYS[3 * i - 1], now)
  loads[i] = (tonumber(redis.call('HGET', KEYS[3 * i - 1], 'total')) or 0) + tonumber(ARGV[10 + i])
  total = total + counts[i]
end
local bound = factor * (total / n) + slack
local out = {0, 0}
local best, best_cost, best_prefill = 1, nil, prompt
local last_seen = {}  -- candidate → score of its deepest matched block
for i = 1, n do
  local matched = 0
  if nblocks > 0 and counts[i] <= bound then
    local key = KEYS[3 * i]
    local function has(j)
      local s = tonumber(redis.call('ZSCORE', key, block(j)))
      if s and s > fresh then
        last_seen[i] = s
        return true
      end
      return false
    end
    if has(1) then
      local lo, hi = 1, nblocks
      while lo < hi do
        local mid = math.floor((lo + hi + 1) / 2)
        if has(mid) then lo = mid else hi = mid - 1 end
      end
      matched = lo
    end
  end
  out[i + 2] = matched
  local prefill = prompt - math.min(prompt, matched * block_tokens)
  local cost = loads[i] + prefill
  if best_cost == nil or cost < best_cost then best, best_cost, best_prefill = i, cost, prefill end
end
local tokens = best_prefill + decode
redis.call('ZADD', KEYS[3 * best - 2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[3 * best - 2], ttl * 3)
redis.call('HSET', KEYS[3 * best - 1], ARGV[1], tokens)
redis.call('HINCRBY', KEYS[3 * best - 1], 'total', tokens)
redis.call('PEXPIRE', KEYS[3 * best - 1], ttl * 3)
if nblocks > 0 then
  -- record the prompt's blocks; the matched prefix only when its last refresh is over a
  -- second old (a hot prefix would otherwise rewrite the same entries on every request)
  local from = 1
  local matched = out[best + 2]
  if matched > 0 and last_seen[best] + (matched - 1) > now - 1000 then from = matched + 1 end
  local key = KEYS[3 * best]
  for start = from, nblocks, 1000 do  -- unpack() takes a few thousand values at most
    local args = {}
    for j = start, math.min(nblocks, start + 999) do
      args[#args + 1] = now - (j - 1)
      args[#args + 1] = block(j)
    end
    redis.call('ZADD', key, unpack(args))
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fresh)
  local extra = redis.call('ZCARD', key) - capacity
  if extra > 0 then redis.call('ZREMRANGEBYRANK', key, 0, extra - 1) end
  redis.call('PEXPIRE', key, index_ttl)
end
out[1] = best
out[2] = tokens
return out
"""


class LocalIndex:
    """A process's own prefix index, used while Redis is down: the same blocks, last use and
    expiry, per worker, least recently used first out."""

    def __init__(self, capacity_blocks: int, ttl_s: float, clock=time.monotonic):
        self.capacity = max(1, min(capacity_blocks, LOCAL_CAPACITY_MAX))
        self.ttl_s = ttl_s
        self.clock = clock
        self.workers: dict[str, OrderedDict[str, float]] = {}

    def matched(self, worker_id: str, blocks: Sequence[str]) -> int:
        entries = self.workers.get(worker_id)
        if not entries or not blocks:
            return 0
        fresh = self.clock() - self.ttl_s

        def has(j: int) -> bool:
            used = entries.get(blocks[j - 1])
            return used is not None and used > fresh

        if not has(1):
            return 0
        lo, hi = 1, len(blocks)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if has(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def record(self, worker_id: str, blocks: Sequence[str]) -> None:
        if not blocks:
            return
        entries = self.workers.setdefault(worker_id, OrderedDict())
        now = self.clock()
        # as the script does: a prefix refreshed within the second is not rewritten
        matched = self.matched(worker_id, blocks)
        start = matched if matched and entries[blocks[matched - 1]] > now - 1.0 else 0
        for block in reversed(blocks[start:]):  # the head is the most recently used
            entries[block] = now
            entries.move_to_end(block)
        while len(entries) > self.capacity:
            entries.popitem(last=False)

    def forget(self, keep: set[str]) -> None:
        for worker_id in set(self.workers) - keep:
            del self.workers[worker_id]


class AffinityRouter:
    """The cache-aware acquisition: choose + lease + record in one script, or in-process
    while Redis is down."""

    def __init__(self, leases: LeaseManager, settings: CacheSettings):
        self.leases = leases
        self.settings = settings
        self.local = LocalIndex(settings.capacity_blocks, settings.ttl_s)
        self._choose = leases.link.client.register_script(CHOOSE_LUA)
        leases.batcher.scripts[self._choose.sha] = CHOOSE_LUA
        p = settings.params
        self._fixed = [p.block_tokens, repr(p.overload_factor), repr(p.overload_slack),
                       int(settings.ttl_s * 1000), settings.capacity_blocks]

    def profile(self, payload) -> Profile:
        return profile_of(payload, self.settings)

    def acquire(self, ordered: Sequence[str], reported: Sequence[float], profile: Profile) -> tuple[Lease, int]:
        """A lease on the cheapest of ``ordered`` for this request, and the prompt's blocks
        found cached there. ``reported[i]``: candidate i's heartbeat load in tokens."""
        leases = self.leases
        lease_id = leases.new_id()
        if leases.link.up:
            keys = []
            for w in ordered:
                keys += (leases.keys.inflight(w), leases.keys.inflight_tokens(w), leases.keys.prefix_index(w))
            try:
                result = leases.batcher.call(
                    "EVALSHA", self._choose.sha, len(keys), *keys, lease_id, leases.ttl_ms, len(ordered),
                    profile.prompt_tokens, profile.decode_tokens, *self._fixed, *map(repr, reported),
                    "".join(profile.blocks), timeout=leases.link.budget_s)
                best = int(result[0]) - 1
                lease = leases.track(Lease(ordered[best], lease_id, True, tokens=int(result[1]),
                                           decode_tokens=profile.decode_tokens))
                # the process's own copy of what it routed: if Redis goes away (or answers
                # slower than its budget), the fallback keeps this process's affinities
                self.local.record(ordered[best], profile.blocks)
                return lease, int(result[2 + best])
            except (*REDIS_ERRORS, TimeoutError) as exc:
                leases.abandon(ordered, lease_id, exc)
        return self.acquire_locally(ordered, reported, profile, lease_id)

    def acquire_locally(self, ordered: Sequence[str], reported: Sequence[float], profile: Profile,
                        lease_id: str) -> tuple[Lease, int]:
        local = self.leases.local
        matched = [self.local.matched(w, profile.blocks) for w in ordered]
        best, tokens = cache_aware_pick([local.counts.get(w, 0) for w in ordered],
                                        [local.tokens.get(w, 0) for w in ordered], reported, matched,
                                        profile.prompt_tokens, profile.decode_tokens, self.settings.params)
        worker_id = ordered[best]
        local.add(worker_id, 1, tokens)
        self.local.record(worker_id, profile.blocks)
        return Lease(worker_id, lease_id, False, tokens=tokens, decode_tokens=profile.decode_tokens), matched[best]

    def reported(self, queue_depth: float, kv_cache_usage: float) -> float:
        return reported_load(queue_depth, kv_cache_usage, self.settings.params)

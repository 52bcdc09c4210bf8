"""Load-balancing policies: small pure functions of (candidates, their loads) → choice.

A candidate is a worker id; its load is a :class:`Load` (the requests outstanding on it
over every router, and the ``queue_depth`` the worker last reported). No policy touches a
socket, so each is tested on its own.

Least-outstanding runs in two halves so that the shared leases can apply it atomically in
Redis: :func:`tie_break_order` orders the candidates by reported queue depth, then at
random (pure, here), and :func:`pick_least` takes the first candidate with the fewest
outstanding requests in that order. The lease script (``leases.py``) does ``pick_least``
inside Redis against the live counts, so that the read of the loads and the acquisition
of the lease are one step; :func:`least_outstanding` is the same rule in one call, used
when Redis is unreachable and the loads are the process's own.

Cache-aware (:func:`cache_aware_pick`) scores each candidate by an estimate of the work
that sending the request there costs: the prompt tokens it would have to prefill (those
not found in its prefix index) plus its load (the tokens of work outstanding on it, from
the shared leases, and what its heartbeat reported: queue depth, KV-cache usage). A
candidate with more outstanding requests than ``overload_factor`` × the mean +
``overload_slack`` gets no credit for its cached prefix (bounded loads, "sticky until
saturated": affinity never piles a hot prefix onto one worker).
The lease script (``affinity.py``) runs the same rule inside Redis; this function is the
reference, used for the Redis-less fallback and the tests.
"""

from __future__ import annotations

import random as _random
from collections.abc import Mapping, Sequence
from typing import NamedTuple


class Load(NamedTuple):
    outstanding: int = 0
    queue_depth: float = 0.0


class CacheAwareParams(NamedTuple):
    """The cache-aware score's weights (``GPUFLEET_ROUTER_CACHE_*``; docs/router.md)."""

    block_tokens: int = 16          # prompt tokens per block of the prefix index
    overload_factor: float = 1.25   # 1 + ε: outstanding requests over factor × mean + slack…
    overload_slack: float = 4.0     # …(c, in requests) lose the affinity
    queue_tokens: float = 256.0     # load of one request the worker reports waiting
    kv_tokens: float = 1024.0       # load of a full KV cache (× kv_cache_usage 0–1)


class CacheSettings(NamedTuple):
    """``GPUFLEET_ROUTER_CACHE_*`` (docs/router.md)."""

    chars_per_token: float = 4.0   # prompt characters per token, for estimates
    max_blocks: int = 256          # blocks of a prompt looked at (≈ 4,096 tokens)
    capacity_blocks: int = 16384   # index entries kept per worker (≈ 262k tokens of KV cache)
    ttl_s: float = 600.0           # an index entry unused this long no longer counts
    decode_tokens: int = 128       # work a request's output counts for: its max_tokens, at most this
    params: CacheAwareParams = CacheAwareParams()

    @property
    def block_chars(self) -> int:
        return max(1, round(self.params.block_tokens * self.chars_per_token))


def reported_load(queue_depth: float, kv_cache_usage: float, params: CacheAwareParams) -> float:
    """The part of a worker's load in tokens that its heartbeat tells (not the leases)."""
    depth = queue_depth if 0.0 < queue_depth < 1e6 else 0.0  # also nan and inf: a worker's figures are input
    usage = kv_cache_usage if 0.0 < kv_cache_usage <= 1.0 else 0.0
    return params.queue_tokens * depth + params.kv_tokens * usage


def cache_aware_pick(outstanding: Sequence[int], lease_tokens: Sequence[int], reported: Sequence[float],
                     matched_blocks: Sequence[int], prompt_tokens: int, decode_tokens: int,
                     params: CacheAwareParams) -> tuple[int, int]:
    """(index of the cheapest candidate, tokens its lease carries) for candidates in
    preference order; ties go to the first.

    ``outstanding[i]``: requests leased on candidate i (over every router); a candidate with
    more than ``overload_factor`` × their mean + ``overload_slack`` gets no credit for its
    cache (bounded loads). ``lease_tokens[i]``: the work those leases stand for, in tokens;
    ``reported[i]``: its heartbeat's load in tokens (:func:`reported_load`);
    ``matched_blocks[i]``: leading blocks of the prompt in its prefix index. The cost of a
    candidate is its load in tokens plus the prompt tokens it would prefill. Keep in step
    with ``affinity.CHOOSE_LUA`` (same operations in the same order, so that the floating
    point results are identical)."""
    n = len(outstanding)
    total = 0
    for count in outstanding:
        total = total + count
    bound = params.overload_factor * (total / n) + params.overload_slack
    best, best_cost, best_prefill = 0, None, prompt_tokens
    for i in range(n):
        hit = 0
        if outstanding[i] <= bound:
            hit = min(prompt_tokens, matched_blocks[i] * params.block_tokens)
        prefill = prompt_tokens - hit
        cost = (lease_tokens[i] + reported[i]) + prefill
        if best_cost is None or cost < best_cost:
            best, best_cost, best_prefill = i, cost, prefill
    return best, best_prefill + decode_tokens


def tie_break_order(candidates: Sequence[str], loads: Mapping[str, Load], rng: _random.Random) -> list[str]:
    """Candidates by lowest reported queue depth, equal depths in random order."""
    keyed = [((loads.get(c) or Load()).queue_depth, rng.random(), c) for c in candidates]
    keyed.sort()
    return [c for _, _, c in keyed]


def pick_least(ordered: Sequence[str], outstanding: Sequence[int]) -> int:
    """Index of the first candidate with the fewest outstanding requests."""
    best = 0
    for i in range(1, len(ordered)):
        if outstanding[i] < outstanding[best]:
            best = i
    return best


def least_outstanding(candidates: Sequence[str], loads: Mapping[str, Load], rng: _random.Random) -> str:
    """Fewest outstanding requests; ties to the lowest queue depth, then random."""
    ordered = tie_break_order(candidates, loads, rng)
    counts = [(loads.get(c) or Load()).outstanding for c in ordered]
    return ordered[pick_least(ordered, counts)]


def round_robin(candidates: Sequence[str], turn: int) -> str:
    """The ``turn``-th candidate, cycling. Candidates are sorted so that every process
    with the same view walks them in the same order."""
    ordered = sorted(candidates)
    return ordered[turn % len(ordered)]


def random_choice(candidates: Sequence[str], rng: _random.Random) -> str:
    return candidates[int(rng.random() * len(candidates))]


class Policy:
    """The configured policy behind one interface: ``order(candidates, loads)`` gives the
    candidates in preference order for the lease step, which picks the least loaded of
    them (least-outstanding) or the first (round-robin, random: a list of one)."""

    def __init__(self, name: str, rng: _random.Random | None = None):
        if name not in ("least_outstanding", "round_robin", "random", "cache_aware"):
            raise ValueError(f"unknown policy {name!r}")
        self.name = name
        self.rng = rng or _random.Random()
        self._turn = 0

    def order(self, candidates: Sequence[str], loads: Mapping[str, Load]) -> list[str]:
        if self.name in ("least_outstanding", "cache_aware"):
            return tie_break_order(candidates, loads, self.rng)
        if self.name == "round_robin":
            self._turn += 1
            return [round_robin(candidates, self._turn)]
        return [random_choice(candidates, self.rng)]

    def choose(self, candidates: Sequence[str], loads: Mapping[str, Load]) -> str:
        """The choice from loads known in-process (the Redis-less fallback)."""
        if self.name in ("least_outstanding", "cache_aware"):
            return least_outstanding(candidates, loads, self.rng)
        return self.order(candidates, loads)[0]

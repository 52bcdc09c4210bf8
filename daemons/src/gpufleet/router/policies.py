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
"""

from __future__ import annotations

import random as _random
from collections.abc import Mapping, Sequence
from typing import NamedTuple


class Load(NamedTuple):
    outstanding: int = 0
    queue_depth: float = 0.0


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
        if name not in ("least_outstanding", "round_robin", "random"):
            raise ValueError(f"unknown policy {name!r}")
        self.name = name
        self.rng = rng or _random.Random()
        self._turn = 0

    def order(self, candidates: Sequence[str], loads: Mapping[str, Load]) -> list[str]:
        if self.name == "least_outstanding":
            return tie_break_order(candidates, loads, self.rng)
        if self.name == "round_robin":
            self._turn += 1
            return [round_robin(candidates, self._turn)]
        return [random_choice(candidates, self.rng)]

    def choose(self, candidates: Sequence[str], loads: Mapping[str, Load]) -> str:
        """The choice from loads known in-process (the Redis-less fallback)."""
        if self.name == "least_outstanding":
            return least_outstanding(candidates, loads, self.rng)
        return self.order(candidates, loads)[0]

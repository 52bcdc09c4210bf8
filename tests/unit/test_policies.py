"""Load-balancing policies as pure functions: no sockets, no Redis."""

import random
from collections import Counter

import pytest

from gpufleet.router.policies import (
    Load,
    Policy,
    least_outstanding,
    pick_least,
    random_choice,
    round_robin,
    tie_break_order,
)


def test_least_outstanding_picks_the_fewest_outstanding():
    loads = {"a": Load(5, 0), "b": Load(2, 9), "c": Load(7, 0)}
    assert least_outstanding(["a", "b", "c"], loads, random.Random(1)) == "b"


def test_equal_loads_fall_back_to_lowest_queue_depth():
    loads = {"a": Load(3, 4), "b": Load(3, 1), "c": Load(3, 2), "d": Load(4, 0)}
    for seed in range(20):
        assert least_outstanding(["a", "b", "c", "d"], loads, random.Random(seed)) == "b"


def test_equal_loads_and_depths_are_broken_at_random():
    loads = {w: Load(1, 0) for w in "abc"}
    rng = random.Random(7)
    picks = Counter(least_outstanding(["a", "b", "c"], loads, rng) for _ in range(3000))
    assert set(picks) == {"a", "b", "c"}
    assert all(800 < n < 1200 for n in picks.values()), picks


def test_tie_break_order_then_pick_least_is_least_outstanding():
    rng = random.Random(3)
    for _ in range(200):
        ids = [f"w{i}" for i in range(rng.randint(1, 6))]
        loads = {w: Load(rng.randint(0, 3), rng.randint(0, 2)) for w in ids}
        seed = rng.random()
        ordered = tie_break_order(ids, loads, random.Random(seed))
        split = ordered[pick_least(ordered, [loads[w].outstanding for w in ordered])]
        assert split == least_outstanding(ids, loads, random.Random(seed))
        assert loads[split].outstanding == min(v.outstanding for v in loads.values())


def test_pick_least_takes_the_first_minimum():
    assert pick_least(["x", "y", "z"], [2, 1, 1]) == 1
    assert pick_least(["x"], [9]) == 0


def test_missing_loads_count_as_idle():
    assert least_outstanding(["a", "b"], {"a": Load(1, 0)}, random.Random(0)) == "b"


def test_round_robin_cycles_in_a_stable_order():
    picks = [round_robin(["c", "a", "b"], turn) for turn in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_random_choice_covers_every_candidate():
    rng = random.Random(0)
    assert {random_choice(["a", "b", "c"], rng) for _ in range(200)} == {"a", "b", "c"}


@pytest.mark.parametrize("name", ["round_robin", "random"])
def test_load_blind_policies_give_one_preferred_candidate(name):
    policy = Policy(name, random.Random(0))
    loads = {w: Load(100 if w == "a" else 0, 0) for w in "abc"}
    picks = Counter(policy.order(["a", "b", "c"], loads)[0] for _ in range(300))
    assert len(policy.order(["a", "b", "c"], loads)) == 1
    assert picks["a"] > 50  # loads are ignored by design


def test_least_outstanding_policy_orders_all_candidates():
    policy = Policy("least_outstanding", random.Random(0))
    ordered = policy.order(["a", "b", "c"], {"a": Load(0, 5), "b": Load(0, 1), "c": Load(0, 3)})
    assert ordered == ["b", "c", "a"]
    assert policy.choose(["a", "b", "c"], {"a": Load(0, 0), "b": Load(1, 0), "c": Load(2, 0)}) == "a"


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        Policy("fastest")

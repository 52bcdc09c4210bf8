"""The step engine's cost model: step duration, the ttft hold, the slow fault, time scale."""

import random

import pytest

from gpufleet.sim.latency import SLOW_FACTOR, SLOW_MIN_ITL_S, SLOW_MIN_TTFT_S, StepCost


def test_step_costs_a_fixed_part_plus_each_batched_token():
    cost = StepCost(step_s=0.006, step_s_per_token=0.00006, jitter=0, slowdown_per_seq=0)
    rng = random.Random(0)
    assert cost.step(1, 1, rng) == pytest.approx(0.00606)
    # one 2,000-token prefill chunk makes the step ~21x longer for everyone in it
    assert cost.step(2001, 2, rng) == pytest.approx(0.006 + 2001 * 0.00006)


def test_slowdown_per_running_sequence_and_time_scale():
    cost = StepCost(step_s=0.01, step_s_per_token=0, jitter=0, slowdown_per_seq=0.01)
    rng = random.Random(0)
    assert cost.step(1, 1, rng) == pytest.approx(0.01)
    assert cost.step(1, 101, rng) == pytest.approx(0.02)
    slow_fleet = StepCost(step_s=0.01, step_s_per_token=0.001, ttft_s=0.03, jitter=0, slowdown_per_seq=0,
                          time_scale=4)
    assert slow_fleet.step(10, 1, rng) == pytest.approx(0.08)
    assert slow_fleet.hold(rng) == pytest.approx(0.08)


def test_hold_is_what_ttft_adds_beyond_the_prefill_step():
    cost = StepCost(step_s=0.008, ttft_s=0.04, jitter=0)
    assert cost.hold(random.Random(0)) == pytest.approx(0.032)
    assert StepCost(step_s=0.05, ttft_s=0.04, jitter=0).hold(random.Random(0)) == 0


def test_jitter_stays_within_bounds_and_varies():
    cost = StepCost(step_s=0.01, step_s_per_token=0, jitter=0.2, slowdown_per_seq=0)
    rng = random.Random(1)
    values = [cost.step(1, 1, rng) for _ in range(500)]
    assert min(values) >= 0.008 - 1e-12 and max(values) <= 0.012 + 1e-12
    assert max(values) - min(values) > 0.003


def test_slow_fault_multiplies_with_floors():
    cost = StepCost(step_s=0.01, step_s_per_token=0, ttft_s=0.05, jitter=0, slowdown_per_seq=0)
    rng = random.Random(0)
    assert cost.hold(rng, slow=True) == pytest.approx(0.05 * SLOW_FACTOR)
    assert cost.slow_gap(rng) == pytest.approx(0.01 * (SLOW_FACTOR - 1))
    zero = StepCost(step_s=0, step_s_per_token=0, ttft_s=0, jitter=0)
    assert zero.is_zero
    assert zero.step(10, 1, rng) == 0 and zero.hold(rng) == 0
    assert zero.hold(rng, slow=True) == SLOW_MIN_TTFT_S
    assert zero.slow_gap(rng) == SLOW_MIN_ITL_S

"""The simulator's latency model."""

import random

import pytest

from gpufleet.sim.latency import SLOW_FACTOR, SLOW_MIN_ITL_S, SLOW_MIN_TTFT_S, LatencyModel


def test_ttft_grows_with_prompt_length_and_batch():
    model = LatencyModel(ttft_s=0.04, itl_s=0.008, prefill_s_per_token=0.001, jitter=0, slowdown_per_seq=0.1)
    rng = random.Random(0)
    assert model.ttft(0, 1, rng) == pytest.approx(0.04)
    assert model.ttft(100, 1, rng) == pytest.approx(0.14)
    # 3 running: two beyond the first, each 10 % slower
    assert model.ttft(100, 3, rng) == pytest.approx(0.14 * 1.2)


def test_itl_slows_down_per_running_sequence():
    model = LatencyModel(itl_s=0.01, jitter=0, slowdown_per_seq=0.01)
    rng = random.Random(0)
    assert model.itl(1, rng) == pytest.approx(0.01)
    assert model.itl(0, rng) == pytest.approx(0.01)
    assert model.itl(101, rng) == pytest.approx(0.02)


def test_jitter_stays_within_bounds_and_varies():
    model = LatencyModel(itl_s=0.01, jitter=0.2, slowdown_per_seq=0)
    rng = random.Random(1)
    values = [model.itl(1, rng) for _ in range(500)]
    assert min(values) >= 0.008 - 1e-12 and max(values) <= 0.012 + 1e-12
    assert max(values) - min(values) > 0.003


def test_slow_fault_multiplies_with_floors():
    model = LatencyModel(ttft_s=0.05, itl_s=0.01, prefill_s_per_token=0, jitter=0, slowdown_per_seq=0)
    rng = random.Random(0)
    assert model.ttft(0, 1, rng, slow=True) == pytest.approx(0.05 * SLOW_FACTOR)
    assert model.itl(1, rng, slow=True) == pytest.approx(0.01 * SLOW_FACTOR)
    zero = LatencyModel(ttft_s=0, itl_s=0, prefill_s_per_token=0, jitter=0)
    assert zero.is_zero
    assert zero.ttft(10, 1, rng) == 0 and zero.itl(1, rng) == 0
    assert zero.ttft(10, 1, rng, slow=True) == SLOW_MIN_TTFT_S
    assert zero.itl(1, rng, slow=True) == SLOW_MIN_ITL_S

"""Sliding-window percentiles and rates from cumulative histogram/counter deltas."""

import math

import pytest

from gpufleet.agent.window import CounterWindow, HistogramSnapshot, HistogramWindow, histogram_quantile

TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, math.inf)


def snapshot(observations, bounds=TTFT_BOUNDS):
    buckets = tuple((le, float(sum(1 for o in observations if o <= le))) for le in bounds)
    return HistogramSnapshot(buckets=buckets, count=float(len(observations)), total=float(sum(observations)))


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    # 50 in (0.1, 0.25], 50 in (0.25, 0.5]: the median is the 0.25 boundary, p95 is 90% into the upper bucket
    hist = snapshot([0.2] * 50 + [0.3] * 50)
    assert histogram_quantile(0.5, hist) == pytest.approx(0.25)
    assert histogram_quantile(0.95, hist) == pytest.approx(0.25 + 0.25 * 0.9)


def test_a_single_populated_bucket_answers_its_mean_not_the_bucket_edge():
    hist = snapshot([0.2] * 40)
    assert histogram_quantile(0.95, hist) == pytest.approx(0.2)
    assert histogram_quantile(0.5, hist) == pytest.approx(0.2)


def test_quantile_without_observations_is_none_and_inf_bucket_answers_the_last_bound():
    assert histogram_quantile(0.95, snapshot([])) is None
    assert histogram_quantile(0.99, snapshot([0.05] * 10 + [9.0] * 90)) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        histogram_quantile(1.5, snapshot([0.1]))


def test_window_only_counts_observations_of_the_last_seconds():
    window = HistogramWindow(window_s=60)
    old = [0.9] * 100  # slow requests long ago
    window.observe(0, snapshot(old))
    window.observe(30, snapshot(old))
    assert window.quantile(0.95) is None  # nothing new in the window yet
    window.observe(70, snapshot(old + [0.05] * 20))
    # the base is now the sample at t=30 (still covering the window), so only the new fast requests count
    assert window.count() == 20
    assert window.quantile(0.95) == pytest.approx(0.05)
    window.observe(200, snapshot(old + [0.05] * 20 + [0.3] * 10))
    assert window.count() == 10  # the fast ones slid out
    assert window.quantile(0.5) == pytest.approx(0.3)


def test_window_survives_a_counter_reset_of_a_restarted_vllm():
    window = HistogramWindow(window_s=60)
    window.observe(0, snapshot([0.2] * 100))
    window.observe(1, snapshot([0.2] * 110))
    window.observe(2, snapshot([0.6] * 3))  # vLLM restarted: counters start again from zero
    assert window.quantile(0.95) is None
    window.observe(3, snapshot([0.6] * 5))
    assert window.count() == 2
    assert window.quantile(0.95) == pytest.approx(0.6)


def test_counter_window_rate_and_reset():
    window = CounterWindow(window_s=10)
    assert window.rate() == 0.0
    window.observe(0, 100)
    window.observe(5, 150)
    assert window.rate() == pytest.approx(10.0)
    window.observe(20, 160)  # the sample at 0 slid out; base is t=5
    assert window.rate() == pytest.approx(10 / 15)
    window.observe(21, 3)  # reset
    assert window.rate() == 0.0
    window.observe(23, 7)
    assert window.rate() == pytest.approx(2.0)

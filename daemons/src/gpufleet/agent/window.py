"""Percentiles and rates over a sliding window, from the deltas of cumulative counters.

vLLM exports cumulative histograms (``..._bucket{le=...}``, ``_count``, ``_sum``) that
grow for the life of the process. Keeping timestamped snapshots and subtracting the
oldest one inside the window from the newest gives the histogram of the last N seconds,
the same way Prometheus' ``histogram_quantile(rate(...[1m]))`` does. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class HistogramSnapshot:
    """A cumulative histogram at one moment: ``buckets`` as sorted (upper bound, count)."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    total: float  # the ``_sum``

    def minus(self, older: HistogramSnapshot) -> HistogramSnapshot:
        old = dict(older.buckets)
        return HistogramSnapshot(
            buckets=tuple((le, max(0.0, c - old.get(le, 0.0))) for le, c in self.buckets),
            count=max(0.0, self.count - older.count),
            total=max(0.0, self.total - older.total),
        )

    def reset_since(self, older: HistogramSnapshot) -> bool:
        """True when counters went down: the process behind them restarted."""
        return self.count < older.count or self.total < older.total - 1e-9


def histogram_quantile(q: float, hist: HistogramSnapshot) -> float | None:
    """The q-quantile (0..1) of a (delta) histogram, or None without observations.

    Linear interpolation inside the bucket, as Prometheus does; the lowest bucket starts
    at 0 and a quantile in the +Inf bucket answers the highest finite bound. One
    refinement: when every observation falls into a single bucket, the mean (``_sum`` /
    ``_count``) is a far better estimate than interpolating across the bucket's width
    (e.g. a steady 200 ms TTFT in the 100–250 ms bucket would read as 243 ms otherwise).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside 0..1")
    if hist.count <= 0 or not hist.buckets:
        return None
    rank = q * hist.count
    lower, prev_count = 0.0, 0.0
    populated = [i for i, (_, c) in enumerate(hist.buckets)
                 if c - (hist.buckets[i - 1][1] if i else 0.0) > 0]
    for le, cumulative in hist.buckets:
        if cumulative >= rank and cumulative > prev_count:
            if math.isinf(le):
                return lower
            if len(populated) == 1 and hist.total > 0:
                return min(max(hist.total / hist.count, lower), le)
            in_bucket = cumulative - prev_count
            return lower + (le - lower) * (rank - prev_count) / in_bucket
        lower, prev_count = le, cumulative
    return lower


class CounterWindow:
    """The increase per second of a monotonically growing counter over the window."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def observe(self, now: float, value: float) -> None:
        if self._samples and value < self._samples[-1][1]:
            self._samples.clear()  # counter reset: the process restarted
        self._samples.append((now, value))
        _trim(self._samples, now, self.window_s)

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0


class HistogramWindow:
    """Quantiles of the observations that arrived within the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, HistogramSnapshot]] = deque()

    def observe(self, now: float, snapshot: HistogramSnapshot) -> None:
        if self._samples and snapshot.reset_since(self._samples[-1][1]):
            self._samples.clear()
        self._samples.append((now, snapshot))
        _trim(self._samples, now, self.window_s)

    def delta(self) -> HistogramSnapshot | None:
        if not self._samples:
            return None
        if len(self._samples) == 1:
            # Nothing older is known: no observation can be attributed to the window yet.
            return None
        return self._samples[-1][1].minus(self._samples[0][1])

    def quantile(self, q: float) -> float | None:
        delta = self.delta()
        return None if delta is None else histogram_quantile(q, delta)

    def count(self) -> float:
        delta = self.delta()
        return 0.0 if delta is None else delta.count


def _trim(samples: deque, now: float, window_s: float) -> None:
    """Keep one sample at or before ``now - window_s`` as the base of the delta."""
    while len(samples) >= 2 and samples[1][0] <= now - window_s:
        samples.popleft()

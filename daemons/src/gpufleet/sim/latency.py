"""The cost model of the step engine: how long one engine step lasts, how long a newly
admitted sequence waits before its prefill (the ``--ttft-ms`` base), and the ``slow`` fault.

A step lasts ``step_s + step_s_per_token × batched tokens``, times the batching slowdown
``1 + slowdown_per_seq × (running − 1)``, ± jitter, × ``time_scale``: one long prefill in the
batch makes that step long for every sequence in it, as on a GPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# The ``slow`` fault: every latency of the sequence 10 times longer, with floors so that it
# stays measurable even when the base latencies are zero (benchmarks run with zero latency).
SLOW_FACTOR = 10.0
SLOW_MIN_TTFT_S = 0.2
SLOW_MIN_ITL_S = 0.02


@dataclass(frozen=True)
class StepCost:
    step_s: float = 0.008               # fixed cost of a step (the decode ITL of a lone sequence)
    step_s_per_token: float = 0.00002   # cost of each batched token (prefill chunks and decodes)
    ttft_s: float = 0.040               # time to first token of a lone one-token prompt
    jitter: float = 0.1
    slowdown_per_seq: float = 0.01
    time_scale: float = 1.0

    @property
    def is_zero(self) -> bool:
        return self.step_s == 0 and self.step_s_per_token == 0 and self.ttft_s == 0

    def _jittered(self, value: float, rng: random.Random) -> float:
        if self.jitter and value:
            value *= 1.0 + rng.uniform(-self.jitter, self.jitter)
        return value * self.time_scale

    def step(self, tokens: int, running: int, rng: random.Random) -> float:
        """Seconds one engine step over ``tokens`` batched tokens takes, with ``running`` sequences."""
        base = self.step_s + self.step_s_per_token * tokens
        if self.slowdown_per_seq and running > 1:
            base *= 1.0 + self.slowdown_per_seq * (running - 1)
        return self._jittered(base, rng)

    def hold(self, rng: random.Random, slow: bool = False) -> float:
        """Seconds from admission to the first prefill chunk: what ``ttft_s`` adds beyond the
        prefill step itself (tokenisation, scheduling, the API server…), charged to nobody else."""
        if slow:
            return self._jittered(max(self.ttft_s * SLOW_FACTOR, SLOW_MIN_TTFT_S), rng)
        return self._jittered(max(self.ttft_s - self.step_s, 0.0), rng)

    def slow_gap(self, rng: random.Random) -> float:
        """The ``slow`` fault's extra wait after each token of a sequence (so its ITL is ~10x)."""
        return self._jittered(max(self.step_s * (SLOW_FACTOR - 1), SLOW_MIN_ITL_S), rng)

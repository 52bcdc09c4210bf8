"""The latency model: time to first token and inter-token latency, as functions of the
prompt length, the number of running sequences, jitter and the ``slow`` fault."""

from __future__ import annotations

import random
from dataclasses import dataclass

# The ``slow`` fault: every latency 10 times longer, with floors so that it stays
# measurable even when the base latencies are zero (benchmarks run with zero latency).
SLOW_FACTOR = 10.0
SLOW_MIN_TTFT_S = 0.2
SLOW_MIN_ITL_S = 0.02


@dataclass(frozen=True)
class LatencyModel:
    ttft_s: float = 0.040
    itl_s: float = 0.008
    prefill_s_per_token: float = 0.00002
    jitter: float = 0.1
    slowdown_per_seq: float = 0.01

    @property
    def is_zero(self) -> bool:
        return self.ttft_s == 0 and self.itl_s == 0 and self.prefill_s_per_token == 0

    def batch_factor(self, running: int) -> float:
        """How much slower a step is with ``running`` sequences in the batch."""
        return 1.0 + self.slowdown_per_seq * max(running - 1, 0)

    def _jittered(self, value: float, rng: random.Random) -> float:
        if self.jitter and value:
            return value * (1.0 + rng.uniform(-self.jitter, self.jitter))
        return value

    def ttft(self, prompt_tokens: int, running: int, rng: random.Random, slow: bool = False) -> float:
        """Seconds from being scheduled to the first token (prefill), not counting queueing."""
        base = (self.ttft_s + self.prefill_s_per_token * prompt_tokens) * self.batch_factor(running)
        if slow:
            base = max(base * SLOW_FACTOR, SLOW_MIN_TTFT_S)
        return self._jittered(base, rng)

    def itl(self, running: int, rng: random.Random, slow: bool = False) -> float:
        """Seconds between two tokens of one sequence."""
        base = self.itl_s * self.batch_factor(running)
        if slow:
            base = max(base * SLOW_FACTOR, SLOW_MIN_ITL_S)
        return self._jittered(base, rng)

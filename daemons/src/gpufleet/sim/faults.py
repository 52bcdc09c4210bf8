"""Fault injection: which fault (if any) a request gets, and the ``/sim/faults`` payload.

Modes: ``error`` (HTTP 500 in OpenAI's error shape), ``hang`` (never answer), ``reset``
(close the TCP connection abruptly; streams after a few chunks), ``slow`` (10x slower
tokens). Scope ``completions`` touches only the completion endpoints; ``all`` also
``/health``, ``/v1/models`` and ``/metrics``, like a hung or broken vLLM.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

MODES = ("none", "error", "hang", "reset", "slow")
SCOPES = ("completions", "all")
# A stream with the ``reset`` fault is cut after this many chunks.
RESET_STREAM_AFTER_CHUNKS = 3


@dataclass(frozen=True)
class FaultConfig:
    mode: str = "none"
    rate: float = 0.0
    scope: str = "completions"

    def as_dict(self) -> dict:
        return asdict(self)


def validate_update(current: FaultConfig, body: object) -> FaultConfig:
    """The configuration after applying a ``POST /sim/faults`` body (fields optional);
    raises ValueError with a message for the client."""
    if not isinstance(body, dict):
        raise ValueError('the body must be a JSON object like {"mode": "error", "rate": 0.5}')
    unknown = set(body) - {"mode", "rate", "scope"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}: expected mode, rate, scope")
    changes = {}
    if "mode" in body:
        if body["mode"] not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        changes["mode"] = body["mode"]
    if "rate" in body:
        rate = body["rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError("rate must be a number from 0 to 1")
        changes["rate"] = float(rate)
    if "scope" in body:
        if body["scope"] not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        changes["scope"] = body["scope"]
    return replace(current, **changes)


class FaultInjector:
    def __init__(self, config: FaultConfig, rng: random.Random):
        self.config = config
        self._rng = rng
        self.injected = 0

    def pick(self, completion: bool) -> str | None:
        """The fault for this request, or None."""
        config = self.config
        if config.mode == "none" or config.rate <= 0:
            return None
        if not completion and config.scope != "all":
            return None
        if config.rate >= 1 or self._rng.random() < config.rate:
            self.injected += 1
            return config.mode
        return None

    def as_dict(self) -> dict:
        return {**self.config.as_dict(), "injected": self.injected}

"""The Redis contract between the control plane (writer) and the routers (readers).

Every key carries a prefix (``gpufleet:`` by default, ``GPUFLEET_REDIS_PREFIX`` to change).
See docs/contracts.md for the fields of each key.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

DEFAULT_PREFIX = "gpufleet:"

# Event types published on the ``events`` channel.
EVENT_READY = "ready"
EVENT_UNREADY = "unready"
EVENT_DRAINING = "draining"
EVENT_REMOVED = "removed"
EVENT_KEYS = "keys"  # API keys changed (a revoke): routers drop their key cache
EVENT_TYPES = (EVENT_READY, EVENT_UNREADY, EVENT_DRAINING, EVENT_REMOVED, EVENT_KEYS)

# Fields of the ``worker:{id}`` hash.
WORKER_FIELDS = ("url", "model_id", "status", "queue_depth", "running", "kv_cache_usage",
                 "gpu_util", "ttft_p95_ms", "updated_at")


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = DEFAULT_PREFIX

    def ready_set(self, model_id: str) -> str:
        return f"{self.prefix}workers:ready:{model_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    @property
    def models(self) -> str:
        return f"{self.prefix}models"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    def apikey(self, sha256_hex: str) -> str:
        return f"{self.prefix}apikey:{sha256_hex}"

    @property
    def apikey_pattern(self) -> str:
        return f"{self.prefix}apikey:*"

    def inflight(self, worker_id: str) -> str:
        return f"{self.prefix}inflight:{worker_id}"

    def inflight_tokens(self, worker_id: str) -> str:
        return f"{self.prefix}inflight_tokens:{worker_id}"

    def prefix_index(self, worker_id: str) -> str:
        return f"{self.prefix}prefix:{worker_id}"


def encode_event(event_type: str, worker_id: str | None = None, model_id: str | None = None,
                 **extra) -> str:
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    body = {"type": event_type, "worker_id": worker_id, "model_id": model_id, "ts": time.time()}
    body.update(extra)
    return json.dumps(body, separators=(",", ":"))


def decode_event(raw: str | bytes) -> dict | None:
    """The event as a dict, or None when the message is not one of ours."""
    try:
        body = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("type") not in EVENT_TYPES:
        return None
    return body

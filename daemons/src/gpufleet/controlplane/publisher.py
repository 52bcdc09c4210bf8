"""The only writer of the Redis contract (see docs/contracts.md).

The control plane's API (on heartbeats, drains and key changes) and the reconciler (every
cycle) publish through this class, and tests publish simulated workers and keys with it,
so what the routers read is written in exactly one way.

Every write is idempotent: publishing a worker that is already published only refreshes
its hash and TTL; unpublishing one that is not published changes nothing. Events go out
only on a transition (a worker entering or leaving a ready set, a key deleted), so the
routers' pub/sub listeners are not flooded by the reconciler's periodic refreshes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpufleet.common.rediskeys import (
    EVENT_DRAINING,
    EVENT_KEYS,
    EVENT_READY,
    EVENT_REMOVED,
    EVENT_UNREADY,
    RedisKeys,
    encode_event,
)

log = logging.getLogger(__name__)

UNPUBLISH_REASONS = (EVENT_UNREADY, EVENT_DRAINING, EVENT_REMOVED)

# Remove a worker from its model's ready set and, atomically, drop the model from the
# ``models`` set when no routable worker is left (so a concurrent publish of another
# worker of that model cannot be undone between SCARD and SREM).
# KEYS: ready_set, models, worker_hash   ARGV: worker_id, model_id, mark ("" = delete hash), now
# Returns 1 when the worker was in the ready set, 0 otherwise.
_UNPUBLISH_LUA = """
local removed = redis.call('SREM', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[2])
end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[3])
elseif redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'status', ARGV[3], 'updated_at', ARGV[4])
end
return removed
"""

# Publish a worker: hash + TTL, ready set, models set, in one step.
# KEYS: worker_hash, ready_set, models   ARGV: ttl_ms, worker_id, model_id, then field/value pairs
# Returns {added_to_ready_set, previous_model_id or ""}.
_PUBLISH_LUA = """
local previous = redis.call('HGET', KEYS[1], 'model_id') or ''
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local added = redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return {added, previous}
"""


@dataclass(frozen=True)
class ApiKeyRecord:
    """An active API key as the routers see it (``apikey:{key_hash}``)."""

    key_hash: str
    key_id: str
    name: str
    models: tuple[str, ...] = ()
    rpm: int = 0

    @classmethod
    def coerce(cls, row: ApiKeyRecord | Mapping | tuple) -> ApiKeyRecord:
        if isinstance(row, ApiKeyRecord):
            return row
        if isinstance(row, Mapping):
            return cls(row["key_hash"], str(row["key_id"]), row.get("name") or "",
                       tuple(row.get("models") or ()), int(row.get("rpm") or 0))
        key_hash, key_id, name, models, rpm = row
        return cls(key_hash, str(key_id), name or "", tuple(models or ()), int(rpm or 0))

    def fields(self) -> dict[str, str]:
        return {"key_id": self.key_id, "name": self.name, "models": ",".join(self.models),
                "rpm": str(int(self.rpm))}


def _num(value) -> str:
    """Numbers as decimal strings (the contract); None counts as 0."""
    if value is None:
        return "0"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(round(number, 6))


class Publisher:
    def __init__(self, redis_client, keys: RedisKeys, heartbeat_interval_s: float):
        self.redis = redis_client
        self.keys = keys
        self.heartbeat_interval_s = float(heartbeat_interval_s)
        self._publish_script = redis_client.register_script(_PUBLISH_LUA)
        self._unpublish_script = redis_client.register_script(_UNPUBLISH_LUA)

    @property
    def worker_ttl_ms(self) -> int:
        return max(1000, int(3 * self.heartbeat_interval_s * 1000))

    # -- workers -------------------------------------------------------------------------

    def publish_worker_row(self, row: Mapping) -> bool:
        """Make a ``workers`` row routable, with the load its last heartbeat reported."""
        return self.publish_worker(**_row_fields(row))

    def publish_worker(self, worker_id: str, model_id: str, url: str, status: str = "ready",
                       queue_depth=0, running=0, kv_cache_usage=0.0, gpu_util=0.0,
                       ttft_p95_ms=0.0) -> bool:
        """Make the worker routable for ``model_id``. Returns True when it newly entered
        the ready set (a ``ready`` event was published)."""
        keys, argv = self._publish_call(worker_id, model_id, url, status, queue_depth, running, kv_cache_usage,
                                        gpu_util, ttft_p95_ms)
        return self._after_publish(worker_id, model_id, argv, self._publish_script(keys=keys, args=argv))

    def apply(self, publish: list[Mapping], unpublish: list[tuple[str, str, str]]) -> int:
        """Many workers at once, in one round trip (the reconciler's cycle): publish these
        ``workers`` rows, unpublish these ``(worker_id, model_id, reason)``. Events go out
        exactly as one call each would send them. Returns the number of transitions."""
        if not publish and not unpublish:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        calls = []
        for row in publish:
            fields = _row_fields(row)
            keys, argv = self._publish_call(**fields)
            self._publish_script(keys=keys, args=argv, client=pipe)
            calls.append(("publish", fields["worker_id"], fields["model_id"], argv))
        for worker_id, model_id, reason in unpublish:
            keys, argv = self._unpublish_call(worker_id, model_id, reason)
            self._unpublish_script(keys=keys, args=argv, client=pipe)
            calls.append(("unpublish", worker_id, model_id, reason))
        transitions = 0
        for (kind, worker_id, model_id, extra), result in zip(calls, pipe.execute(), strict=True):
            if kind == "publish":
                transitions += self._after_publish(worker_id, model_id, extra, result)
            else:
                transitions += self._after_unpublish(worker_id, model_id, extra, result)
        return transitions

    def _publish_call(self, worker_id: str, model_id: str, url: str, status: str = "ready", queue_depth=0,
                      running=0, kv_cache_usage=0.0, gpu_util=0.0, ttft_p95_ms=0.0):
        fields = {
            "url": url.rstrip("/"), "model_id": model_id, "status": status,
            "queue_depth": _num(queue_depth), "running": _num(running),
            "kv_cache_usage": _num(kv_cache_usage), "gpu_util": _num(gpu_util),
            "ttft_p95_ms": _num(ttft_p95_ms), "updated_at": _num(round(time.time(), 3)),
        }
        argv = [self.worker_ttl_ms, worker_id, model_id]
        for name, value in fields.items():
            argv += [name, value]
        return [self.keys.worker(worker_id), self.keys.ready_set(model_id), self.keys.models], argv

    def _after_publish(self, worker_id: str, model_id: str, argv: list, result) -> bool:
        added, previous_model = result
        if isinstance(previous_model, bytes):
            previous_model = previous_model.decode()
        if previous_model and previous_model != model_id:
            # the worker now serves another model: it must not stay routable for the old one
            status, updated_at = argv[argv.index("status") + 1], argv[argv.index("updated_at") + 1]
            self._unpublish_script(
                keys=[self.keys.ready_set(previous_model), self.keys.models, self.keys.worker(worker_id)],
                args=[worker_id, previous_model, status, updated_at])
            self._event(EVENT_UNREADY, worker_id, previous_model)
        if int(added):
            log.info("worker %s is routable for %s at %s", worker_id, model_id, argv[argv.index("url") + 1])
            self._event(EVENT_READY, worker_id, model_id)
            return True
        return False

    def unpublish_worker(self, worker_id: str, model_id: str, reason: str = EVENT_UNREADY) -> bool:
        """Take the worker out of rotation at once. ``unready`` and ``draining`` keep its
        hash (marked with that status, expiring on its own TTL); ``removed`` deletes it.
        Returns True (and publishes the event) when it was in the ready set."""
        keys, argv = self._unpublish_call(worker_id, model_id, reason)
        return self._after_unpublish(worker_id, model_id, reason, self._unpublish_script(keys=keys, args=argv))

    def _unpublish_call(self, worker_id: str, model_id: str, reason: str):
        if reason not in UNPUBLISH_REASONS:
            raise ValueError(f"reason must be one of {UNPUBLISH_REASONS}, not {reason!r}")
        mark = "" if reason == EVENT_REMOVED else reason
        return ([self.keys.ready_set(model_id), self.keys.models, self.keys.worker(worker_id)],
                [worker_id, model_id, mark, _num(round(time.time(), 3))])

    def _after_unpublish(self, worker_id: str, model_id: str, reason: str, removed) -> bool:
        if int(removed):
            log.info("worker %s left the ready set of %s (%s)", worker_id, model_id, reason)
            self._event(reason, worker_id, model_id)
            return True
        return False

    def ready_workers(self) -> dict[str, set[str]]:
        """``{model_id: {worker_id, ...}}`` as currently published (the reconciler's view of
        what the routers see)."""
        result: dict[str, set[str]] = {}
        prefix = self.keys.ready_set("")
        for key in self.redis.scan_iter(match=prefix + "*", count=500):
            key = key.decode() if isinstance(key, bytes) else key
            members = self.redis.smembers(key)
            if members:
                result[key[len(prefix):]] = {m.decode() if isinstance(m, bytes) else m for m in members}
        return result

    def prune_models(self) -> None:
        """Drop model ids whose ready set is empty from ``models`` (repairs partial writes)."""
        for model in self.redis.smembers(self.keys.models):
            model = model.decode() if isinstance(model, bytes) else model
            if not self.redis.scard(self.keys.ready_set(model)):
                self.redis.srem(self.keys.models, model)

    # -- API keys ------------------------------------------------------------------------

    def publish_api_key(self, key_hash_hex: str, key_id: str, name: str, models: Iterable[str] = (),
                        rpm: int = 0) -> None:
        record = ApiKeyRecord(key_hash_hex, str(key_id), name, tuple(models or ()), int(rpm or 0))
        self._write_key(self.redis.pipeline(transaction=True), record).execute()

    def _write_key(self, pipe, record: ApiKeyRecord):
        key = self.keys.apikey(record.key_hash)
        pipe.delete(key)
        pipe.hset(key, mapping=record.fields())
        return pipe

    def delete_api_key(self, key_hash_hex: str, key_id: str | None = None) -> bool:
        """Delete the key from Redis and tell the routers to drop their key cache."""
        deleted = bool(self.redis.delete(self.keys.apikey(key_hash_hex)))
        self._event(EVENT_KEYS, key_id=key_id)
        return deleted

    def sync_api_keys(self, rows: Iterable[ApiKeyRecord | Mapping | tuple]) -> dict[str, int]:
        """Make ``apikey:*`` exactly the given active keys: add missing or changed ones,
        delete any other. Publishes a ``keys`` event when something was deleted or changed."""
        wanted = {r.key_hash: r for r in (ApiKeyRecord.coerce(row) for row in rows)}
        prefix = self.keys.apikey("")
        present = []
        for key in self.redis.scan_iter(match=self.keys.apikey_pattern, count=500):
            present.append(key.decode() if isinstance(key, bytes) else key)
        stale = [k for k in present if k[len(prefix):] not in wanted]
        current = {}
        if present:
            pipe = self.redis.pipeline(transaction=False)
            for key in present:
                pipe.hgetall(key)
            current = dict(zip(present, pipe.execute(), strict=True))
        pipe = self.redis.pipeline(transaction=True)
        added = changed = 0
        for key_hash, record in wanted.items():
            existing = current.get(prefix + key_hash)
            if existing is None:
                added += 1
            elif _decoded(existing) != record.fields():
                changed += 1
            else:
                continue
            self._write_key(pipe, record)
        if stale:
            pipe.delete(*stale)
        pipe.execute()
        if stale or changed:
            self._event(EVENT_KEYS)
        if stale or changed or added:
            log.info("api keys synced: %d added, %d changed, %d deleted", added, changed, len(stale))
        return {"added": added, "changed": changed, "deleted": len(stale)}

    # -- events --------------------------------------------------------------------------

    def _event(self, event_type: str, worker_id: str | None = None, model_id: str | None = None,
               **extra) -> None:
        self.redis.publish(self.keys.events, encode_event(event_type, worker_id, model_id, **extra))


def _row_fields(row: Mapping) -> dict:
    """``publish_worker``'s arguments for a ``workers`` row."""
    return {"worker_id": row["worker_id"], "model_id": row["model_id"], "url": row["advertise_url"],
            "status": "ready", "queue_depth": row["queue_depth"], "running": row["running"],
            "kv_cache_usage": row["kv_cache_usage"], "gpu_util": row["gpu_util"],
            "ttft_p95_ms": row["ttft_p95_ms"]}


def _decoded(mapping: Mapping) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in mapping.items()}

"""The router's view of the routable workers: read from Redis, kept fresh by events.

A full re-read (``models`` → ``workers:ready:{model}`` → ``worker:{id}`` hashes, three
pipelined round-trips) runs every ``refresh_interval_s`` in case an event was missed; the
``events`` channel makes a drained, unready or removed worker disappear from the view
within milliseconds, and a ``ready`` worker appear. The view is an immutable snapshot
swapped in one assignment, so the request path reads it without a lock.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from gpufleet.common.rediskeys import (
    EVENT_DRAINING,
    EVENT_KEYS,
    EVENT_READY,
    EVENT_REMOVED,
    EVENT_UNREADY,
    RedisKeys,
    decode_event,
)

from .redisconn import REDIS_ERRORS, RedisLink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Worker:
    id: str
    model_id: str
    url: str
    queue_depth: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def worker_from_hash(worker_id: str, model_id: str, fields: dict) -> Worker | None:
    url = (fields or {}).get("url")
    if not url:
        return None  # hash expired (stale heartbeat): not routable
    return Worker(worker_id, model_id, url.rstrip("/"), _num(fields.get("queue_depth")),
                  _num(fields.get("running")), _num(fields.get("kv_cache_usage")))


class Registry:
    def __init__(self, link: RedisLink, keys: RedisKeys, refresh_interval_s: float = 2.0):
        self.link = link
        self.keys = keys
        self.refresh_interval_s = refresh_interval_s
        self.by_model: dict[str, tuple[Worker, ...]] = {}
        self.known_models: set[str] = set()  # every model seen: unknown → 404, known but empty → 503
        self.on_keys_changed = None
        self.on_view_changed = None  # called with the new view: what left it can be forgotten
        self._stop = threading.Event()
        self._refresh_now = threading.Event()

    # -- reading --------------------------------------------------------------------------

    def workers(self, model: str) -> tuple[Worker, ...]:
        return self.by_model.get(model, ())

    def models(self) -> list[str]:
        return sorted(m for m, ws in self.by_model.items() if ws)

    def worker_count(self) -> int:
        return sum(len(ws) for ws in self.by_model.values())

    # -- refreshing -----------------------------------------------------------------------

    def refresh(self) -> bool:
        """Re-read the whole view from Redis; False (view kept) when Redis is unreachable."""
        client = self.link.client
        try:
            models = sorted(client.smembers(self.keys.models))
            pipe = client.pipeline(transaction=False)
            for model in models:
                pipe.smembers(self.keys.ready_set(model))
            ready = [sorted(ids) for ids in pipe.execute()] if models else []
            pairs = [(model, wid) for model, ids in zip(models, ready, strict=True) for wid in ids]
            pipe = client.pipeline(transaction=False)
            for _, wid in pairs:
                pipe.hgetall(self.keys.worker(wid))
            hashes = pipe.execute() if pairs else []
        except REDIS_ERRORS as exc:
            self.link.mark_down(exc)
            return False
        view: dict[str, list[Worker]] = {m: [] for m in models}
        for (model, wid), fields in zip(pairs, hashes, strict=True):
            worker = worker_from_hash(wid, model, fields)
            if worker is not None and fields.get("model_id", model) == model:
                view[model].append(worker)
        self._swap({m: tuple(ws) for m, ws in view.items()})
        self.known_models.update(models)
        return True

    def _swap(self, view: dict[str, tuple[Worker, ...]]) -> None:
        self.by_model = view
        if self.on_view_changed:
            self.on_view_changed(view)

    def apply_event(self, event: dict) -> None:
        kind, wid, model = event.get("type"), event.get("worker_id"), event.get("model_id")
        if kind == EVENT_KEYS:
            if self.on_keys_changed:
                self.on_keys_changed()
        elif kind in (EVENT_UNREADY, EVENT_DRAINING, EVENT_REMOVED) and wid:
            self.drop_worker(wid, model)
        elif kind == EVENT_READY:
            self._refresh_now.set()

    def drop_worker(self, worker_id: str, model: str | None = None) -> None:
        view = dict(self.by_model)
        for m in ([model] if model in view else list(view)):
            ws = view[m]
            kept = tuple(w for w in ws if w.id != worker_id)
            if len(kept) != len(ws):
                view[m] = kept
        self._swap(view)
        log.info("worker %s left the view (event)", worker_id)

    # -- background loops (greenlets under gunicorn's gevent worker) -----------------------

    def start(self) -> None:
        threading.Thread(target=self._refresh_loop, name="registry-refresh", daemon=True).start()
        threading.Thread(target=self._event_loop, name="registry-events", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._refresh_now.set()

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            if self.link.up or self.link.probe():
                self.refresh()
            interval = self.refresh_interval_s if self.link.up else min(1.0, self.refresh_interval_s)
            self._refresh_now.wait(interval)
            self._refresh_now.clear()

    def _event_loop(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.link.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.keys.events)
                # an event may have been missed while unsubscribed
                self._refresh_now.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        event = decode_event(message.get("data"))
                        if event is not None:
                            self.apply_event(event)
            except REDIS_ERRORS as exc:
                self.link.mark_down(exc)
                self._stop.wait(0.5)
            except Exception:  # noqa: BLE001 - the listener must survive anything
                log.exception("event listener failed; restarting it")
                self._stop.wait(0.5)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001
                        pass

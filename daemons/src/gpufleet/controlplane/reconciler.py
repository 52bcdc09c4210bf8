"""``gpufleet-reconciler``: probes the workers, publishes the routable ones to Redis,
re-syncs API keys and runs the scaling loop — on the leader only.

Several may run (one per control-plane host); they elect a leader with a PostgreSQL
advisory lock (``leader.py``). Followers poll the lock every reconcile interval and take
over within one interval when the leader dies.

Each cycle:
1. probe ``GET {agent_url}/readyz`` of every worker of a live instance, concurrently, each
   within ``GPUFLEET_PROBE_TIMEOUT_S`` overall and all within the cycle's probe budget
   (``prober.py``: whatever a worker sends costs only that worker), and record the results;
2. decide routability with ``routability.assess`` (a pure function);
3. publish routable workers (hash + TTL refresh, ready set, ``models``; ``ready`` event
   when new) and unpublish the others (``unready``/``draining``/``removed`` event);
4. remove from Redis any published worker the database no longer knows;
5. make ``apikey:*`` exactly the active keys of PostgreSQL (``keysync.py``: serialized
   with the admin API's key changes, so a cycle never undoes a create or a revoke).

Between cycles the leader listens for prompt-probe requests (``prompt.py``): a worker
that just said ``ready`` is probed at once instead of at the next cycle.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import redis

from gpufleet.common.config import exit_on_config_error
from gpufleet.common.logs import setup_logging
from gpufleet.common.rediskeys import EVENT_REMOVED, RedisKeys
from gpufleet.controlplane import store
from gpufleet.controlplane.config import ControlPlaneConfig
from gpufleet.controlplane.db import Database
from gpufleet.controlplane.keysync import sync_keys
from gpufleet.controlplane.leader import LeaderLock, identity
from gpufleet.controlplane.prober import probe_many
from gpufleet.controlplane.prompt import ProbeRequests
from gpufleet.controlplane.publisher import Publisher
from gpufleet.controlplane.routability import assess_row
from gpufleet.controlplane.scaler import Scaler
from gpufleet.controlplane.scaling import describe as describe_scaling

log = logging.getLogger("gpufleet.reconciler")

# Workers silent for this many stale periods are no longer probed every cycle (a
# deleted VM would otherwise cost a probe timeout forever); a heartbeat brings them back.
_PROBE_SILENT_FACTOR = 20


def probe_budget_s(config: ControlPlaneConfig) -> float:
    """How long a cycle's probes may take: the rest of the cycle (database, Redis, keys)
    must fit in the interval too, whatever the workers do."""
    return max(0.25, 0.6 * config.reconcile_interval_s)


class Reconciler:
    def __init__(self, config: ControlPlaneConfig, db: Database, publisher: Publisher):
        self.config = config
        self.db = db
        self.publisher = publisher
        self._last_health: dict[str, str] = {}
        self._prompt_probed: dict[str, float] = {}  # worker id -> monotonic time of its last prompt probe

    def probe(self, rows) -> dict:
        silent_after = self.config.stale_after_s * _PROBE_SILENT_FACTOR
        live = [r for r in rows if r["retired_at"] is None and r["heartbeat_age_s"] is not None
                and r["heartbeat_age_s"] < silent_after]
        # the longest unprobed first: if a cycle's budget cannot cover everyone, the ones
        # left out go first next time
        live.sort(key=lambda r: (r["last_probe_at"] is not None, r["last_probe_at"] or 0))
        targets = {r["worker_id"]: r["agent_url"] for r in live}
        outcome = probe_many(targets, self.config.probe_timeout_s, self.config.probe_concurrency,
                             probe_budget_s(self.config))
        if outcome.results:
            with self.db.cursor() as cur:
                store.record_probes(cur, outcome.results)
        return {"targets": len(targets), "probed": len(outcome.results), "skipped": len(outcome.skipped),
                "probe_ms": round(outcome.seconds * 1000, 1)}

    def prompt_probe(self, worker_ids: set[str], budget_s: float) -> int:
        """Probe workers that asked (a ``ready`` heartbeat) right away, at most once per
        interval each and within ``budget_s`` (the time left before the next cycle), and
        publish the outcome; returns how many were probed."""
        now = time.monotonic()
        due = {w for w in worker_ids
               if now - self._prompt_probed.get(w, float("-inf")) >= self.config.reconcile_interval_s}
        if not due:
            return 0
        with self.db.cursor() as cur:
            rows = [r for r in (store.get_worker(cur, w) for w in due) if r is not None and r["retired_at"] is None]
        targets = {r["worker_id"]: r["agent_url"] for r in rows}
        outcome = probe_many(targets, self.config.probe_timeout_s, self.config.probe_concurrency,
                             min(self.config.probe_timeout_s, budget_s))
        for worker_id in targets:
            self._prompt_probed[worker_id] = now
        with self.db.cursor() as cur:
            store.record_probes(cur, outcome.results)
            rows = [store.get_worker(cur, w) for w in outcome.results]
        publish, unpublish = [], []
        for row in rows:
            if row is None:
                continue
            verdict = assess_row(row, self.config.stale_after_s)
            if verdict.routable:
                publish.append(row)
            else:
                unpublish.append((row["worker_id"], row["model_id"], verdict.event))
        self.publisher.apply(publish, unpublish)
        return len(outcome.results)

    def reconcile_once(self) -> dict:
        started = time.monotonic()
        with self.db.cursor() as cur:
            rows = store.list_workers(cur)
        probes = self.probe(rows)
        with self.db.cursor() as cur:
            rows = store.list_workers(cur)

        routable: dict[str, set[str]] = {}
        known = {}
        publish, unpublish = [], []
        for row in rows:
            known[row["worker_id"]] = row
            verdict = assess_row(row, self.config.stale_after_s)
            if self._last_health.get(row["worker_id"]) != verdict.health:
                log.info("worker %s (%s): %s%s", row["worker_id"], row["model_id"], verdict.health,
                         f" ({row['last_probe_error']})" if verdict.health == "probe_failed" else "")
                self._last_health[row["worker_id"]] = verdict.health
            if verdict.routable:
                routable.setdefault(row["model_id"], set()).add(row["worker_id"])
                publish.append(row)
            else:
                unpublish.append((row["worker_id"], row["model_id"], verdict.event))
        self.publisher.apply(publish, unpublish)  # one round trip for the whole fleet

        # anything else in a ready set (a worker deleted from the database, or published
        # under another model) leaves at once
        for model_id, members in self.publisher.ready_workers().items():
            for worker_id in members - routable.get(model_id, set()):
                row = known.get(worker_id)
                reason = EVENT_REMOVED if row is None else assess_row(row, self.config.stale_after_s).event
                if reason == "ready":
                    reason = "unready"
                self.publisher.unpublish_worker(worker_id, model_id, reason)
        self.publisher.prune_models()
        sync_keys(self.db, self.publisher)
        for gone in set(self._last_health) - set(known):
            del self._last_health[gone]
        for gone in set(self._prompt_probed) - set(known):
            del self._prompt_probed[gone]

        summary = {"workers": len(rows), **probes,
                   "routable": sum(len(v) for v in routable.values()),
                   "ms": round((time.monotonic() - started) * 1000, 1)}
        return summary

    def record_cycle(self, leader: str, leader_since: float, summary: dict) -> None:
        with self.db.cursor() as cur:
            cur.execute("""
                INSERT INTO reconciler_state (singleton, leader, leader_since, last_cycle_at, last_cycle_ms,
                                              workers, routable)
                VALUES (true, %s, to_timestamp(%s), now(), %s, %s, %s)
                ON CONFLICT (singleton) DO UPDATE SET leader = EXCLUDED.leader,
                    leader_since = EXCLUDED.leader_since, last_cycle_at = now(),
                    last_cycle_ms = EXCLUDED.last_cycle_ms, workers = EXCLUDED.workers,
                    routable = EXCLUDED.routable""",
                        (leader, leader_since, summary["ms"], summary["workers"], summary["routable"]))


def run(config: ControlPlaneConfig, stop: threading.Event) -> None:
    db = Database(config.database_url, maxconn=2, application_name="gpufleet-reconciler")
    client = redis.Redis.from_url(config.redis_url, decode_responses=True, socket_timeout=5,
                                  socket_connect_timeout=5, health_check_interval=30)
    publisher = Publisher(client, RedisKeys(config.redis_prefix), config.heartbeat_interval_s)
    reconciler = Reconciler(config, db, publisher)
    me = identity()
    # also when disabled: it publishes the leader's settings and settles unfinished sequences
    scaler = Scaler(config.scaling, db, publisher, config.stale_after_s,
                    probe_timeout_s=config.probe_timeout_s, me=me)
    lock = LeaderLock(config.database_url)
    asked = ProbeRequests(config.database_url)
    leader_since = 0.0
    waiting_logged = False
    try:
        while not stop.is_set():
            cycle_start = time.monotonic()
            if not lock.held:
                if lock.try_acquire():
                    leader_since = time.time()
                    waiting_logged = False
                    log.info("leader: %s now leads the reconcilers", me)
                else:
                    if not waiting_logged:
                        log.info("follower: another reconciler leads; %s waits to take over", me)
                        waiting_logged = True
                    stop.wait(config.reconcile_interval_s)
                    continue
            elif not lock.still_held():
                log.error("leader: %s lost leadership; back to following", me)
                scaler.step_down()
                continue
            try:
                summary = reconciler.reconcile_once()
                reconciler.record_cycle(me, leader_since, summary)
                log.debug("cycle: %s", summary)
                scaler.maybe_run(time.time())
            except (redis.RedisError, OSError) as exc:
                log.error("cycle failed (redis): %s", exc)
            except Exception:  # noqa: BLE001 - one bad cycle must not kill the loop
                log.exception("cycle failed")
            _wait_for_next_cycle(reconciler, asked, stop, cycle_start + config.reconcile_interval_s)
    finally:
        scaler.shutdown()
        asked.close()
        lock.release()
        db.close()
        client.close()
        log.info("reconciler %s stopped", me)


def _wait_for_next_cycle(reconciler: Reconciler, asked: ProbeRequests, stop: threading.Event,
                         next_cycle_at: float) -> None:
    """Until the next cycle: serve prompt-probe requests as they arrive."""
    while not stop.is_set():
        remaining = next_cycle_at - time.monotonic()
        if remaining <= 0:
            return
        workers = asked.wait(min(remaining, 0.25))  # short slices so a stop is seen promptly
        budget = next_cycle_at - time.monotonic()
        if workers and budget >= 0.1:  # too late: the cycle probes them anyway
            try:
                reconciler.prompt_probe(workers, budget)
            except (redis.RedisError, OSError) as exc:
                log.error("prompt probe failed (redis): %s", exc)
            except Exception:  # noqa: BLE001 - a prompt probe must not kill the loop
                log.exception("prompt probe failed")


@exit_on_config_error
def main() -> None:
    config = ControlPlaneConfig.from_env(need_admin_token=False)
    setup_logging("gpufleet.reconciler", config.log_level)
    log.info("reconciler %s: %s", identity(), config.describe())
    log.info("scaling: %s", describe_scaling(config.scaling))
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run(config, stop)


if __name__ == "__main__":
    main()

"""Prometheus metrics of the control plane: one registry per app.

Counters (registrations, heartbeats, auth failures) live in the serving processes; under
several gunicorn processes ``__main__`` turns on prometheus_client's multiprocess mode so
a scrape sums them. Gauges of the fleet (workers by health, scaling decisions) are read
from PostgreSQL at scrape time, so every replica reports the same fleet-wide numbers.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from gpufleet.controlplane.routability import assess_row

log = logging.getLogger(__name__)

HEALTH_STATES = ("routable", "retired", "draining", "no_heartbeat", "stale", "starting", "unprobed",
                 "probe_failed")


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registrations = Counter("gpufleet_cp_registrations_total", "Worker registrations by result",
                                     ["result"], registry=registry)
        self.heartbeats = Counter("gpufleet_cp_heartbeats_total", "Accepted worker heartbeats by reported status",
                                  ["status"], registry=registry)
        self.auth_failures = Counter("gpufleet_cp_auth_failures_total", "Rejected credentials",
                                     ["kind", "reason"], registry=registry)


class FleetCollector:
    """Reads the fleet from PostgreSQL at scrape time."""

    def __init__(self, db, stale_after_s: float):
        self.db = db
        self.stale_after_s = stale_after_s

    def collect(self):
        from gpufleet.controlplane import scaling_report, store  # noqa: PLC0415 - keep the import graph flat

        workers = GaugeMetricFamily("gpufleet_workers", "Known workers by health", labels=["health"])
        reported = GaugeMetricFamily("gpufleet_workers_reported_status",
                                     "Known workers by the status of their last heartbeat", labels=["status"])
        routable = GaugeMetricFamily("gpufleet_model_routable_workers", "Routable workers per model",
                                     labels=["model_id"])
        cycle = GaugeMetricFamily("gpufleet_reconciler_last_cycle_timestamp_seconds",
                                  "When the leading reconciler last completed a cycle")
        cycle_ms = GaugeMetricFamily("gpufleet_reconciler_last_cycle_duration_seconds",
                                     "How long the leading reconciler's last cycle took")
        up = GaugeMetricFamily("gpufleet_cp_database_up", "Whether the database answered this scrape")
        try:
            with self.db.cursor() as cur:
                rows = store.list_workers(cur)
                scaling = scaling_report.metric_families(cur)
                cur.execute("SELECT extract(epoch FROM last_cycle_at)::float8 AS ts, last_cycle_ms "
                            "FROM reconciler_state")
                reconciler = cur.fetchone()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the DB is down
            log.warning("metrics: database unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        counts = dict.fromkeys(HEALTH_STATES, 0)
        statuses = dict.fromkeys(("starting", "ready", "draining"), 0)
        per_model: dict[str, int] = {}
        for row in rows:
            verdict = assess_row(row, self.stale_after_s)
            counts[verdict.health] = counts.get(verdict.health, 0) + 1
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
            per_model.setdefault(row["model_id"], 0)
            if verdict.routable:
                per_model[row["model_id"]] += 1
        for health, n in counts.items():
            workers.add_metric([health], n)
        for status, n in statuses.items():
            reported.add_metric([status], n)
        for model_id, n in sorted(per_model.items()):
            routable.add_metric([model_id], n)
        families = [up, workers, reported, routable, *scaling]
        if reconciler is not None:  # absent until a reconciler has led once
            cycle.add_metric([], reconciler["ts"])
            cycle_ms.add_metric([], reconciler["last_cycle_ms"] / 1000)
            families += [cycle, cycle_ms]
        yield from families


def exposition(registry: CollectorRegistry, fleet: FleetCollector) -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess  # noqa: PLC0415

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        merged.register(fleet)
        return generate_latest(merged)
    return generate_latest(registry)

"""The router's Prometheus metrics.

With several gunicorn processes the metrics use prometheus_client's multiprocess mode:
the main process points ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory before it forks
(``__main__.py``), each process writes its samples to its own memory-mapped files, and
``/metrics`` (served by whichever process gets the scrape) merges them. Counters and
histograms are summed; the in-flight gauge is summed over live processes; ``redis_up`` is
the minimum over live processes. The breaker states and the routable workers are computed
at scrape time from the host-shared breaker table and the serving process's view, so they
are never stale copies.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from .breaker import STATE_NAMES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RouterMetrics:
    def __init__(self, multiproc_dir: str | None = None):
        self.multiproc_dir = multiproc_dir if multiproc_dir and os.path.isdir(multiproc_dir) else None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gpufleet_router_requests_total", "Requests answered, by model, status and worker",
                                ["model", "status", "worker"], registry=r)
        self.latency = Histogram("gpufleet_router_request_duration_seconds",
                                 "Time from request to the end of the answer", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gpufleet_router_time_to_first_byte_seconds",
                              "Time from request to the first byte of the upstream answer (TTFT for streams)",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.attempts = Counter("gpufleet_router_upstream_attempts_total",
                                "Requests sent to workers, by outcome", ["worker", "outcome"], registry=r)
        self.retries = Counter("gpufleet_router_retries_total", "Requests retried on another worker, by reason",
                               ["reason"], registry=r)
        self.budget_exhausted = Counter("gpufleet_router_retry_budget_exhausted_total",
                                        "Retries refused by the retry budget", registry=r)
        self.breaker_transitions = Counter("gpufleet_router_breaker_transitions_total",
                                           "Circuit breaker state changes", ["worker", "state"], registry=r)
        self.stream_errors = Counter("gpufleet_router_stream_errors_total",
                                     "Streams ended with an SSE error event after output had started", registry=r)
        self.client_disconnects = Counter("gpufleet_router_client_disconnects_total",
                                          "Streams cancelled because the client went away", registry=r)
        self.inflight = Gauge("gpufleet_router_inflight_requests", "Requests being served",
                              registry=r, multiprocess_mode="livesum")
        self.redis_up = Gauge("gpufleet_router_redis_up", "1 when Redis is reachable (minimum over processes)",
                              registry=r, multiprocess_mode="livemin")
        self.key_lookups = Counter("gpufleet_router_key_lookups_total", "API key reads from Redis (cache misses)",
                                   registry=r)
        self._requests = {}
        self._latency = {}
        self._ttft = {}
        self._attempts = {}
        self._scrape_sources = []

    # cached label children: the request path pays a dict lookup, not a labels() call
    def count_request(self, model: str, status: int, worker: str) -> None:
        key = (model, status, worker)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(model, str(status), worker)
        child.inc()

    def observe_latency(self, model: str, seconds: float) -> None:
        child = self._latency.get(model)
        if child is None:
            child = self._latency[model] = self.latency.labels(model)
        child.observe(seconds)

    def observe_ttft(self, model: str, seconds: float) -> None:
        child = self._ttft.get(model)
        if child is None:
            child = self._ttft[model] = self.ttft.labels(model)
        child.observe(seconds)

    def count_attempt(self, worker: str, outcome: str) -> None:
        key = (worker, outcome)
        child = self._attempts.get(key)
        if child is None:
            child = self._attempts[key] = self.attempts.labels(worker, outcome)
        child.inc()

    def add_scrape_source(self, fn) -> None:
        """``fn()`` yields metric families computed at scrape time."""
        self._scrape_sources.append(fn)

    def render(self) -> bytes:
        if self.multiproc_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiproc_dir)
        else:
            registry = CollectorRegistry()
            registry.register(_Forward(self.registry))
        registry.register(_ScrapeTime(self._scrape_sources))
        return generate_latest(registry)


class _Forward:
    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()


class _ScrapeTime:
    def __init__(self, sources):
        self.sources = sources

    def collect(self):
        for fn in self.sources:
            yield from fn()


def breaker_families(breakers, registry_view):
    """``gpufleet_router_breaker_state{worker}`` (0 closed, 1 open, 2 half-open) and
    ``gpufleet_router_breaker_open{worker}`` for every worker in view."""
    states = {w.id: breakers.state(w.id) for ws in registry_view.by_model.values() for w in ws}
    state = GaugeMetricFamily("gpufleet_router_breaker_state",
                              "Circuit breaker per worker: " + ", ".join(f"{k} {v}" for k, v in STATE_NAMES.items()),
                              labels=["worker"])
    opened = GaugeMetricFamily("gpufleet_router_breaker_open", "1 while the worker's breaker is not closed",
                               labels=["worker"])
    for wid, st in sorted(states.items()):
        state.add_metric([wid], st)
        opened.add_metric([wid], 1 if st else 0)
    yield state
    yield opened


def worker_families(registry_view, link):
    routable = GaugeMetricFamily("gpufleet_router_routable_workers", "Workers routable per model (this process's view)",
                                 labels=["model"])
    for model, ws in sorted(registry_view.by_model.items()):
        routable.add_metric([model], len(ws))
    yield routable
    up = GaugeMetricFamily("gpufleet_router_redis_reachable", "1 when the scraped process reaches Redis")
    up.add_metric([], 1 if link.up else 0)
    yield up
    degraded = GaugeMetricFamily("gpufleet_router_degraded",
                                 "1 while the scraped process serves without Redis (unreachable, or slower than "
                                 "the request path's budget), by reason", labels=["reason"])
    if link.ever_up and not link.up:
        degraded.add_metric([link.reason], 1)
    yield degraded

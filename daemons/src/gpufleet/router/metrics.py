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

import json
import logging
import os
import re
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from gpufleet.common.logs import RedactingFilter

from .breaker import STATE_NAMES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROUTER_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 8)

access_log = logging.getLogger("gpufleet.router.access")

# An SSE event or a JSON answer that carries generated text: ``"content":"x`` (chat) or
# ``"text":"x`` (completions); vLLM's first chat delta has an empty content.
_TEXT = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def usage_of(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last ``usage`` object in an answer or SSE chunk,
    found without parsing the whole body (None when absent or null)."""
    start = data.rfind(b'"usage"')
    if start < 0:
        return None
    prompt = _PROMPT_TOKENS.search(data, start)
    completion = _COMPLETION_TOKENS.search(data, start)
    if prompt is None or completion is None:
        return None
    return int(prompt[1]), int(completion[1])


class StreamNotes:
    """Reads a relayed stream as it passes: the moment of its first generated text (TTFT
    as the client sees it) and the final usage chunk (``stream_options.include_usage``).
    Keeps the previous chunk's tail, so an event split across two chunks is still read."""

    __slots__ = ("exchange", "_tail")

    def __init__(self, exchange):
        self.exchange = exchange
        self._tail = b""

    def note(self, chunk: bytes) -> None:
        exchange = self.exchange
        if exchange.ttft is None and _TEXT.search(chunk):
            exchange.ttft = time.perf_counter() - exchange.started
        data = self._tail + chunk
        if b'"completion_tokens"' in data:
            found = usage_of(data)
            if found is not None:
                exchange.usage = found
        self._tail = chunk[-256:]


class RouterMetrics:
    def __init__(self, multiproc_dir: str | None = None, access_log_enabled: bool = False):
        self.access_log_enabled = access_log_enabled
        if access_log_enabled:
            _json_lines_on_stdout(access_log)
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
        self.before_upstream = Histogram("gpufleet_router_time_before_upstream_seconds",
                                         "Time from a request's arrival to its first send to a worker (key check, "
                                         "body, worker choice, lease)", ["model"], buckets=ROUTER_TIME_BUCKETS,
                                         registry=r)
        self.client_ttft = Histogram("gpufleet_router_client_ttft_seconds",
                                     "Streams: time from the request's arrival to the relay of its first generated "
                                     "text (TTFT as the client sees it)", ["model"], buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.attempts_per_request = Histogram("gpufleet_router_attempts_per_request",
                                              "Workers tried per request (1 = no retry)", ["model"],
                                              buckets=ATTEMPT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gpufleet_router_prompt_tokens_total",
                                     "Prompt tokens of answered requests (from usage), by model and API key name",
                                     ["model", "api_key"], registry=r)
        self.completion_tokens = Counter("gpufleet_router_completion_tokens_total",
                                         "Generated tokens of answered requests (from usage; streams: from the final "
                                         "usage chunk when the client asked for it), by model and API key name",
                                         ["model", "api_key"], registry=r)
        self.cache_prompt_tokens = Counter("gpufleet_router_cache_prompt_tokens_total",
                                           "cache_aware policy: estimated prompt tokens of the requests it routed",
                                           ["model"], registry=r)
        self.cache_matched_tokens = Counter("gpufleet_router_cache_matched_tokens_total",
                                            "cache_aware policy: of those, tokens found in the chosen worker's prefix "
                                            "index (predicted prefix-cache hits)", ["model"], registry=r)
        self._requests = {}
        self._latency = {}
        self._ttft = {}
        self._attempts = {}
        self._children = {}
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

    def observe_before_upstream(self, model: str, seconds: float) -> None:
        self._child(self.before_upstream, (model,)).observe(seconds)

    def count_affinity(self, model: str, prompt_tokens: int, matched_tokens: int) -> None:
        """The cache-aware policy's estimate: prompt tokens routed, and how many of them the
        chosen worker's prefix index held (its predicted prefix-cache hits)."""
        if prompt_tokens:
            self._child(self.cache_prompt_tokens, (model,)).inc(prompt_tokens)
        if matched_tokens:
            self._child(self.cache_matched_tokens, (model,)).inc(matched_tokens)

    def _child(self, metric, labels: tuple):
        """A cached label child (the request path pays a dict lookup, not a labels() call)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def account(self, exchange, duration: float) -> None:
        """The figures of a finished request (from ``Exchange.close``): attempts, client TTFT,
        tokens per model and key, and the access log line when it is on."""
        model = exchange.model
        if model:
            if exchange.attempts:
                self._child(self.attempts_per_request, (model,)).observe(exchange.attempts)
            if exchange.ttft is not None:
                self._child(self.client_ttft, (model,)).observe(exchange.ttft)
            if exchange.usage is not None:
                self._child(self.prompt_tokens, (model, exchange.key_name)).inc(exchange.usage[0])
                self._child(self.completion_tokens, (model, exchange.key_name)).inc(exchange.usage[1])
        if self.access_log_enabled:
            usage = exchange.usage or (None, None)
            access_log.info(json.dumps({
                "ts": round(time.time(), 3), "request_id": exchange.request_id, "api_key": exchange.key_name,
                "model": model, "worker": exchange.worker_id, "status": exchange.status or 500,
                "attempts": exchange.attempts,
                "ttft_ms": round(exchange.ttft * 1000, 1) if exchange.ttft is not None else None,
                "duration_ms": round(duration * 1000, 1), "prompt_tokens": usage[0],
                "completion_tokens": usage[1]}, separators=(",", ":")))

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


def _json_lines_on_stdout(logger: logging.Logger) -> None:
    """The access log: bare JSON lines on stdout (the journal under systemd), apart from the
    daemon's own log on stderr."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


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

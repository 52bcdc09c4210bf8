"""``create_app(config)``: the router's Flask application, built inside each gunicorn
process after the fork (nothing runs at import time)."""

from __future__ import annotations

import json
import time

from flask import Flask, Response, request

from gpufleet.common.metrics_access import guard_metrics
from gpufleet.common.rediskeys import RedisKeys

from .admission import Admission, request_id
from .affinity import AffinityRouter
from .attempts import Attempts
from .auth import KeyCache
from .breaker import Breakers, BreakerTable
from .config import RouterConfig
from .exchange import ClientWatch, Ledger
from .leases import LeaseManager
from .metrics import RouterMetrics, breaker_families, worker_families
from .policies import Policy
from .proxy import Proxy
from .ratelimit import RateLimiter
from .redisconn import RedisLink
from .registry import Registry
from .respond import RequestError, error_response
from .retry import RetryBudget, RetryPolicy
from .upstream import Upstreams

PROXIED = frozenset(("/v1/chat/completions", "/v1/completions"))


def _json(payload, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, content_type="application/json")


def _error(err: RequestError) -> Response:
    answer = error_response(err.status, err.message, err.code, err.param, err.headers)
    return Response(answer.body, status=answer.status, headers=answer.headers)


def create_app(config: RouterConfig, breaker_table: BreakerTable | None = None) -> Flask:
    keys = RedisKeys(config.redis_prefix)
    link = RedisLink(config.redis_url, config.redis_timeout_s, budget_s=config.redis_budget_s)
    metrics = RouterMetrics(config.metrics_dir, access_log_enabled=config.access_log)
    link.on_change = lambda up: metrics.redis_up.set(1 if up else 0)
    registry = Registry(link, keys, config.refresh_interval_s)
    leases = LeaseManager(link, keys, config.router_id, config.lease_ttl_s)
    key_cache = KeyCache(link, keys, config.key_cache_ttl_s, config.key_negative_ttl_s,
                         on_lookup=metrics.key_lookups.inc, batcher=leases.batcher)
    registry.on_keys_changed = key_cache.clear
    breakers = Breakers(breaker_table or BreakerTable(shared=False), config.breaker_failures,
                        config.breaker_cooldown_s,
                        probe_timeout_s=config.connect_timeout_s + config.first_byte_timeout_s,
                        on_change=lambda wid, old, new: metrics.breaker_transitions.labels(
                            wid, {0: "closed", 1: "open", 2: "half_open"}[new]).inc())
    upstreams = Upstreams(config.vllm_api_key, config.connect_timeout_s, config.first_byte_timeout_s,
                          config.read_timeout_s, config.pool_maxsize, config.pool_max_idle_s)
    admission = Admission(key_cache, registry, config.max_body_bytes,
                          RateLimiter(link, leases.batcher, config.redis_prefix))
    affinity = AffinityRouter(leases, config.cache) if config.policy == "cache_aware" else None
    attempts = Attempts(policy=Policy(config.policy), leases=leases, breakers=breakers, affinity=affinity,
                        retry=RetryPolicy(config.retries, RetryBudget(config.retry_budget_ratio,
                                                                      config.retry_budget_min_per_s)),
                        upstreams=upstreams, metrics=metrics, max_response_bytes=config.max_response_bytes)
    proxy = Proxy(admission, attempts, Ledger(metrics, leases, breakers, ClientWatch()))
    metrics.redis_up.set(0)
    metrics.add_scrape_source(lambda: breaker_families(breakers, registry))
    metrics.add_scrape_source(lambda: worker_families(registry, link))

    seen: dict[str, str] = {}  # worker id → url of the current view

    def view_changed(view) -> None:
        """Workers that left the view: their breaker slots and connection pools are freed."""
        current = {w.id: w.url for ws in view.values() for w in ws}
        for wid in seen.keys() - current.keys():
            breakers.forget(wid)
        if affinity is not None and seen.keys() - current.keys():
            affinity.local.forget(set(current))
        if seen.keys() - current.keys() or set(seen.values()) - set(current.values()):
            upstreams.retire(set(current.values()))
        seen.clear()
        seen.update(current)

    registry.on_view_changed = view_changed

    app = Flask("gpufleet.router")
    app.config["ROUTER"] = config
    # The router listens where clients are: /metrics is kept to the scrapers' addresses.
    guard_metrics(app, config.metrics_allow_from)
    created = int(time.time())

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "gpufleet",
                "root": model_id, "parent": None}

    @app.get("/v1/models")
    def list_models():
        try:
            key = admission.authenticate(request.environ)
        except RequestError as err:
            return _error(err)
        return _json({"object": "list", "data": [model_card(m) for m in registry.models() if key.allows(m)]})

    @app.get("/v1/models/<path:model_id>")
    def retrieve_model(model_id: str):
        try:
            key = admission.authenticate(request.environ)
        except RequestError as err:
            return _error(err)
        if model_id not in registry.models() or not key.allows(model_id):
            return _error(RequestError(404, f"The model '{model_id}' does not exist.", "model_not_found", "model"))
        return _json(model_card(model_id))

    @app.get("/healthz")
    def healthz():
        return _json({"status": "ok"})

    @app.get("/health")
    def health():
        return Response(b"", status=200)  # vLLM's liveness path, which its tooling probes first

    @app.get("/readyz")
    def readyz():
        body = {"redis": link.up, "workers": registry.worker_count(), "models": len(registry.models())}
        if link.up:
            return _json({"status": "ok", **body})
        if link.ever_up:
            # still serving with the last known workers and keys
            return _json({"status": "degraded", "reason": link.reason, **body})
        return _json({"status": "starting", "reason": "redis not reached yet", **body}, 503)

    @app.get("/metrics")
    def metrics_view():
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.errorhandler(404)
    def not_found(_exc):
        return _error(RequestError(404, f"No route for {request.path}", "unknown_url"))

    @app.errorhandler(405)
    def not_allowed(_exc):
        return _error(RequestError(405, f"{request.method} is not allowed on {request.path}",
                                   "method_not_allowed"))

    @app.after_request
    def tag(response):
        response.headers["X-Request-Id"] = request.environ["gpufleet.request_id"]
        return response

    # The two proxied paths skip Flask's request context and routing (about a tenth of the
    # request path's CPU): Proxy is their WSGI application. Everything else is Flask's.
    flask_wsgi = app.wsgi_app

    def wsgi_app(environ, start_response):
        if environ.get("PATH_INFO") in PROXIED:
            if environ.get("REQUEST_METHOD") == "POST":
                return proxy(environ, start_response)
            environ["gpufleet.request_id"] = request_id(environ)
            err = RequestError(405, f"{environ.get('REQUEST_METHOD')} is not allowed on {environ['PATH_INFO']}: "
                               "use POST", "method_not_allowed", headers=[("Allow", "POST")])
            answer = _error(err)
            answer.headers["X-Request-Id"] = environ["gpufleet.request_id"]
            return answer(environ, start_response)
        environ["gpufleet.request_id"] = request_id(environ)
        return flask_wsgi(environ, start_response)

    app.wsgi_app = wsgi_app

    # first view before the first request, then the background greenlets keep it fresh
    if link.probe():
        registry.refresh()
    if config.background:
        registry.start()
        leases.start()
    return app

"""``create_app(config)``: the router's Flask application, built inside each gunicorn
process after the fork (nothing runs at import time)."""

from __future__ import annotations

import json
import time

from flask import Flask, Response, request

from gpufleet.common.rediskeys import RedisKeys

from .auth import KeyCache
from .breaker import Breakers, BreakerTable
from .config import RouterConfig
from .leases import LeaseManager
from .metrics import RouterMetrics, breaker_families, worker_families
from .policies import Policy
from .proxy import Proxy, RequestError
from .ratelimit import RateLimiter
from .redisconn import RedisLink
from .registry import Registry
from .retry import RetryBudget, RetryPolicy
from .upstream import Upstreams


def _json(payload, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, content_type="application/json")


def create_app(config: RouterConfig, breaker_table: BreakerTable | None = None) -> Flask:
    keys = RedisKeys(config.redis_prefix)
    link = RedisLink(config.redis_url, config.redis_timeout_s)
    metrics = RouterMetrics(config.metrics_dir)
    link.on_change = lambda up: metrics.redis_up.set(1 if up else 0)
    registry = Registry(link, keys, config.refresh_interval_s)
    key_cache = KeyCache(link, keys, config.key_cache_ttl_s, config.key_negative_ttl_s,
                         on_lookup=metrics.key_lookups.inc)
    registry.on_keys_changed = key_cache.clear
    leases = LeaseManager(link, keys, config.router_id, config.lease_ttl_s)
    breakers = Breakers(breaker_table or BreakerTable(shared=False), config.breaker_failures,
                        config.breaker_cooldown_s,
                        probe_timeout_s=config.connect_timeout_s + config.first_byte_timeout_s,
                        on_change=lambda wid, old, new: metrics.breaker_transitions.labels(
                            wid, {0: "closed", 1: "open", 2: "half_open"}[new]).inc())
    retry = RetryPolicy(config.retries, RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s))
    upstreams = Upstreams(config.vllm_api_key, config.connect_timeout_s, config.first_byte_timeout_s,
                          config.read_timeout_s, config.pool_maxsize)
    proxy = Proxy(keys=key_cache, registry=registry, policy=Policy(config.policy), leases=leases,
                  breakers=breakers, retry=retry, upstreams=upstreams, metrics=metrics,
                  max_body_bytes=config.max_body_bytes,
                  limiter=RateLimiter(link, leases.batcher, config.redis_prefix))
    metrics.redis_up.set(0)
    metrics.add_scrape_source(lambda: breaker_families(breakers, registry))
    metrics.add_scrape_source(lambda: worker_families(registry, link))

    app = Flask("gpufleet.router")
    app.config["ROUTER"] = config
    app.extensions["gpufleet_router"] = proxy
    created = int(time.time())

    # POST /v1/chat/completions and /v1/completions: see wsgi_app below
    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    def proxied_path():
        return proxy.handle(request.environ, request.path)

    @app.get("/v1/models")
    def list_models():
        try:
            key = proxy.authenticate(request.environ)
        except RequestError as err:
            return err.response()
        data = [{"id": m, "object": "model", "created": created, "owned_by": "gpufleet"}
                for m in registry.models() if key.allows(m)]
        return _json({"object": "list", "data": data})

    @app.get("/healthz")
    def healthz():
        return _json({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        body = {"redis": link.up, "workers": registry.worker_count(), "models": len(registry.models())}
        if link.up:
            return _json({"status": "ok", **body})
        if link.ever_up:
            # still serving with the last known workers and keys
            return _json({"status": "degraded", "reason": "redis unreachable", **body})
        return _json({"status": "starting", "reason": "redis not reached yet", **body}, 503)

    @app.get("/metrics")
    def metrics_view():
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.errorhandler(404)
    def not_found(_exc):
        return _json({"error": {"message": f"No route for {request.path}", "type": "invalid_request_error",
                                "param": None, "code": "unknown_url"}}, 404)

    @app.errorhandler(405)
    def not_allowed(_exc):
        return _json({"error": {"message": f"{request.method} is not allowed on {request.path}",
                                "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}}, 405)

    # The two proxied paths skip Flask's request context and routing (about a tenth of the
    # request path's CPU); everything else goes through the Flask app as usual.
    flask_wsgi = app.wsgi_app
    proxied = {"/v1/chat/completions", "/v1/completions"}

    def wsgi_app(environ, start_response):
        path = environ.get("PATH_INFO")
        if path in proxied and environ.get("REQUEST_METHOD") == "POST":
            return proxy.handle(environ, path)(environ, start_response)
        return flask_wsgi(environ, start_response)

    app.wsgi_app = wsgi_app

    # first view before the first request, then the background greenlets keep it fresh
    if link.probe():
        registry.refresh()
    if config.background:
        registry.start()
        leases.start()
    app.extensions["gpufleet_router_parts"] = {"registry": registry, "leases": leases, "link": link,
                                               "keys": key_cache, "breakers": breakers}
    return app

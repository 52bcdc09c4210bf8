"""The control plane's Flask application factory (what its blueprints share is in ``api_base``)."""

from __future__ import annotations

import logging

import redis
from flask import Flask
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import HTTPException

from gpufleet.common.metrics_access import guard_metrics
from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.api_admin import admin
from gpufleet.controlplane.api_base import ApiError, Services, error_response
from gpufleet.controlplane.api_health import health
from gpufleet.controlplane.api_sd import sd_api
from gpufleet.controlplane.api_worker import worker_api
from gpufleet.controlplane.config import ControlPlaneConfig
from gpufleet.controlplane.db import Database
from gpufleet.controlplane.metrics import ApiMetrics, FleetCollector
from gpufleet.controlplane.publisher import Publisher
from gpufleet.controlplane.validation import PayloadError

log = logging.getLogger(__name__)


def create_app(config: ControlPlaneConfig) -> Flask:
    app = Flask("gpufleet.controlplane")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False

    db = Database(config.database_url, maxconn=10, application_name="gpufleet-controlplane")
    client = redis.Redis.from_url(config.redis_url, decode_responses=True, socket_timeout=5,
                                  socket_connect_timeout=5, health_check_interval=30)
    registry = CollectorRegistry()
    fleet = FleetCollector(db, config.stale_after_s)
    registry.register(fleet)
    app.extensions["gpufleet"] = Services(
        config=config, db=db, redis=client,
        publisher=Publisher(client, RedisKeys(config.redis_prefix), config.heartbeat_interval_s),
        registry=registry, metrics=ApiMetrics(registry), fleet=fleet)

    guard_metrics(app, config.metrics_allow_from)
    app.register_blueprint(health)
    app.register_blueprint(worker_api)
    app.register_blueprint(admin)
    app.register_blueprint(sd_api)

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.message, exc.code)

    @app.errorhandler(PayloadError)
    def _payload_error(exc: PayloadError):
        return error_response(exc.status, str(exc), "invalid_request", exc.field)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code == 413:
            return error_response(413, f"the request body is larger than {config.max_body_bytes} bytes "
                                       "(GPUFLEET_MAX_BODY_BYTES)", "body_too_large")
        return error_response(exc.code or 500, exc.description or exc.name, exc.name.lower().replace(" ", "_"))

    @app.errorhandler(redis.RedisError)
    def _redis_error(exc):
        log.error("redis error: %s", exc)
        return error_response(503, "redis is unreachable; retry shortly", "redis_unavailable")

    import psycopg2  # noqa: PLC0415

    @app.errorhandler(psycopg2.OperationalError)
    @app.errorhandler(psycopg2.InterfaceError)
    def _db_error(exc):
        log.error("database error: %s", exc)
        return error_response(503, "the database is unreachable; retry shortly", "database_unavailable")

    return app

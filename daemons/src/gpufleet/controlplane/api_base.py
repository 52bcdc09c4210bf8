"""What the control plane's blueprints share: the per-app services, the error type,
reading a request's JSON and bearer token, and publishing one worker's state.

The blueprints import this module, never ``app.py`` (which imports them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from flask import current_app, jsonify
from prometheus_client import CollectorRegistry

from gpufleet.common import jsonlimits
from gpufleet.controlplane.config import ControlPlaneConfig
from gpufleet.controlplane.db import Database
from gpufleet.controlplane.metrics import ApiMetrics, FleetCollector
from gpufleet.controlplane.publisher import Publisher
from gpufleet.controlplane.routability import assess_row
from gpufleet.controlplane.validation import PayloadError

log = logging.getLogger("gpufleet.controlplane.api")


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def error_response(status: int, message: str, code: str, field: str | None = None):
    body = {"error": {"message": message, "code": code}}
    if field:
        body["error"]["field"] = field
    return jsonify(body), status


@dataclass
class Services:
    config: ControlPlaneConfig
    db: Database
    redis: redis.Redis
    publisher: Publisher
    registry: CollectorRegistry
    metrics: ApiMetrics
    fleet: FleetCollector


def services() -> Services:
    return current_app.extensions["gpufleet"]


def read_json(request) -> dict:
    """The request's JSON object, or a 400 naming the problem (413 comes from Flask).
    Nesting deeper than ``jsonlimits.MAX_DEPTH`` is a 400 too, never a RecursionError."""
    limit = services().config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes (GPUFLEET_MAX_BODY_BYTES)",
                       "body_too_large")
    raw = request.get_data(cache=True)
    try:
        data = jsonlimits.loads(raw)
    except jsonlimits.TooDeep as exc:
        raise PayloadError(None, f"{exc}: send a flat JSON object") from None
    except ValueError:
        raise PayloadError(None, "the request body must be JSON (Content-Type: application/json)") from None
    if not isinstance(data, dict):
        raise PayloadError(None, "the request body must be a JSON object")
    return data


def bearer_token(request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def publish(svc: Services, worker, *, strict: bool = False) -> None:
    """Bring Redis in line with this worker's state at once (the reconciler does the same
    for every worker each cycle). PostgreSQL holds the truth: for a worker call an
    unreachable Redis is logged, not failed (the reconciler catches up); ``strict``
    (operator calls) lets the error through as a 503 so the operator retries."""
    try:
        verdict = assess_row(worker, svc.config.stale_after_s)
        if verdict.routable:
            svc.publisher.publish_worker_row(worker)
        else:
            svc.publisher.unpublish_worker(worker["worker_id"], worker["model_id"], verdict.event)
    except redis.RedisError as exc:
        if strict:
            raise
        log.warning("redis unreachable, worker %s not published now: %s", worker["worker_id"], exc)

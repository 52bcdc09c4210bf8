"""``GET /v1/sd/prometheus``: Prometheus HTTP service discovery (see ``sd.py``).

Authenticated with its own bearer token, ``GPUFLEET_SD_TOKEN`` (clear or ``sha256:<hex>``),
compared in constant time: Prometheus holds that token, never the admin token, so a leaked
Prometheus configuration lets its holder list scrape targets and nothing else.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from gpufleet.common.ids import same_hash
from gpufleet.controlplane import store
from gpufleet.controlplane.api_base import ApiError, bearer_token, services
from gpufleet.controlplane.sd import discover

sd_api = Blueprint("sd", __name__, url_prefix="/v1/sd")


@sd_api.get("/prometheus")
def prometheus_targets():
    svc = services()
    settings = svc.config.sd
    if not settings.token_hash:
        raise ApiError(404, "service discovery is off: set GPUFLEET_SD_TOKEN on the control plane "
                            "and give Prometheus the same token", "sd_disabled")
    token = bearer_token(request)
    if token is None:
        svc.metrics.auth_failures.labels("sd", "missing").inc()
        raise ApiError(401, "service discovery needs Authorization: Bearer <GPUFLEET_SD_TOKEN>", "missing_token")
    if not same_hash(token, settings.token_hash):
        svc.metrics.auth_failures.labels("sd", "invalid").inc()
        raise ApiError(401, "invalid service discovery token (GPUFLEET_SD_TOKEN)", "invalid_token")
    with svc.db.cursor() as cur:
        rows = store.list_workers(cur)
    return jsonify(discover(rows, settings))

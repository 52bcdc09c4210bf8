"""``/healthz`` (the process serves), ``/readyz`` (the database answers), ``/metrics``."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from gpufleet.controlplane.api_base import services
from gpufleet.controlplane.metrics import exposition

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@health.get("/readyz")
def readyz():
    if services().db.ping():
        return jsonify({"status": "ready"})
    return jsonify({"status": "unavailable", "reason": "database unreachable"}), 503


@health.get("/metrics")
def metrics():
    svc = services()
    return Response(exposition(svc.registry, svc.fleet), mimetype="text/plain; version=0.0.4; charset=utf-8")

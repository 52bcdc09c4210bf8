"""The agent's HTTP API: /healthz /readyz /metrics /info /drain /undrain."""

from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from gpufleet.common.metrics_access import guard_metrics

from . import readiness
from .agent import Agent
from .config import AgentConfig
from .metrics import build_registry, render

bp = Blueprint("agent", __name__)


def _agent() -> Agent:
    return current_app.extensions["gpufleet_agent"]


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    agent = _agent()
    ready, checks = readiness.verdict(agent.inputs())
    body = {
        "ready": ready,
        "status": agent.status(),
        "failing": [c.name for c in checks if not c.ok],
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
    }
    return jsonify(body), 200 if ready else 503


@bp.get("/metrics")
def metrics():
    return Response(render(current_app.extensions["gpufleet_agent_registry"]),
                    mimetype="text/plain; version=0.0.4; charset=utf-8")


@bp.get("/info")
def info():
    return jsonify(_agent().info())


def _operator_allowed() -> bool:
    """Loopback callers (Ansible on the host) or the AGENT_ADMIN_TOKEN bearer."""
    try:
        if ipaddress.ip_address((request.remote_addr or "").split("%")[0]).is_loopback:
            return True
    except ValueError:
        pass
    expected = _agent().config.agent_admin_token
    header = request.headers.get("Authorization", "")
    if expected and header.startswith("Bearer "):
        return hmac.compare_digest(header[7:].strip().encode(), expected.encode())
    return False


def _forbidden():
    return jsonify({"error": {"message": "drain/undrain need a loopback caller or "
                              "Authorization: Bearer <AGENT_ADMIN_TOKEN>", "code": "forbidden"}}), 403


@bp.post("/drain")
def drain():
    if not _operator_allowed():
        return _forbidden()
    agent = _agent()
    agent.drain()
    return jsonify({"status": agent.status(), "draining": True, "inflight": agent.vllm.inflight()})


@bp.post("/undrain")
def undrain():
    if not _operator_allowed():
        return _forbidden()
    agent = _agent()
    agent.undrain()
    return jsonify({"status": agent.status(), "draining": agent.draining, "inflight": agent.vllm.inflight()})


def create_app(config: AgentConfig, *, start: bool = True, agent: Agent | None = None) -> Flask:
    """Build the app; ``start`` launches the background loops (the server does so after the
    fork; tests of the routes alone pass ``start=False``)."""
    app = Flask("gpufleet.agent")
    guard_metrics(app, config.metrics_allow_from)
    agent = agent or Agent(config)
    app.extensions["gpufleet_agent"] = agent
    app.extensions["gpufleet_agent_registry"] = build_registry(agent)
    app.register_blueprint(bp)
    if start:
        agent.start()
    return app

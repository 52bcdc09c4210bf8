"""``POST /internal/worker/register`` and ``/heartbeat`` (DESIGN.md, Control plane contract).

Tokens: a known, non-retired instance without an active token gets one at its first
register (bootstrap), returned once and stored as SHA-256 + prefix. After that every
call must present it; it is bound to its instance and compared in constant time.
"""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, jsonify, request

from gpufleet.common.ids import WORKER_TOKEN_PREFIX, display_prefix, new_secret, same_hash, sha256_hex
from gpufleet.controlplane import store
from gpufleet.controlplane.app import ApiError, bearer_token, read_json, services
from gpufleet.controlplane.prober import probe_readyz
from gpufleet.controlplane.routability import assess_row
from gpufleet.controlplane.validation import parse_heartbeat, parse_registration

log = logging.getLogger(__name__)

worker_api = Blueprint("worker_api", __name__, url_prefix="/internal/worker")


def _fail_auth(status: int, message: str, code: str, reason: str):
    services().metrics.auth_failures.labels("worker", reason).inc()
    return ApiError(status, message, code)


def _known_instance(cur, instance_id: str):
    instance = store.get_instance(cur, instance_id)
    if instance is None:
        raise _fail_auth(403, f"instance {instance_id!r} is not known: add it first "
                              f"(gpufleet instances add {instance_id})", "unknown_instance", "unknown_instance")
    if instance["retired_at"] is not None:
        raise _fail_auth(403, f"instance {instance_id!r} is retired", "retired_instance", "retired_instance")
    return instance


def _check_token(cur, instance_id: str, token: str) -> None:
    """The presented token must be the active token of this very instance."""
    active = store.get_active_token(cur, instance_id)
    if active is not None and same_hash(token, active["token_hash"]):
        store.touch_token(cur, instance_id)
        return
    owner = store.token_owner(cur, sha256_hex(token))
    if owner is not None and owner != instance_id:
        log.warning("a token of instance %s was presented for instance %s", owner, instance_id)
        raise _fail_auth(403, f"this token belongs to another instance, not {instance_id!r}",
                         "token_instance_mismatch", "wrong_instance")
    raise _fail_auth(401, f"invalid worker token for instance {instance_id!r}: recover it with "
                          f"`gpufleet tokens rotate {instance_id}`", "invalid_token", "invalid_token")


@worker_api.post("/register")
def register():
    svc = services()
    reg = parse_registration(read_json(request))
    token = bearer_token(request)
    issued = None
    with svc.db.cursor() as cur:
        _known_instance(cur, reg.instance_id)
        if token is not None:
            _check_token(cur, reg.instance_id, token)
        else:
            if request.headers.get("Authorization"):
                raise _fail_auth(401, "the Authorization header must be 'Bearer <worker token>'",
                                 "invalid_token", "malformed")
            issued = new_secret(WORKER_TOKEN_PREFIX)
            if not store.issue_bootstrap_token(cur, reg.instance_id, sha256_hex(issued), display_prefix(issued)):
                svc.metrics.registrations.labels("token_already_issued").inc()
                raise ApiError(409, f"a token was already issued for instance {reg.instance_id!r}; present it, "
                                    f"or rotate it with `gpufleet tokens rotate {reg.instance_id}`",
                               "token_already_issued")
        previous = store.get_worker(cur, reg.worker_id, for_update=True)
        if not store.upsert_worker(cur, reg):
            raise _fail_auth(403, f"worker {reg.worker_id!r} belongs to another instance",
                             "worker_instance_mismatch", "wrong_instance")
    if previous is not None and (previous["model_id"], previous["advertise_url"], previous["agent_url"]) != (
            reg.model_id, reg.advertise_url, reg.agent_url):
        # re-registered with another model or endpoint: out of rotation until ready again
        publish(svc, {**previous, "status": "starting"})
    svc.metrics.registrations.labels("bootstrap" if issued else "ok").inc()
    log.info("worker %s of instance %s registered for %s at %s%s", reg.worker_id, reg.instance_id,
             reg.model_id, reg.advertise_url, " (token issued)" if issued else "")
    body = {"worker_id": reg.worker_id, "heartbeat_interval_s": svc.config.heartbeat_interval_s}
    if issued:
        body["bootstrap_token"] = issued
    return jsonify(body)


@worker_api.post("/heartbeat")
def heartbeat():
    svc = services()
    hb = parse_heartbeat(read_json(request))
    token = bearer_token(request)
    if token is None:
        raise _fail_auth(401, "a worker token is required: Authorization: Bearer <worker token>",
                         "missing_token", "missing")
    with svc.db.cursor() as cur:
        _known_instance(cur, hb.instance_id)
        _check_token(cur, hb.instance_id, token)
        worker = store.get_worker(cur, hb.worker_id)
        if worker is None:
            raise ApiError(404, f"worker {hb.worker_id!r} is not registered: register first", "not_registered")
        if worker["instance_id"] != hb.instance_id:
            raise _fail_auth(403, f"worker {hb.worker_id!r} belongs to another instance",
                             "worker_instance_mismatch", "wrong_instance")
        if worker["model_id"] != hb.model_id:
            raise ApiError(409, f"worker {hb.worker_id!r} is registered for {worker['model_id']!r}, not "
                                f"{hb.model_id!r}: register again", "model_mismatch")
        store.record_heartbeat(cur, hb)
        worker = store.get_worker(cur, hb.worker_id)
    svc.metrics.heartbeats.labels(hb.status).inc()

    if hb.status == "ready" and worker["last_probe_ok"] is None and worker["desired_status"] != "draining":
        # never probed: probe now so a new worker is routable within one heartbeat,
        # instead of waiting for the reconciler's next cycle
        ok, error = probe_readyz(svc.http, worker["agent_url"], min(svc.config.probe_timeout_s, 2.0))
        with svc.db.cursor() as cur:
            store.record_probe(cur, hb.worker_id, ok, error)
            worker = store.get_worker(cur, hb.worker_id)
    publish(svc, worker)

    body = {}
    if worker["desired_status"]:
        body["desired_status"] = worker["desired_status"]
    return jsonify(body)


def publish(svc, worker, *, strict: bool = False) -> None:
    """Bring Redis in line with this worker's state at once (the reconciler does the same
    for every worker each cycle). PostgreSQL holds the truth: for a worker call an
    unreachable Redis is logged, not failed (the reconciler catches up); ``strict``
    (operator calls) lets the error through as a 503 so the operator retries."""
    try:
        _publish(svc, worker)
    except redis.RedisError as exc:
        if strict:
            raise
        log.warning("redis unreachable, worker %s not published now: %s", worker["worker_id"], exc)


def _publish(svc, worker) -> None:
    verdict = assess_row(worker, svc.config.stale_after_s)
    if verdict.routable:
        svc.publisher.publish_worker_row(worker)
    else:
        svc.publisher.unpublish_worker(worker["worker_id"], worker["model_id"], verdict.event)

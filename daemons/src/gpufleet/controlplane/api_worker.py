"""``POST /internal/worker/register`` and ``/heartbeat`` (DESIGN.md, Control plane contract).

Enrolment: an instance added by the operator gets a one-time join secret; its agent's
first register presents it (``Authorization: Bearer gfj_…``) and receives the worker
token once (stored as SHA-256 + prefix). Every later call presents the token. A register
that presents neither a valid join secret nor an active token gets one identical 401
(missing, wrong, expired, used, another instance's secret, unknown or retired instance)
and writes nothing, so the port tells a stranger nothing about which instances exist.

A token (or a join secret) is bound to its instance, the model declared for it and its
declared worker ids: anything else is a 403 and writes nothing. Handlers never call a
worker: a ``ready`` heartbeat of an unproven worker asks the reconciler for a prompt
probe (PostgreSQL NOTIFY, see ``prompt.py``).
"""

from __future__ import annotations

import hmac
import logging

from flask import Blueprint, jsonify, request

from gpufleet.common.ids import (
    JOIN_SECRET_PREFIX,
    WORKER_TOKEN_PREFIX,
    display_prefix,
    new_secret,
    sha256_hex,
)
from gpufleet.controlplane import prompt, store
from gpufleet.controlplane.api_base import ApiError, bearer_token, publish, read_json, services
from gpufleet.controlplane.validation import parse_heartbeat, parse_registration

log = logging.getLogger(__name__)

worker_api = Blueprint("worker_api", __name__, url_prefix="/internal/worker")

# The one answer to every register that does not authenticate (no enumeration).
REGISTER_REFUSED = ("register refused: present this instance's join secret (first enrolment: "
                    "`gpufleet instances join-secret INSTANCE`) or its worker token as "
                    "Authorization: Bearer <secret>")


def _refuse(kind: str, why: str, **context) -> ApiError:
    """The uniform 401; the reason goes to the log and a counter only."""
    services().metrics.auth_failures.labels("worker", "refused").inc()
    log.warning("%s refused: %s %s", kind, why, " ".join(f"{k}={v!r}" for k, v in context.items()))
    return ApiError(401, REGISTER_REFUSED if kind == "register" else
                    "invalid worker token: recover it with `gpufleet tokens rotate INSTANCE`", "invalid_credentials")


def _forbid(message: str, code: str) -> ApiError:
    services().metrics.auth_failures.labels("worker", code).inc()
    return ApiError(403, message, code)


def _check_binding(cur, instance: dict, instance_id: str, worker_id: str, model_id: str) -> None:
    """The credential of ``instance`` may act only as its own instance, declared model and
    declared worker ids."""
    if instance_id != instance["instance_id"]:
        raise _forbid(f"this credential belongs to another instance, not {instance_id!r}",
                      "token_instance_mismatch")
    if instance["model_id"] is not None and model_id != instance["model_id"]:
        raise _forbid(f"instance {instance_id!r} is declared for model {instance['model_id']!r}, not "
                      f"{model_id!r}: fix MODEL_ID, or retire and re-add the instance", "model_mismatch")
    if worker_id not in store.declared_worker_ids(cur, instance_id):
        raise _forbid(f"worker {worker_id!r} is not declared for instance {instance_id!r}: declare it with "
                      f"`gpufleet instances add {instance_id} --worker-id {worker_id}`", "worker_not_declared")


def _authenticate_token(cur, token: str, kind: str):
    """The active token's row (instance, model), or the uniform 401."""
    row = store.active_token_by_hash(cur, sha256_hex(token))
    if row is None or not hmac.compare_digest(row["token_hash"], sha256_hex(token)) \
            or row["retired_at"] is not None:
        raise _refuse(kind, "no active token with this hash")
    return {"instance_id": row["instance_id"], "model_id": row["model_id"]}


@worker_api.post("/register")
def register():
    svc = services()
    reg = parse_registration(read_json(request))
    credential = bearer_token(request)
    if credential is None:
        raise _refuse("register", "no credential", instance_id=reg.instance_id)
    issued = None
    with svc.db.cursor() as cur:
        if credential.startswith(JOIN_SECRET_PREFIX):
            owner = store.use_join_secret(cur, sha256_hex(credential))
            instance = store.get_instance(cur, owner) if owner == reg.instance_id else None
            if instance is None or instance["retired_at"] is not None:
                # the transaction rolls back: the secret stays unused
                raise _refuse("register", "join secret wrong, expired, used, or for another or a retired "
                              "instance", instance_id=reg.instance_id)
            _check_binding(cur, instance, reg.instance_id, reg.worker_id, reg.model_id)
            store.bind_model(cur, reg.instance_id, reg.model_id)
            issued = new_secret(WORKER_TOKEN_PREFIX)
            # an enrolment replaces any earlier token: the operator issued this secret
            store.rotate_token(cur, reg.instance_id, sha256_hex(issued), display_prefix(issued))
        else:
            instance = _authenticate_token(cur, credential, "register")
            _check_binding(cur, instance, reg.instance_id, reg.worker_id, reg.model_id)
            store.bind_model(cur, reg.instance_id, reg.model_id)
            store.touch_token(cur, reg.instance_id)
        previous = store.get_worker(cur, reg.worker_id, for_update=True)
        if not store.upsert_worker(cur, reg):
            raise _forbid(f"worker {reg.worker_id!r} belongs to another instance", "worker_instance_mismatch")
    if previous is not None and (previous["model_id"], previous["advertise_url"], previous["agent_url"]) != (
            reg.model_id, reg.advertise_url, reg.agent_url):
        # re-registered with another model or endpoint: out of rotation until ready again
        publish(svc, {**previous, "status": "starting"})
    svc.metrics.registrations.labels("enrolled" if issued else "ok").inc()
    log.info("worker %s of instance %s registered for %s at %s%s", reg.worker_id, reg.instance_id,
             reg.model_id, reg.advertise_url, " (enrolled with a join secret, token issued)" if issued else "")
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
        raise ApiError(401, "a worker token is required: Authorization: Bearer <worker token>", "missing_token")
    with svc.db.cursor() as cur:
        instance = _authenticate_token(cur, token, "heartbeat")
        if hb.instance_id != instance["instance_id"]:
            raise _forbid(f"this token belongs to another instance, not {hb.instance_id!r}",
                          "token_instance_mismatch")
        store.touch_token(cur, hb.instance_id)
        worker = store.get_worker(cur, hb.worker_id)
        if worker is None:
            if hb.worker_id not in store.declared_worker_ids(cur, hb.instance_id):
                raise _forbid(f"worker {hb.worker_id!r} is not declared for instance {hb.instance_id!r}",
                              "worker_not_declared")
            raise ApiError(404, f"worker {hb.worker_id!r} is not registered: register first", "not_registered")
        if worker["instance_id"] != hb.instance_id:
            raise _forbid(f"worker {hb.worker_id!r} belongs to another instance", "worker_instance_mismatch")
        if worker["model_id"] != hb.model_id:
            raise ApiError(409, f"worker {hb.worker_id!r} is registered for {worker['model_id']!r}, not "
                                f"{hb.model_id!r}: register again", "model_mismatch")
        store.record_heartbeat(cur, hb)
        worker = store.get_worker(cur, hb.worker_id)
        if hb.status == "ready" and worker["last_probe_ok"] is not True and worker["desired_status"] != "draining":
            # unproven: ask the reconciler to probe it now rather than at its next cycle
            # (delivered when this transaction commits; the handler never calls a worker)
            prompt.request_probe(cur, hb.worker_id)
    svc.metrics.heartbeats.labels(hb.status).inc()
    publish(svc, worker)

    body = {}
    if worker["desired_status"]:
        body["desired_status"] = worker["desired_status"]
    return jsonify(body)

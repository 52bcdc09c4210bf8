"""The admin API (``/v1/admin/...``): what the ``gpufleet`` CLI and the Ansible roles use.

Every call needs ``Authorization: Bearer <GPUFLEET_ADMIN_TOKEN>``, checked in constant
time against the configured hash.
"""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, jsonify, request

from gpufleet.common.ids import (
    JOIN_SECRET_PREFIX,
    WORKER_TOKEN_PREFIX,
    display_prefix,
    new_secret,
    same_hash,
    sha256_hex,
)
from gpufleet.controlplane import keystore, keysync, scaling_report, store
from gpufleet.controlplane.api_base import ApiError, bearer_token, publish, read_json, services
from gpufleet.controlplane.routability import assess_row
from gpufleet.controlplane.validation import PayloadError, ident, integer, model, text

log = logging.getLogger(__name__)

admin = Blueprint("admin", __name__, url_prefix="/v1/admin")


@admin.before_request
def _require_admin_token():
    svc = services()
    token = bearer_token(request)
    if token is None:
        svc.metrics.auth_failures.labels("admin", "missing").inc()
        raise ApiError(401, "the admin API needs Authorization: Bearer <GPUFLEET_ADMIN_TOKEN>", "missing_token")
    if not same_hash(token, svc.config.admin_token_hash):
        svc.metrics.auth_failures.labels("admin", "invalid").inc()
        raise ApiError(401, "invalid admin token (GPUFLEET_ADMIN_TOKEN)", "invalid_token")


def _iso(value):
    return value.isoformat() if value is not None else None


def _instance_json(row) -> dict:
    out = {
        "instance_id": row["instance_id"], "provider_instance_id": row["provider_instance_id"],
        "hostname": row["hostname"], "model_id": row["model_id"], "created_at": _iso(row["created_at"]),
        "retired_at": _iso(row["retired_at"]),
    }
    if "worker_ids" in row:
        out["worker_ids"] = list(row["worker_ids"])
    if "has_token" in row:
        out.update({"has_token": bool(row["has_token"]), "token_prefix": row["token_prefix"] if row["has_token"]
                    else None, "token_last_used_at": _iso(row["token_last_used_at"]), "workers": row["workers"],
                    "join_secret_expires_at": _iso(row["join_secret_expires_at"])})
    return out


def _worker_json(row) -> dict:
    verdict = assess_row(row, services().config.stale_after_s)
    age = row["heartbeat_age_s"]
    return {
        "worker_id": row["worker_id"], "instance_id": row["instance_id"], "model_id": row["model_id"],
        "advertise_url": row["advertise_url"], "agent_url": row["agent_url"], "status": row["status"],
        "desired_status": row["desired_status"], "routable": verdict.routable, "health": verdict.health,
        "last_heartbeat_at": _iso(row["last_heartbeat_at"]),
        "heartbeat_age_s": round(age, 3) if age is not None else None,
        "last_probe_at": _iso(row["last_probe_at"]), "last_probe_ok": row["last_probe_ok"],
        "last_probe_error": row["last_probe_error"],
        "consecutive_probe_failures": row["consecutive_probe_failures"],
        "queue_depth": row["queue_depth"], "running": row["running"], "inflight": row["inflight"],
        "kv_cache_usage": row["kv_cache_usage"], "gpu_util": row["gpu_util"],
        "gpu_mem_used_mb": row["gpu_mem_used_mb"], "ttft_p95_ms": row["ttft_p95_ms"],
        "e2e_p95_ms": row["e2e_p95_ms"], "req_per_s": row["req_per_s"],
        "tensor_parallel_size": row["tensor_parallel_size"],
        "gpu_memory_utilization": row["gpu_memory_utilization"], "gpus": row["gpus"],
        "agent_version": row["agent_version"], "registered_at": _iso(row["registered_at"]),
    }


def _key_json(row) -> dict:
    return {"key_id": row["key_id"], "name": row["name"], "key_prefix": row["key_prefix"],
            "models": list(row["models"] or []), "rpm": row["rpm"], "created_at": _iso(row["created_at"]),
            "revoked_at": _iso(row["revoked_at"]), "active": row["revoked_at"] is None}


# -- instances ---------------------------------------------------------------------------


def _worker_ids(body: dict, instance_id: str) -> list[str]:
    value = body.get("worker_ids")
    if value is None:
        return [instance_id]
    if not isinstance(value, list) or not 1 <= len(value) <= 64:
        raise PayloadError("worker_ids", "worker_ids must be a list of 1 to 64 worker ids "
                                         "(default: [instance_id])")
    ids = [ident({"worker_ids": v}, "worker_ids") for v in value]
    return sorted(set(ids))


def _issue_join_secret(cur, instance_id: str) -> tuple[str, str]:
    secret = new_secret(JOIN_SECRET_PREFIX)
    expires = store.issue_join_secret(cur, instance_id, sha256_hex(secret), display_prefix(secret),
                                      services().config.join_secret_ttl_s)
    return secret, _iso(expires)


@admin.post("/instances")
def add_instance():
    body = read_json(request)
    instance_id = ident(body, "instance_id")
    provider_id = text(body, "provider_instance_id")
    hostname = text(body, "hostname")
    model_id = model(body)
    worker_ids = _worker_ids(body, instance_id)
    with services().db.cursor() as cur:
        try:
            row, created = store.add_instance(cur, instance_id, provider_id, hostname, model_id, worker_ids)
        except store.WorkerIdTaken as exc:
            raise ApiError(409, f"worker id {exc.worker_id!r} already belongs to instance {exc.owner!r}: "
                                "declare another", "worker_id_taken") from None
        secret = _issue_join_secret(cur, instance_id) if created else None
        worker_ids = store.declared_worker_ids(cur, instance_id)
    answer = {"instance": {**_instance_json(row), "worker_ids": worker_ids}, "created": created}
    if secret:
        answer["join_secret"], answer["join_secret_expires_at"] = secret
        log.info("instance %s added for %s (workers %s); join secret issued", instance_id, model_id,
                 ",".join(worker_ids))
    return jsonify(answer), 201 if created else 200


@admin.post("/instances/<instance_id>/join-secret")
def join_secret(instance_id: str):
    """A new one-time join secret; any earlier unused one stops working."""
    with services().db.cursor() as cur:
        instance = store.get_instance(cur, instance_id)
        if instance is None:
            raise ApiError(404, f"instance {instance_id!r} is not known: add it first "
                                f"(gpufleet instances add {instance_id} --model MODEL)", "unknown_instance")
        if instance["retired_at"] is not None:
            raise ApiError(409, f"instance {instance_id!r} is retired", "retired_instance")
        secret, expires = _issue_join_secret(cur, instance_id)
    log.info("join secret issued for instance %s", instance_id)
    return jsonify({"instance_id": instance_id, "join_secret": secret, "expires_at": expires})


@admin.get("/instances")
def list_instances():
    with services().db.cursor() as cur:
        rows = store.list_instances(cur)
    return jsonify({"instances": [_instance_json(r) for r in rows]})


@admin.post("/instances/<instance_id>/rotate-token")
def rotate_token(instance_id: str):
    token = new_secret(WORKER_TOKEN_PREFIX)
    with services().db.cursor() as cur:
        instance = store.get_instance(cur, instance_id)
        if instance is None:
            raise ApiError(404, f"instance {instance_id!r} is not known", "unknown_instance")
        if instance["retired_at"] is not None:
            raise ApiError(409, f"instance {instance_id!r} is retired", "retired_instance")
        store.rotate_token(cur, instance_id, sha256_hex(token), display_prefix(token))
    log.info("worker token of instance %s rotated", instance_id)
    return jsonify({"instance_id": instance_id, "token": token, "token_prefix": display_prefix(token)})


@admin.post("/instances/<instance_id>/retire")
def retire_instance(instance_id: str):
    svc = services()
    with svc.db.cursor() as cur:
        row = store.retire_instance(cur, instance_id)
        if row is None:
            raise ApiError(404, f"instance {instance_id!r} is not known", "unknown_instance")
        workers = [w for w in store.list_workers(cur) if w["instance_id"] == instance_id]
    for worker in workers:
        svc.publisher.unpublish_worker(worker["worker_id"], worker["model_id"], "removed")
    log.info("instance %s retired", instance_id)
    return jsonify({"instance": _instance_json(row)})


# -- workers -----------------------------------------------------------------------------


@admin.get("/workers")
def list_workers():
    model_id = request.args.get("model_id") or None
    with services().db.cursor() as cur:
        rows = store.list_workers(cur, model_id)
    return jsonify({"workers": [_worker_json(r) for r in rows]})


def _set_desired(worker_id: str, desired: str):
    svc = services()
    with svc.db.cursor() as cur:
        row = store.set_desired_status(cur, worker_id, desired)
    if row is None:
        raise ApiError(404, f"worker {worker_id!r} is not known", "unknown_worker")
    publish(svc, row, strict=True)
    log.info("worker %s: operator asked for %s", worker_id, desired)
    return jsonify({"worker": _worker_json(row)})


@admin.post("/workers/<worker_id>/drain")
def drain(worker_id: str):
    return _set_desired(worker_id, "draining")


@admin.post("/workers/<worker_id>/undrain")
def undrain(worker_id: str):
    return _set_desired(worker_id, "ready")


# -- API keys ----------------------------------------------------------------------------


@admin.post("/keys")
def create_key():
    svc = services()
    body = read_json(request)
    name = text(body, "name", required=True, max_len=128)
    models = body.get("models") or []
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if not isinstance(models, list) or len(models) > 256:
        raise PayloadError("models", "models must be a list of model ids (empty = all models)")
    for i, m in enumerate(models):
        model({"models": m}, "models")
        if "," in m:
            raise PayloadError(f"models[{i}]", "a model id in models must not contain a comma")
    rpm = integer(body, "rpm", 0, minimum=0, maximum=10**9)
    with svc.db.cursor() as cur:
        keysync.lock_for_change(cur)
        row, key = keystore.create_key(cur, name, models, rpm)
        answer = {"key_id": row["key_id"], "key": key, **_key_json(row)}
        # published before the change commits and the caller has the key: it works at once
        try:
            svc.publisher.publish_api_key(row["key_hash"], row["key_id"], row["name"], row["models"], row["rpm"])
        except redis.RedisError as exc:
            # the key is shown only now, so it must not be lost: the reconciler publishes it
            log.warning("redis unreachable, api key %s not published yet: %s", row["key_id"], exc)
            answer["warning"] = "redis is unreachable: the key works once the reconciler re-syncs keys"
    log.info("api key %s (%s) created", row["key_id"], name)
    return jsonify(answer), 201


@admin.get("/keys")
def list_keys():
    with services().db.cursor() as cur:
        rows = keystore.list_keys(cur)
    return jsonify({"keys": [_key_json(r) for r in rows]})


@admin.delete("/keys/<key_id>")
def revoke_key(key_id: str):
    svc = services()
    failure = None
    with svc.db.cursor() as cur:
        keysync.lock_for_change(cur)
        row = keystore.revoke_key(cur, key_id)
        if row is None:
            raise ApiError(404, f"api key {key_id!r} is not known", "unknown_key")
        try:
            svc.publisher.delete_api_key(row["key_hash"], row["key_id"])
        except redis.RedisError as exc:
            failure = exc  # the revoke stands; the reconciler deletes it from Redis once it is back
    if failure is not None:
        log.error("api key %s revoked in the database, but redis is unreachable: %s", key_id, failure)
        raise ApiError(503, f"api key {key_id!r} is revoked, but Redis is unreachable: routers keep honouring "
                            "their cached copy until the reconciler re-syncs keys", "redis_unavailable")
    log.info("api key %s revoked", key_id)
    return jsonify({"key": _key_json(row)})


# -- the fleet at a glance ---------------------------------------------------------------


@admin.get("/status")
def status():
    svc = services()
    with svc.db.cursor() as cur:
        workers = store.list_workers(cur)
        instances = store.list_instances(cur)
        keys = keystore.list_keys(cur, include_revoked=False)
        cur.execute("""SELECT leader, leader_since, last_cycle_at, last_cycle_ms,
                              extract(epoch FROM now() - last_cycle_at)::float8 AS last_cycle_age_s
                       FROM reconciler_state""")
        reconciler = cur.fetchone()
    by_health: dict[str, int] = {}
    by_status: dict[str, int] = {}
    models: dict[str, dict] = {}
    for row in workers:
        verdict = assess_row(row, svc.config.stale_after_s)
        by_health[verdict.health] = by_health.get(verdict.health, 0) + 1
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        entry = models.setdefault(row["model_id"], {"workers": 0, "routable": 0, "queue_depth": 0})
        entry["workers"] += 1
        entry["queue_depth"] += row["queue_depth"] if verdict.routable else 0
        entry["routable"] += 1 if verdict.routable else 0
    return jsonify({
        "instances": {"total": len(instances), "retired": sum(1 for i in instances if i["retired_at"]),
                      "without_token": sum(1 for i in instances if not i["has_token"] and not i["retired_at"])},
        "workers": {"total": len(workers), "routable": by_health.get("routable", 0),
                    "by_status": by_status, "by_health": by_health},
        "models": models,
        "routable_models": sorted(m for m, e in models.items() if e["routable"]),
        "api_keys": {"active": len(keys)},
        "reconciler": {"leader": reconciler["leader"], "leader_since": _iso(reconciler["leader_since"]),
                       "last_cycle_at": _iso(reconciler["last_cycle_at"]),
                       "last_cycle_age_s": round(reconciler["last_cycle_age_s"], 3),
                       "last_cycle_ms": reconciler["last_cycle_ms"]} if reconciler else None,
    })


@admin.get("/scaling")
def scaling():
    try:
        limit = max(1, min(int(request.args.get("limit") or 50), 1000))
    except ValueError:
        raise PayloadError("limit", "limit must be a whole number") from None
    model_id = request.args.get("model_id") or None
    with services().db.cursor() as cur:
        return jsonify(scaling_report.report(cur, model_id, limit, services().config.scaling))

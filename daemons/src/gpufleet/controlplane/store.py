"""SQL for instances, worker tokens and workers. Each function takes a cursor (a
RealDictCursor from ``Database.cursor()``), so the caller decides the transaction."""

from __future__ import annotations

import json

import psycopg2.extras

from gpufleet.controlplane.validation import Heartbeat, Registration

_WORKER_COLUMNS = """
    w.worker_id, w.instance_id, w.provider_instance_id, w.model_id, w.advertise_url, w.agent_url,
    w.tensor_parallel_size, w.gpu_memory_utilization, w.gpus, w.agent_version, w.status,
    w.desired_status, w.queue_depth, w.running, w.kv_cache_usage, w.gpu_util, w.gpu_mem_used_mb,
    w.ttft_p95_ms, w.ttft_p95_scaling_ms, w.e2e_p95_ms, w.req_per_s, w.inflight, w.last_heartbeat_at, w.last_probe_at,
    w.last_probe_ok, w.consecutive_probe_failures, w.last_probe_error, w.registered_at,
    i.retired_at,
    extract(epoch FROM now() - w.last_heartbeat_at)::float8 AS heartbeat_age_s
"""

# -- instances ---------------------------------------------------------------------------


def get_instance(cur, instance_id: str):
    cur.execute("SELECT * FROM instances WHERE instance_id = %s", (instance_id,))
    return cur.fetchone()


class WorkerIdTaken(Exception):
    """A declared worker id already belongs to another instance."""

    def __init__(self, worker_id: str, owner: str):
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.owner = owner


def add_instance(cur, instance_id: str, provider_instance_id: str | None, hostname: str | None,
                 model_id: str, worker_ids: list[str]):
    """Returns (row, created). An existing instance is left unchanged. Raises
    WorkerIdTaken (the caller's transaction then rolls back) when a declared worker id
    belongs to another instance."""
    cur.execute("""INSERT INTO instances (instance_id, provider_instance_id, hostname, model_id)
                   VALUES (%s, %s, %s, %s) ON CONFLICT (instance_id) DO NOTHING RETURNING *""",
                (instance_id, provider_instance_id, hostname, model_id))
    row = cur.fetchone()
    if row is None:
        return get_instance(cur, instance_id), False
    for worker_id in worker_ids:
        cur.execute("""INSERT INTO instance_workers (worker_id, instance_id) VALUES (%s, %s)
                       ON CONFLICT (worker_id) DO NOTHING RETURNING worker_id""", (worker_id, instance_id))
        if cur.fetchone() is None:
            cur.execute("SELECT instance_id FROM instance_workers WHERE worker_id = %s", (worker_id,))
            raise WorkerIdTaken(worker_id, cur.fetchone()["instance_id"])
    return row, True


def declared_worker_ids(cur, instance_id: str) -> list[str]:
    cur.execute("SELECT worker_id FROM instance_workers WHERE instance_id = %s ORDER BY worker_id",
                (instance_id,))
    return [r["worker_id"] for r in cur.fetchall()]


def bind_model(cur, instance_id: str, model_id: str) -> None:
    """An instance added before models were declared (see migration 0003) takes the
    model of its first enrolment."""
    cur.execute("UPDATE instances SET model_id = %s WHERE instance_id = %s AND model_id IS NULL",
                (model_id, instance_id))


def list_instances(cur):
    cur.execute("""
        SELECT i.*, t.token_prefix, t.created_at AS token_created_at, t.last_used_at AS token_last_used_at,
               t.rotated_at AS token_rotated_at, (t.instance_id IS NOT NULL AND t.revoked_at IS NULL) AS has_token,
               (SELECT count(*) FROM workers w WHERE w.instance_id = i.instance_id)::int AS workers,
               ARRAY(SELECT d.worker_id FROM instance_workers d WHERE d.instance_id = i.instance_id
                     ORDER BY d.worker_id) AS worker_ids,
               j.expires_at AS join_secret_expires_at
        FROM instances i LEFT JOIN worker_auth_tokens t ON t.instance_id = i.instance_id
             LEFT JOIN join_secrets j ON j.instance_id = i.instance_id AND j.used_at IS NULL
                                         AND j.expires_at > now()
        ORDER BY i.instance_id""")
    return cur.fetchall()


def retire_instance(cur, instance_id: str):
    cur.execute("""UPDATE instances SET retired_at = coalesce(retired_at, now())
                   WHERE instance_id = %s RETURNING *""", (instance_id,))
    row = cur.fetchone()
    if row is not None:
        cur.execute("""UPDATE worker_auth_tokens SET revoked_at = coalesce(revoked_at, now())
                       WHERE instance_id = %s""", (instance_id,))
        cur.execute("DELETE FROM join_secrets WHERE instance_id = %s", (instance_id,))
    return row


# -- worker tokens -----------------------------------------------------------------------


def active_token_by_hash(cur, token_hash: str):
    """The active token row with this hash (and its instance's model and retirement), or None."""
    cur.execute("""SELECT t.instance_id, t.token_hash, t.last_used_at, i.model_id, i.retired_at
                   FROM worker_auth_tokens t JOIN instances i USING (instance_id)
                   WHERE t.token_hash = %s AND t.revoked_at IS NULL""", (token_hash,))
    return cur.fetchone()


# -- join secrets ------------------------------------------------------------------------


def issue_join_secret(cur, instance_id: str, secret_hash: str, secret_prefix: str, ttl_s: float):
    """Store the instance's join secret, replacing any earlier one; returns its expiry."""
    cur.execute("""
        INSERT INTO join_secrets (instance_id, secret_hash, secret_prefix, expires_at)
        VALUES (%(i)s, %(h)s, %(p)s, now() + make_interval(secs => %(ttl)s))
        ON CONFLICT (instance_id) DO UPDATE
            SET secret_hash = EXCLUDED.secret_hash, secret_prefix = EXCLUDED.secret_prefix,
                created_at = now(), expires_at = EXCLUDED.expires_at, used_at = NULL
        RETURNING expires_at""", {"i": instance_id, "h": secret_hash, "p": secret_prefix, "ttl": float(ttl_s)})
    return cur.fetchone()["expires_at"]


def use_join_secret(cur, secret_hash: str) -> str | None:
    """Mark the secret used if it is unused and unexpired; returns its instance id, else
    None. Runs in the register's transaction: a refusal later in it rolls the use back,
    and of two concurrent uses only one gets a row."""
    cur.execute("""UPDATE join_secrets SET used_at = now()
                   WHERE secret_hash = %s AND used_at IS NULL AND expires_at > now()
                   RETURNING instance_id""", (secret_hash,))
    row = cur.fetchone()
    return row["instance_id"] if row else None


# -- worker tokens -----------------------------------------------------------------------


def rotate_token(cur, instance_id: str, token_hash: str, token_prefix: str) -> None:
    """Make this the instance's only token (a rotation, or an enrolment with a join secret)."""
    cur.execute("""
        INSERT INTO worker_auth_tokens (instance_id, token_hash, token_prefix, rotated_at)
        VALUES (%s, %s, %s, now())
        ON CONFLICT (instance_id) DO UPDATE
            SET token_hash = EXCLUDED.token_hash, token_prefix = EXCLUDED.token_prefix,
                rotated_at = now(), last_used_at = NULL, revoked_at = NULL""",
                (instance_id, token_hash, token_prefix))


def touch_token(cur, instance_id: str) -> None:
    """Refresh ``last_used_at``, at most once a minute (heartbeats would rewrite it every call)."""
    cur.execute("""UPDATE worker_auth_tokens SET last_used_at = now() WHERE instance_id = %s
                   AND (last_used_at IS NULL OR last_used_at < now() - interval '60 seconds')""",
                (instance_id,))


# -- workers -----------------------------------------------------------------------------


def get_worker(cur, worker_id: str, *, for_update: bool = False):
    cur.execute(f"""SELECT {_WORKER_COLUMNS} FROM workers w JOIN instances i USING (instance_id)
                    WHERE w.worker_id = %s {"FOR UPDATE OF w" if for_update else ""}""", (worker_id,))
    return cur.fetchone()


def list_workers(cur, model_id: str | None = None):
    cur.execute(f"""SELECT {_WORKER_COLUMNS} FROM workers w JOIN instances i USING (instance_id)
                    WHERE (%s::text IS NULL OR w.model_id = %s) ORDER BY w.worker_id""", (model_id, model_id))
    return cur.fetchall()


def upsert_worker(cur, reg: Registration):
    """Insert or refresh the worker's registration. A changed model or endpoint resets the
    worker to ``starting`` and forgets its probes: it must prove itself ready again."""
    cur.execute("""
        INSERT INTO workers (worker_id, instance_id, provider_instance_id, model_id, advertise_url, agent_url,
                             tensor_parallel_size, gpu_memory_utilization, gpus, agent_version)
        VALUES (%(worker_id)s, %(instance_id)s, %(provider_instance_id)s, %(model_id)s, %(advertise_url)s,
                %(agent_url)s, %(tensor_parallel_size)s, %(gpu_memory_utilization)s, %(gpus)s, %(agent_version)s)
        ON CONFLICT (worker_id) DO UPDATE SET
            provider_instance_id = EXCLUDED.provider_instance_id,
            tensor_parallel_size = EXCLUDED.tensor_parallel_size,
            gpu_memory_utilization = EXCLUDED.gpu_memory_utilization,
            gpus = EXCLUDED.gpus,
            agent_version = EXCLUDED.agent_version,
            model_id = EXCLUDED.model_id,
            advertise_url = EXCLUDED.advertise_url,
            agent_url = EXCLUDED.agent_url,
            registered_at = now(),
            status = CASE WHEN (workers.model_id, workers.advertise_url, workers.agent_url)
                              = (EXCLUDED.model_id, EXCLUDED.advertise_url, EXCLUDED.agent_url)
                         THEN workers.status ELSE 'starting' END,
            last_probe_ok = CASE WHEN workers.agent_url = EXCLUDED.agent_url
                                 THEN workers.last_probe_ok ELSE NULL END
        WHERE workers.instance_id = EXCLUDED.instance_id
        RETURNING worker_id""", {**reg.__dict__, "gpus": json.dumps(reg.gpus)})
    return cur.fetchone() is not None


def record_heartbeat(cur, hb: Heartbeat) -> None:
    cur.execute("""
        UPDATE workers SET status = %(status)s, queue_depth = %(queue_depth)s, running = %(running)s,
            kv_cache_usage = %(kv_cache_usage)s, gpu_util = %(gpu_util)s, gpu_mem_used_mb = %(gpu_mem_used_mb)s,
            ttft_p95_ms = %(ttft_p95_ms)s, ttft_p95_scaling_ms = %(ttft_p95_scaling_ms)s,
            e2e_p95_ms = %(e2e_p95_ms)s, req_per_s = %(req_per_s)s,
            inflight = %(inflight)s, last_heartbeat_at = now(),
            -- an undrain is delivered until the worker says it is ready again
            desired_status = CASE WHEN desired_status = 'ready' AND %(status)s = 'ready'
                                  THEN NULL ELSE desired_status END
        WHERE worker_id = %(worker_id)s""", hb.__dict__)


def record_probe(cur, worker_id: str, ok: bool, error: str | None) -> None:
    cur.execute("""
        UPDATE workers SET last_probe_at = now(), last_probe_ok = %s, last_probe_error = %s,
            consecutive_probe_failures = CASE WHEN %s THEN 0 ELSE consecutive_probe_failures + 1 END
        WHERE worker_id = %s""", (ok, None if ok else (error or "failed")[:500], ok, worker_id))


def record_probes(cur, results: dict[str, tuple[bool, str | None]]) -> None:
    """``record_probe`` for many workers in one statement (a cycle probes them all)."""
    if not results:
        return
    rows = [(worker_id, ok, None if ok else (error or "failed")[:500]) for worker_id, (ok, error) in results.items()]
    psycopg2.extras.execute_values(cur, """
        UPDATE workers w SET last_probe_at = now(), last_probe_ok = v.ok, last_probe_error = v.error,
            consecutive_probe_failures = CASE WHEN v.ok THEN 0 ELSE w.consecutive_probe_failures + 1 END
        FROM (VALUES %s) AS v (worker_id, ok, error)
        WHERE w.worker_id = v.worker_id""", rows, template="(%s, %s::boolean, %s::text)", page_size=500)


def set_desired_status(cur, worker_id: str, desired: str | None):
    cur.execute("UPDATE workers SET desired_status = %s WHERE worker_id = %s RETURNING worker_id",
                (desired, worker_id))
    if cur.fetchone() is None:
        return None
    return get_worker(cur, worker_id)

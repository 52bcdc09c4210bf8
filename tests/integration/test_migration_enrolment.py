"""Upgrading a fleet to join secrets (migration 0003) on real PostgreSQL and a real control
plane: enrolled workers keep working, bound to what they had; instances not enrolled yet
need a join secret; no instance can be enrolled without one."""

import psycopg2

from gpufleet.controlplane.migrate import available_migrations, migrate
from gpufleet.controlplane.testing import ControlPlaneClient, cp_env, start_control_plane

# What a 0002 fleet held: i-old enrolled with two workers of model m1 (token gfw_legacy),
# i-pending added but not enrolled, i-nomodel added without a model.
LEGACY = """
INSERT INTO instances (instance_id, model_id) VALUES ('i-old', NULL), ('i-pending', 'm1'), ('i-nomodel', NULL);
INSERT INTO worker_auth_tokens (instance_id, token_hash, token_prefix)
    VALUES ('i-old', encode(sha256('gfw_legacy-token-0123456789'::bytea), 'hex'), 'gfw_legacy');
INSERT INTO workers (worker_id, instance_id, model_id, advertise_url, agent_url)
    VALUES ('i-old-a', 'i-old', 'm1', 'http://127.0.0.1:1', 'http://127.0.0.1:1'),
           ('i-old-b', 'i-old', 'm1', 'http://127.0.0.1:1', 'http://127.0.0.1:1');
"""


def apply_up_to(dsn: str, version: int) -> None:
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute("""CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                                                      applied_at timestamptz NOT NULL DEFAULT now())""")
        for m in available_migrations():
            if m.version <= version:
                cur.execute(m.sql)
                cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name))
        cur.execute(LEGACY)
    conn.close()


def test_upgrade_keeps_enrolled_workers_and_binds_them(daemons, database_url, redis_url):
    apply_up_to(database_url, 2)
    assert "0003_enrolment" in migrate(database_url)
    _, url = start_control_plane(daemons, cp_env(database_url, redis_url), migrate_first=False)
    cp = ControlPlaneClient(url, database_url)
    assert cp.query("SELECT worker_id, instance_id FROM instance_workers ORDER BY 1") == [
        ("i-nomodel", "i-nomodel"), ("i-old-a", "i-old"), ("i-old-b", "i-old"), ("i-pending", "i-pending")]
    assert cp.query("SELECT instance_id, model_id FROM instances ORDER BY 1") == [
        ("i-nomodel", None), ("i-old", "m1"), ("i-pending", "m1")]

    token = "gfw_legacy-token-0123456789"
    assert cp.register("i-old", worker_id="i-old-a", token=token).status_code == 200
    assert cp.heartbeat("i-old", token, worker_id="i-old-b").status_code == 200
    assert cp.register("i-old", worker_id="i-old-c", token=token).status_code == 403  # not declared
    assert cp.register("i-old", worker_id="i-old-a", token=token, model_id="m2").status_code == 403
    # the old unauthenticated bootstrap is gone; a join secret enrols the pending instance
    assert cp.register("i-pending").status_code == 401
    secret = cp.admin("POST", "/v1/admin/instances/i-pending/join-secret").json()["join_secret"]
    assert cp.register("i-pending", token=secret).status_code == 200
    # an instance that never declared a model takes the one of its first enrolment
    secret = cp.admin("POST", "/v1/admin/instances/i-nomodel/join-secret").json()["join_secret"]
    assert cp.register("i-nomodel", token=secret, model_id="m9").status_code == 200
    assert cp.query("SELECT model_id FROM instances WHERE instance_id = 'i-nomodel'") == [("m9",)]

"""The control plane process: configuration errors, migrate-on-start, readiness without
a database, racing bootstraps, and an unreachable Redis."""

import os
import signal
import subprocess
import threading

import psycopg2
import requests

from gpufleet.controlplane.testing import ADMIN_TOKEN, ControlPlaneClient, cp_env, start_control_plane
from support.procs import console_script, free_port, wait_until
from support.services import RedisServer

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_missing_settings_exit_2_naming_the_variable():
    proc = subprocess.run([console_script("gpufleet-controlplane")], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "GPUFLEET_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert proc.returncode == 2
    assert "GPUFLEET_DATABASE_URL is not set" in proc.stderr
    proc = subprocess.run([console_script("gpufleet-reconciler")], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "GPUFLEET_DATABASE_URL": "postgresql://x@127.0.0.1/x",
                               "GPUFLEET_REDIS_URL": "redis://127.0.0.1:1/0", "GPUFLEET_HEARTBEAT_INTERVAL_S": "x"})
    assert proc.returncode == 2 and "GPUFLEET_HEARTBEAT_INTERVAL_S" in proc.stderr


def test_migrate_on_start_and_readyz_follows_the_database(daemons, database_url, redis_url, postgres_server):
    env = cp_env(database_url, redis_url, GPUFLEET_MIGRATE_ON_START="true", GPUFLEET_WORKERS="1")
    _, url = start_control_plane(daemons, env, migrate_first=False)
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM schema_migrations")
        assert cur.fetchone()[0] >= 2
    conn.close()
    # a control plane whose database is unreachable is alive but not ready
    dead_db = f"postgresql://gpufleet@127.0.0.1:{free_port()}/nothing"
    port = free_port()
    daemon = daemons.start("cp-no-db", [console_script("gpufleet-controlplane")],
                           {**cp_env(dead_db, redis_url, GPUFLEET_WORKERS="1"), "GPUFLEET_BIND": f"127.0.0.1:{port}"})
    daemons.wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=daemon)
    resp = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
    assert resp.status_code == 503 and "database" in resp.json()["reason"]
    resp = requests.get(f"http://127.0.0.1:{port}/v1/admin/instances", headers=ADMIN, timeout=10)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "database_unavailable"


def test_racing_enrolments_with_one_join_secret_issue_exactly_one_token(daemons, database_url, redis_url):
    _, url = start_control_plane(daemons, cp_env(database_url, redis_url))
    secret = requests.post(url + "/v1/admin/instances", json={"instance_id": "i1", "model_id": "m"}, headers=ADMIN,
                           timeout=10).json()["join_secret"]
    body = {"instance_id": "i1", "worker_id": "i1", "model_id": "m", "advertise_url": "http://127.0.0.1:1",
            "agent_url": "http://127.0.0.1:1", "tensor_parallel_size": 1}
    results = []
    barrier = threading.Barrier(8)

    def attempt():
        barrier.wait()
        resp = requests.post(url + "/internal/worker/register", json=body, timeout=30,
                             headers={"Authorization": f"Bearer {secret}"})
        results.append((resp.status_code, resp.json().get("bootstrap_token")))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(code for code, _ in results) == [200] + [401] * 7, results
    assert len([token for _, token in results if token]) == 1


def test_an_unreachable_redis_does_not_lose_heartbeats_or_new_keys(daemons, database_url):
    own_redis = RedisServer().start()
    try:
        _, url = start_control_plane(daemons, cp_env(database_url, own_redis.url))
        secret = requests.post(url + "/v1/admin/instances", json={"instance_id": "i1", "model_id": "m"},
                               headers=ADMIN, timeout=10).json()["join_secret"]
        token = requests.post(url + "/internal/worker/register", timeout=10,
                              headers={"Authorization": f"Bearer {secret}"}, json={
            "instance_id": "i1", "worker_id": "i1", "model_id": "m", "advertise_url": "http://127.0.0.1:1",
            "agent_url": "http://127.0.0.1:1"}).json()["bootstrap_token"]
        own_redis.stop()
        resp = requests.post(url + "/internal/worker/heartbeat", headers={"Authorization": f"Bearer {token}"},
                             json={"instance_id": "i1", "worker_id": "i1", "model_id": "m", "status": "draining"},
                             timeout=30)
        assert resp.status_code == 200, resp.text
        created = requests.post(url + "/v1/admin/keys", json={"name": "k"}, headers=ADMIN, timeout=30)
        assert created.status_code == 201 and created.json()["key"].startswith("gfk_")
        assert "reconciler" in created.json()["warning"]
        drained = requests.post(url + "/v1/admin/workers/i1/drain", headers=ADMIN, timeout=30)
        assert drained.status_code == 503 and drained.json()["error"]["code"] == "redis_unavailable"
        conn = psycopg2.connect(database_url)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT status FROM workers")
            assert cur.fetchone() == ("draining",)
        conn.close()
        wait_until(lambda: requests.get(url + "/readyz", timeout=10).status_code == 200, timeout=10)
    finally:
        own_redis.cleanup()


def test_counters_are_summed_over_gunicorn_processes_and_survive_a_worker_restart(daemons, database_url,
                                                                                 redis_url):
    daemon, url = start_control_plane(daemons, cp_env(database_url, redis_url, GPUFLEET_WORKERS="2"))
    client = ControlPlaneClient(url, database_url)
    token = client.enrol("i1")
    for _ in range(6):
        assert client.heartbeat("i1", token).status_code == 200
    children = subprocess.run(["pgrep", "-P", str(daemon.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    os.kill(int(children[0]), signal.SIGTERM)  # gunicorn replaces it
    wait_until(lambda: len(set(subprocess.run(["pgrep", "-P", str(daemon.pid)], capture_output=True,
                                              text=True).stdout.split()) - {children[0]}) == 2,
               timeout=30, what="a replacement worker")
    for _ in range(6):
        assert client.heartbeat("i1", token).status_code == 200
    metrics = requests.get(url + "/metrics", timeout=10).text
    assert 'gpufleet_cp_heartbeats_total{status="starting"} 12.0' in metrics


def test_metrics_only_for_the_allowed_scrapers(daemons, database_url, redis_url):
    _, url = start_control_plane(daemons, cp_env(database_url, redis_url, GPUFLEET_METRICS_ALLOW_FROM="10.9.9.9/32"))
    denied = requests.get(url + "/metrics", timeout=10)
    assert denied.status_code == 403 and "GPUFLEET_METRICS_ALLOW_FROM" in denied.json()["error"]["message"]
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    _, open_url = start_control_plane(daemons, cp_env(database_url, redis_url,
                                                      GPUFLEET_METRICS_ALLOW_FROM="127.0.0.1, 10.9.9.9"),
                                      name="cp-allowed", migrate_first=False)
    assert requests.get(open_url + "/metrics", timeout=10).status_code == 200

"""The `gpufleet` CLI as a real process against a running control plane."""

import hashlib
import json
import os
import subprocess

import psycopg2
import pytest

from gpufleet.controlplane.migrate import available_migrations
from gpufleet.controlplane.testing import ADMIN_TOKEN, cp_env, start_control_plane
from support.procs import console_script, free_port


def run(args, env, check_rc=0):
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    full.update(env)
    proc = subprocess.run([console_script("gpufleet"), *args], env=full, capture_output=True, text=True,
                          timeout=60)
    if check_rc is not None:
        assert proc.returncode == check_rc, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def cli_env(daemons, database_url, redis_url):
    _, url = start_control_plane(daemons, cp_env(database_url, redis_url))
    return {"GPUFLEET_CONTROL_PLANE_URL": url, "GPUFLEET_ADMIN_TOKEN": ADMIN_TOKEN}


def test_keys_create_list_revoke_through_the_cli(cli_env, redis_server):
    client = redis_server.client()
    created = run(["keys", "create", "team-a", "--models", "m1,m2", "--rpm", "30"], cli_env)
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("gfk_") and "shown only now" in created.stdout
    digest = hashlib.sha256(key.encode()).hexdigest()
    published = client.hgetall(f"gpufleet:apikey:{digest}")
    assert published["name"] == "team-a" and published["models"] == "m1,m2" and published["rpm"] == "30"
    key_id = published["key_id"]

    listed = run(["keys", "list"], cli_env).stdout
    assert key_id in listed and "team-a" in listed and key not in listed and digest not in listed
    as_json = json.loads(run(["--json", "keys", "list"], cli_env).stdout)
    assert [k["key_id"] for k in as_json["keys"]] == [key_id]

    assert "revoked" in run(["keys", "revoke", key_id], cli_env).stdout
    assert not client.exists(f"gpufleet:apikey:{digest}")
    assert key_id not in run(["keys", "list"], cli_env).stdout
    assert key_id in run(["keys", "list", "--all"], cli_env).stdout
    failed = run(["keys", "revoke", "key_nope"], cli_env, check_rc=1)
    assert "key_nope" in failed.stderr and "404" in failed.stderr
    client.close()


def test_instances_tokens_workers_status(cli_env, tmp_path):
    added = run(["instances", "add", "gpu-1", "--hostname", "h1", "--model", "m1",
                 "--provider-instance-id", "ocid1.x"], cli_env).stdout
    assert "added" in added and added.strip().splitlines()[-1].startswith("gfj_")
    again = run(["instances", "add", "gpu-1", "--model", "m1"], cli_env).stdout
    assert "already known" in again and "gfj_" not in again
    # a join secret written to a file: mode 0600, only the path printed
    path = tmp_path / "gpu-2.join"
    to_file = run(["instances", "add", "gpu-2", "--model", "m1", "--worker-id", "gpu-2a", "--worker-id", "gpu-2b",
                   "--join-secret-file", str(path)], cli_env).stdout
    secret = path.read_text().strip()
    assert secret.startswith("gfj_") and secret not in to_file and str(path) in to_file
    assert path.stat().st_mode & 0o777 == 0o600
    fresh = run(["--json", "instances", "join-secret", "gpu-2", "--file", str(path)], cli_env).stdout
    assert "gfj_" not in fresh and path.read_text().strip() != secret
    assert "HTTP 404" in run(["instances", "join-secret", "ghost"], cli_env, check_rc=1).stderr
    assert "--model" in run(["instances", "add", "gpu-3"], cli_env, check_rc=2).stderr
    listed = run(["instances", "list"], cli_env).stdout
    assert "gpu-1" in listed and "h1" in listed and "ocid1.x" in listed and "gpu-2a,gpu-2b" in listed
    data = json.loads(run(["instances", "list", "--json"], cli_env).stdout)
    assert data["instances"][0]["instance_id"] == "gpu-1" and data["instances"][0]["worker_ids"] == ["gpu-1"]

    rotated = run(["tokens", "rotate", "gpu-1"], cli_env).stdout.strip().splitlines()[-1]
    assert rotated.startswith("gfw_")
    assert "HTTP 404" in run(["tokens", "rotate", "ghost"], cli_env, check_rc=1).stderr
    assert "(none)" in run(["workers"], cli_env).stdout
    status = run(["status"], cli_env).stdout
    assert "instances: 2" in status and "workers:   0" in status
    assert json.loads(run(["--json", "status"], cli_env).stdout)["instances"]["total"] == 2
    drained = run(["drain", "ghost"], cli_env, check_rc=1)
    assert "worker 'ghost' is not known" in drained.stderr
    assert "scaling: off" in run(["scaling"], cli_env).stdout


def test_config_and_auth_errors_say_what_to_set(cli_env):
    missing = run(["status"], {}, check_rc=2)
    assert "GPUFLEET_CONTROL_PLANE_URL is not set" in missing.stderr
    no_token = run(["status"], {"GPUFLEET_CONTROL_PLANE_URL": cli_env["GPUFLEET_CONTROL_PLANE_URL"]}, check_rc=2)
    assert "GPUFLEET_ADMIN_TOKEN is not set" in no_token.stderr
    wrong = run(["status"], {**cli_env, "GPUFLEET_ADMIN_TOKEN": "not-the-admin-token"}, check_rc=1)
    assert "invalid admin token" in wrong.stderr and "HTTP 401" in wrong.stderr
    down = run(["status"], {**cli_env, "GPUFLEET_CONTROL_PLANE_URL": f"http://127.0.0.1:{free_port()}"}, check_rc=1)
    assert "cannot reach the control plane" in down.stderr
    assert run(["keys"], cli_env, check_rc=2).returncode == 2  # usage error from argparse


def test_db_migrate_is_idempotent_and_safe_concurrently(postgres_server):
    dsn = postgres_server.create_database(f"migrate_{os.getpid()}")
    env = {"GPUFLEET_DATABASE_URL": dsn}
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    full.update(env)
    procs = [subprocess.Popen([console_script("gpufleet"), "--json", "db", "migrate"], env=full,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    applied = [json.loads(out)["applied"] for out, _ in outputs]
    # exactly one run applied the migrations; the others found the schema up to date
    shipped = [(m.version, m.name) for m in available_migrations()]
    assert sorted(len(a) for a in applied) == [0, 0, len(shipped)]
    again = json.loads(run(["--json", "db", "migrate"], env).stdout)
    assert again == {"applied": [], "version": shipped[-1][0]}
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        assert cur.fetchall() == shipped
        assert shipped[:3] == [(1, "initial"), (2, "reconciler_state"), (3, "enrolment")]
    conn.close()
    assert "GPUFLEET_DATABASE_URL is not set" in run(["db", "migrate"], {}, check_rc=2).stderr

"""Helpers for tests that run the control plane and reconciler as real processes
(this project's own tests and the agent's end-to-end tests).

``daemons`` is the test harness's starter (``tests/conftest.py``): anything with
``start(name, argv, env)``, ``script(name)``, ``port()`` and ``wait_http(url, ...)``.

Also a tiny real HTTP server standing in for an agent's ``/readyz`` whose answer a test
controls through a file: ``python -m gpufleet.controlplane.testing readyz-stub PORT FILE``
(the file holds the status code to answer; missing file → 503).
"""

from __future__ import annotations

import argparse
import http.server
import shutil
import subprocess
import sys
from pathlib import Path

from gpufleet.controlplane.migrate import migrate

ADMIN_TOKEN = "gfa_test-admin-token-0123456789abcdef"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def registration(instance_id: str, worker_id: str | None = None, **overrides) -> dict:
    """A valid register payload (what the agent sends), with ``overrides``."""
    body = {"instance_id": instance_id, "worker_id": worker_id or instance_id, "provider_instance_id": "prov-1",
            "model_id": "m1", "advertise_url": "http://127.0.0.1:1", "agent_url": "http://127.0.0.1:1",
            "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
            "gpus": [{"index": 0, "name": "H100", "memory_total_mb": 81559}], "agent_version": "0.2.0"}
    body.update(overrides)
    return body


class ControlPlaneClient:
    """Calls a running control plane the way the agent and the operator do, and reads
    its database directly for assertions."""

    def __init__(self, url: str, database_url: str, redis_client=None):
        self.url = url
        self.db = database_url
        self.redis = redis_client
        self.join_secrets: dict[str, str] = {}  # instance id -> the join secret its add returned

    def admin(self, method: str, path: str, **kw):
        import requests  # noqa: PLC0415 - a test dependency

        return requests.request(method, self.url + path, headers=ADMIN_HEADERS, timeout=10, **kw)

    def add_instance(self, instance_id: str, model_id: str = "m1", **kw):
        """Add the instance (for ``model_id``); keeps the join secret it returns."""
        resp = self.admin("POST", "/v1/admin/instances", json={"instance_id": instance_id, "model_id": model_id,
                                                               **kw})
        assert resp.status_code in (200, 201), resp.text
        if resp.status_code == 201:
            self.join_secrets[instance_id] = resp.json()["join_secret"]
        return resp

    def register(self, instance_id: str, worker_id: str | None = None, token: str | None = None, **overrides):
        import requests  # noqa: PLC0415

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(self.url + "/internal/worker/register", json=registration(instance_id, worker_id,
                                                                                        **overrides),
                             headers=headers, timeout=10)

    def enrol(self, instance_id: str, model_id: str = "m1", **overrides) -> str:
        """Add the instance and register it with its join secret (the real enrolment);
        returns the worker token."""
        self.add_instance(instance_id, model_id)
        resp = self.register(instance_id, token=self.join_secrets[instance_id], model_id=model_id, **overrides)
        assert resp.status_code == 200, resp.text
        return resp.json()["bootstrap_token"]

    def heartbeat(self, instance_id: str, token: str | None, worker_id: str | None = None, **fields):
        import requests  # noqa: PLC0415

        body = {"instance_id": instance_id, "worker_id": worker_id or instance_id, "status": "starting",
                "model_id": "m1", **fields}
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(self.url + "/internal/worker/heartbeat", json=body, headers=headers, timeout=10)

    def query(self, sql: str, args=()):
        import psycopg2  # noqa: PLC0415

        conn = psycopg2.connect(self.db)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()


def enrol_instance(cp_url: str, instance_id: str, model_id: str, secret_dir, *,
                   worker_ids: list[str] | None = None, admin_token: str = ADMIN_TOKEN) -> str:
    """What the role does for a new worker: add the instance through the admin API and
    hand its join secret over in a 0600 file; returns the file's path (the agent's
    ``WORKER_JOIN_SECRET_FILE``)."""
    import requests  # noqa: PLC0415

    from gpufleet.common.secretfile import write_secret_file  # noqa: PLC0415

    body = {"instance_id": instance_id, "model_id": model_id}
    if worker_ids:
        body["worker_ids"] = worker_ids
    resp = requests.post(cp_url + "/v1/admin/instances", json=body,
                         headers={"Authorization": f"Bearer {admin_token}"}, timeout=10)
    assert resp.status_code == 201, resp.text
    path = str(Path(secret_dir) / f"{instance_id}.join-secret")
    write_secret_file(path, resp.json()["join_secret"])
    return path


def cp_env(database_url: str, redis_url: str, admin_token: str = ADMIN_TOKEN, **overrides) -> dict:
    env = {
        "GPUFLEET_DATABASE_URL": database_url,
        "GPUFLEET_REDIS_URL": redis_url,
        "GPUFLEET_ADMIN_TOKEN": admin_token,
        "GPUFLEET_HEARTBEAT_INTERVAL_S": "1",
        "GPUFLEET_RECONCILE_INTERVAL_S": "0.5",
        "GPUFLEET_PROBE_TIMEOUT_S": "1",
        "GPUFLEET_WORKERS": "2",
        "GPUFLEET_SCALING_ENABLED": "false",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def start_control_plane(daemons, env: dict, *, name: str = "controlplane", migrate_first: bool = True):
    """Migrate, start ``gpufleet-controlplane`` on a free port, wait for /readyz; returns
    (daemon, base_url)."""
    if migrate_first:
        migrate(env["GPUFLEET_DATABASE_URL"])
    port = daemons.port()
    daemon = daemons.start(name, [daemons.script("gpufleet-controlplane")],
                           {**env, "GPUFLEET_BIND": f"127.0.0.1:{port}"})
    base_url = f"http://127.0.0.1:{port}"
    daemons.wait_http(base_url + "/readyz", timeout=60, proc=daemon)
    return daemon, base_url


def start_reconciler(daemons, env: dict, *, name: str = "reconciler"):
    return daemons.start(name, [daemons.script("gpufleet-reconciler")], env)


def run_cli(cp_url: str, *args: str, admin_token: str = ADMIN_TOKEN) -> str:
    """Run the operator CLI ``gpufleet ARGS`` as an operator would; its stdout, or
    AssertionError with its stderr when it fails."""
    script = Path(sys.executable).with_name("gpufleet")
    env = {"GPUFLEET_CONTROL_PLANE_URL": cp_url, "GPUFLEET_ADMIN_TOKEN": admin_token, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(script) if script.exists() else shutil.which("gpufleet"), *args], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"gpufleet {' '.join(args)}: {result.stderr}"
    return result.stdout


class _ReadyzHandler(http.server.BaseHTTPRequestHandler):
    state_file: Path

    def do_GET(self):  # noqa: N802 - http.server's naming
        try:
            status = int(self.state_file.read_text().strip() or "503")
        except (OSError, ValueError):
            status = 503
        body = b'{"status":"ready"}' if status == 200 else b'{"status":"not ready","reason":"stub says no"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpufleet.controlplane.testing")
    sub = parser.add_subparsers(dest="cmd", required=True)
    stub = sub.add_parser("readyz-stub", help="answer every GET with the status code in FILE")
    stub.add_argument("port", type=int)
    stub.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    handler = type("Handler", (_ReadyzHandler,), {"state_file": args.file})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.serve_forever()


if __name__ == "__main__":
    main()

"""API keys created and revoked continuously while reconcile cycles run (issue 9).

Real control plane, reconciler (each 1.2 s cycle publishes 100 workers and re-syncs every
key: longer than the 1 s allowed, so a key a cycle wrongly writes stays wrong until checked),
router (2 processes), PostgreSQL and Redis. One second after a create returns, the key
must work at the router; one second after a revoke returns, it must be refused — and stay
refused. Before keysync.py, a cycle that read the keys before a change and wrote them
after it (having published the workers in between) brought revoked keys back and deleted
new ones.
"""

import threading
import time

import requests

from gpufleet.controlplane.testing import ControlPlaneClient, cp_env, start_control_plane, start_reconciler
from support.procs import console_script

RUN_S = 10.0
WORKERS = 100


def test_no_revoked_key_accepted_and_no_new_key_refused_after_one_second(daemons, database_url, redis_url):
    env = cp_env(database_url, redis_url, GPUFLEET_RECONCILE_INTERVAL_S="1.2")
    _, url = start_control_plane(daemons, env)
    cp = ControlPlaneClient(url, database_url)
    # a fleet, so each cycle spends a realistic while on Redis between reading and writing keys
    for i in range(WORKERS):
        cp.enrol(f"w{i}")
    start_reconciler(daemons, env)
    port = daemons.port()
    router = daemons.start("router", [console_script("gpufleet-router")], {
        "GPUFLEET_REDIS_URL": redis_url, "GPUFLEET_BIND": f"127.0.0.1:{port}", "GPUFLEET_ROUTER_PROCESSES": "2"})
    router_url = f"http://127.0.0.1:{port}"
    daemons.wait_http(router_url + "/healthz", timeout=30, proc=router)

    def router_status(key: str) -> int:
        return requests.get(router_url + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                            timeout=10).status_code

    results = {"new_refused": [], "revoked_accepted": [], "new_checked": 0, "revoked_checked": 0}
    lock = threading.Lock()
    timers: list[threading.Timer] = []
    revoked: list[str] = []

    def check_new(key):
        status = router_status(key)
        with lock:
            results["new_checked"] += 1
            if status == 401:
                results["new_refused"].append(key[:12])

    def check_revoked(key):
        status = router_status(key)
        with lock:
            results["revoked_checked"] += 1
            if status != 401:
                results["revoked_accepted"].append((key[:12], status))

    def later(fn, key):
        timer = threading.Timer(1.0, fn, args=(key,))
        timer.daemon = True
        timer.start()
        timers.append(timer)

    def churn():
        session = requests.Session()
        session.headers["Authorization"] = cp.admin("GET", "/v1/admin/keys").request.headers["Authorization"]
        n = 0
        deadline = time.monotonic() + RUN_S
        while time.monotonic() < deadline:
            created = session.post(url + "/v1/admin/keys", json={"name": f"race-{n}"}, timeout=30)
            assert created.status_code == 201, created.text
            key, key_id = created.json()["key"], created.json()["key_id"]
            if n % 2:
                router_status(key)  # used at once, as clients do (a refusal is cached by the router)
                later(check_new, key)
            else:
                router_status(key)  # in use (and cached by the router) before it is revoked
                assert session.delete(f"{url}/v1/admin/keys/{key_id}", timeout=30).status_code == 200
                later(check_revoked, key)
                revoked.append(key)
            n += 1

    workers = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=RUN_S + 60)
    for timer in timers:
        timer.join(timeout=30)
    # and revoked stays revoked: many cycles later, none has come back
    time.sleep(1.0)
    for key in revoked:
        check_revoked(key)

    print(f"\nnew keys checked {results['new_checked']}, refused after 1 s: {len(results['new_refused'])}; "
          f"revoked keys checked {results['revoked_checked']}, accepted after 1 s: "
          f"{len(results['revoked_accepted'])}")
    assert results["new_checked"] >= 20 and results["revoked_checked"] >= 40, results
    assert results["new_refused"] == [], results
    assert results["revoked_accepted"] == [], results

"""Hostile workers cannot stall the control plane or its reconciler (issue 9).

Real control plane, reconciler, PostgreSQL and Redis; one real HTTP server process plays
26 agents' ``/readyz`` (``gpufleet.controlplane.fakeagents``): 3 honest, 20 trickling their
answer a byte every 1.5 s, one sending thousands of nested ``[``, one garbage, one huge
headers. The hostile ones heartbeat ``ready`` twice a second (each such heartbeat asked
the old handler for an inline probe). The honest workers' heartbeats stay fast (the strict
figure is in bench/controlplane_scale.py), every reconcile cycle completes, and each
hostile worker is marked failed with its own reason.
"""

import sys
import threading
import time

import requests

from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.fakeagents import agent_url
from gpufleet.controlplane.testing import (
    ControlPlaneClient,
    cp_env,
    registration,
    start_control_plane,
    start_reconciler,
)
from support.procs import wait_until

HONEST = [f"h{i}" for i in range(3)]
HOSTILE = {**{f"t{i}": "trickle" for i in range(20)}, "d0": "deep", "g0": "garbage", "x0": "huge"}


def beat(url, instance_id, token, session, status="ready"):
    return session.post(url + "/internal/worker/heartbeat", timeout=30, headers={"Authorization": f"Bearer {token}"},
                        json={"instance_id": instance_id, "worker_id": instance_id, "status": status, "model_id": "m1"})


def test_trickling_and_deep_json_agents_stall_neither_heartbeats_nor_cycles(daemons, database_url, redis_url,
                                                                          redis_server):
    env = cp_env(database_url, redis_url)
    _, url = start_control_plane(daemons, env)
    cp = ControlPlaneClient(url, database_url)
    agents_port = daemons.port()
    agents = daemons.start("fake-agents", [sys.executable, "-m", "gpufleet.controlplane.fakeagents",
                                           str(agents_port)])
    wait_until(lambda: requests.get(agent_url(agents_port, "ok", "probe") + "/readyz", timeout=2).ok, timeout=20,
               what="the fake agents")
    assert agents.alive()
    tokens = {}
    for worker_id in HONEST + list(HOSTILE):
        cp.add_instance(worker_id)
        target = agent_url(agents_port, HOSTILE.get(worker_id, "ok"), worker_id)
        resp = requests.post(url + "/internal/worker/register", timeout=10,
                             headers={"Authorization": f"Bearer {cp.join_secrets[worker_id]}"},
                             json=registration(worker_id, agent_url=target))
        assert resp.status_code == 200, resp.text
        tokens[worker_id] = resp.json()["bootstrap_token"]
    start_reconciler(daemons, env)
    wait_until(lambda: cp.query("SELECT count(*) FROM reconciler_state")[0][0] == 1, timeout=60,
               what="the reconciler's first cycle")

    stop = threading.Event()
    latencies: list[float] = []
    failures: list[str] = []

    def honest(worker_id):
        session = requests.Session()
        while not stop.is_set():
            started = time.monotonic()
            try:
                resp = beat(url, worker_id, tokens[worker_id], session)
                if resp.status_code != 200:
                    failures.append(f"{worker_id}: HTTP {resp.status_code}")
            except requests.RequestException as exc:
                failures.append(f"{worker_id}: {type(exc).__name__}")
            latencies.append(time.monotonic() - started)
            stop.wait(0.2)

    def hostile(worker_id):
        session = requests.Session()
        while not stop.is_set():
            try:
                beat(url, worker_id, tokens[worker_id], session)
            except requests.RequestException:
                pass
            stop.wait(0.5)

    cycle_ages = []
    threads = [threading.Thread(target=honest, args=(w,), daemon=True) for w in HONEST]
    threads += [threading.Thread(target=hostile, args=(w,), daemon=True) for w in HOSTILE]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = cp.query("SELECT extract(epoch FROM now() - last_cycle_at)::float8 FROM reconciler_state")
            cycle_ages.append(row[0][0] if row else None)
            time.sleep(0.25)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\nhonest heartbeats: {len(latencies)}, p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms; oldest reconcile cycle seen {max(a or 0 for a in cycle_ages):.2f} s")
    assert not failures, failures[:5]
    assert p99 < 1.0, f"honest heartbeats p99 {p99:.3f}s"  # loose here: a busy 2-core machine; the bench is strict
    # every cycle completes: the last one is never older than a few intervals (0.5 s here)
    assert cycle_ages and None not in cycle_ages, cycle_ages
    assert max(cycle_ages) < 5.0, cycle_ages  # interval 0.5 s; generous for a loaded machine

    ready = redis_server.client().smembers(RedisKeys().ready_set("m1"))
    assert ready == set(HONEST)
    errors = dict(cp.query("SELECT worker_id, last_probe_error FROM workers WHERE last_probe_ok = false"))
    assert set(errors) == set(HOSTILE), errors
    assert all("no complete answer within" in errors[w] for w in HOSTILE if HOSTILE[w] == "trickle"), errors
    assert errors["d0"].startswith("HTTP 503"), errors["d0"]
    assert all("\n" not in e for e in errors.values())

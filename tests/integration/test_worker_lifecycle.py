"""A worker's way in and out of the ready set, end to end.

Real PostgreSQL, Redis, control plane, reconciler, simulator and agent processes; the
operator's side goes through the ``gpufleet`` CLI. Heartbeat 1 s (stale after 3 s),
reconcile every 0.5 s; the bounds below add tolerance for a loaded 2-core machine.
"""

import json
import threading
import time
from dataclasses import dataclass

import pytest
import requests

from gpufleet.agent.testing import TcpRelay, start_sim
from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.testing import cp_env, run_cli, start_control_plane, start_reconciler
from support.procs import wait_until
from support.workers import enrol_agent

MODEL = "tiny-llm"
HEARTBEAT_S = 1.0
RECONCILE_S = 0.5
SLACK_S = 2.0  # scheduling noise on a busy machine


@dataclass
class Fleet:
    daemons: object
    cp_url: str
    redis: object

    def cli(self, *args: str) -> str:
        return run_cli(self.cp_url, *args)

    def ready(self, worker_id: str = "gpu-a") -> bool:
        return self.redis.sismember(RedisKeys().ready_set(MODEL), worker_id)

    def start_worker(self, *sim_args: str, instance_id: str = "gpu-a", cp_url: str | None = None,
                     sim_port: int | None = None, wait_sim: bool = True):
        sim, sim_url = start_sim(self.daemons, MODEL, *sim_args, port=sim_port, wait=wait_sim,
                                 name=f"sim-{instance_id}")
        agent, agent_url = enrol_agent(self.daemons, self.cp_url, instance_id, MODEL, sim_url, agent_cp_url=cp_url)
        return sim, sim_url, agent, agent_url


@pytest.fixture
def fleet(daemons, database_url, redis_url, redis_server):
    env = cp_env(database_url, redis_url)
    _, cp_url = start_control_plane(daemons, env)
    start_reconciler(daemons, env)
    client = redis_server.client()
    yield Fleet(daemons, cp_url, client)
    client.close()


def readyz_code(agent_url: str) -> int:
    return requests.get(agent_url + "/readyz", timeout=5).status_code


def seconds_until(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    wait_until(predicate, timeout=timeout, interval=0.05, what=what)
    return time.monotonic() - started


def test_joins_within_a_heartbeat_of_ready_and_leaves_when_vllm_dies(fleet):
    sim, sim_url, _, agent_url = fleet.start_worker("--startup-delay", "3", wait_sim=False)
    # while vLLM loads the model, the worker is registered but not routable
    wait_until(lambda: requests.get(agent_url + "/info", timeout=5).json()["registration"]["accepted"],
               timeout=20, what="the registration")
    assert readyz_code(agent_url) == 503 and not fleet.ready()

    wait_until(lambda: readyz_code(agent_url) == 200, timeout=30, interval=0.05, what="the agent to be ready")
    joined = seconds_until(fleet.ready, HEARTBEAT_S + SLACK_S, "the worker to join the ready set")
    assert joined <= HEARTBEAT_S + SLACK_S
    worker = fleet.redis.hgetall(RedisKeys().worker("gpu-a"))
    assert worker["url"] == sim_url and worker["status"] == "ready"
    assert MODEL in fleet.redis.smembers(RedisKeys().models)

    sim.kill9()
    left = seconds_until(lambda: not fleet.ready(), RECONCILE_S + SLACK_S, "the worker to leave with vLLM dead")
    assert left <= RECONCILE_S + SLACK_S
    assert readyz_code(agent_url) == 503


def test_leaves_when_the_agent_dies(fleet):
    _, _, agent, agent_url = fleet.start_worker()
    wait_until(fleet.ready, timeout=30, what="the worker to join the ready set")
    agent.kill9()
    left = seconds_until(lambda: not fleet.ready(), RECONCILE_S + SLACK_S, "the worker to leave with its agent dead")
    assert left <= RECONCILE_S + SLACK_S


def test_leaves_when_heartbeats_stop_though_readyz_still_passes(fleet):
    host, _, port = fleet.cp_url.removeprefix("http://").rpartition(":")
    relay = TcpRelay(host, int(port))
    try:
        _, _, _, agent_url = fleet.start_worker(cp_url=relay.url)
        wait_until(fleet.ready, timeout=30, what="the worker to join the ready set")
        relay.cut()  # the worker can no longer reach the control plane; its /readyz keeps answering 200
        cut_at = time.monotonic()
        wait_until(lambda: not fleet.ready(), timeout=3 * HEARTBEAT_S + RECONCILE_S + SLACK_S + 2,
                   interval=0.05, what="the stale worker to leave the ready set")
        left = time.monotonic() - cut_at
        assert readyz_code(agent_url) == 200  # so it was the missing heartbeats that removed it
        # stale = last heartbeat older than 3 x interval; the last one was up to one interval before the cut
        assert 3 * HEARTBEAT_S - HEARTBEAT_S - 0.5 <= left <= 3 * HEARTBEAT_S + RECONCILE_S + SLACK_S, left

        relay.restore()
        wait_until(fleet.ready, timeout=HEARTBEAT_S + RECONCILE_S + SLACK_S + 3, what="the worker to come back")
    finally:
        relay.close()


def test_drain_through_the_agent_and_through_the_cli(fleet):
    _, sim_url, _, agent_url = fleet.start_worker("--itl-ms", "50", "--jitter", "0")
    wait_until(fleet.ready, timeout=30, what="the worker to join the ready set")

    # a long request is in flight when the drain begins: /info counts it until it finishes
    done = threading.Event()

    def long_request():
        try:
            requests.post(sim_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 50,
                                                             "ignore_eos": True}, timeout=30)
        finally:
            done.set()
    threading.Thread(target=long_request, daemon=True).start()
    wait_until(lambda: requests.get(agent_url + "/info", timeout=5).json()["inflight"] == 1, timeout=10,
               what="the request to be in flight")

    resp = requests.post(agent_url + "/drain", timeout=5)
    assert resp.status_code == 200 and resp.json()["draining"] is True
    left = seconds_until(lambda: not fleet.ready(), 1.0 + SLACK_S, "the draining worker to leave the ready set")
    assert left <= 1.0 + SLACK_S  # the drain heartbeat goes out at once, not at the next interval
    body = requests.get(agent_url + "/readyz", timeout=5).json()
    assert body["failing"] == ["not_draining"] and body["status"] == "draining"
    workers = json.loads(fleet.cli("--json", "workers"))
    assert [w["status"] for w in workers["workers"] if w["worker_id"] == "gpu-a"] == ["draining"]
    # a rollout waits for in-flight to reach zero
    assert requests.get(agent_url + "/info", timeout=5).json()["inflight"] == 1
    assert done.wait(15)
    wait_until(lambda: requests.get(agent_url + "/info", timeout=5).json()["inflight"] == 0, timeout=5,
               what="in-flight to reach zero")

    assert requests.post(agent_url + "/undrain", timeout=5).status_code == 200
    wait_until(fleet.ready, timeout=HEARTBEAT_S + RECONCILE_S + SLACK_S + 2, what="the undrained worker to return")

    # the operator's drain: out of the ready set at once, and the agent hears it in its next heartbeat answer
    fleet.cli("drain", "gpu-a")
    assert not fleet.ready()
    wait_until(lambda: requests.get(agent_url + "/info", timeout=5).json()["status"] == "draining",
               timeout=HEARTBEAT_S + SLACK_S, what="the agent to obey desired_status=draining")
    assert readyz_code(agent_url) == 503
    time.sleep(2 * HEARTBEAT_S)
    assert not fleet.ready()

    fleet.cli("undrain", "gpu-a")
    wait_until(lambda: readyz_code(agent_url) == 200, timeout=HEARTBEAT_S + SLACK_S + 2,
               what="the agent to return to service")
    wait_until(fleet.ready, timeout=HEARTBEAT_S + RECONCILE_S + SLACK_S + 2, what="the worker to rejoin")

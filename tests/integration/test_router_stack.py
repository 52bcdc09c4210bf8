"""The whole stack in front of the router: PostgreSQL, control plane, reconciler, agents and
simulators as real processes; the operator's side through the ``gpufleet`` CLI."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest
import requests
from test_router_helpers import VLLM_KEY, metric_sum, parse_metrics, run_load

from gpufleet.agent.testing import start_sim
from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.testing import cp_env, run_cli, start_control_plane, start_reconciler
from support.procs import wait_until
from support.router import start_router
from support.workers import enrol_agent

MODEL = "stack-model"


class Stack:
    def __init__(self, daemons, database_url, redis_url, redis_server):
        self.daemons = daemons
        env = cp_env(database_url, redis_url)
        _, self.cp_url = start_control_plane(daemons, env)
        start_reconciler(daemons, env)
        self.redis = redis_server.client()
        self.redis_url = redis_url
        self.sims: dict[str, str] = {}

    def cli(self, *args: str) -> str:
        return run_cli(self.cp_url, *args)

    def worker(self, instance_id: str) -> str:
        _, sim_url = start_sim(self.daemons, MODEL, "--api-key", VLLM_KEY, name=f"sim-{instance_id}")
        enrol_agent(self.daemons, self.cp_url, instance_id, MODEL, sim_url, VLLM_API_KEY=VLLM_KEY)
        self.sims[instance_id] = sim_url
        return sim_url

    def ready(self) -> set[str]:
        return self.redis.smembers(RedisKeys().ready_set(MODEL))

    def router(self) -> str:
        return start_router(self.daemons, self.redis_url, VLLM_KEY, workers=len(self.sims))


def sim_metrics(url: str) -> dict:
    return parse_metrics(requests.get(url + "/metrics", timeout=5).text)


def received(url: str) -> float:
    m = sim_metrics(url)
    return sum(metric_sum(m, name) for name in ("vllm:num_requests_running", "vllm:num_requests_waiting")) + sum(
        metric_sum(m, "vllm:request_success_total", finished_reason=r) for r in ("stop", "length", "abort"))


@pytest.fixture
def stack(daemons, database_url, redis_url, redis_server):
    s = Stack(daemons, database_url, redis_url, redis_server)
    yield s
    s.redis.close()


def test_cli_key_openai_client_drain_under_load_and_revoke(stack):
    stack.worker("gpu-a")
    stack.worker("gpu-b")
    wait_until(lambda: stack.ready() == {"gpu-a", "gpu-b"}, timeout=30, what="both workers to be routable")
    router_url = stack.router()

    created = json.loads(stack.cli("--json", "keys", "create", "stack-test"))
    client = openai.OpenAI(base_url=router_url + "/v1", api_key=created["key"], max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.content
    stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=4, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)

    # drain gpu-a through the CLI while requests flow: nobody sees an error, gpu-a finishes what it has
    statuses: list = []
    progress = threading.Event()

    def one(i):
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"drain {i}"}],
                                           max_tokens=30)
            statuses.append(200)
        except openai.APIError as exc:
            statuses.append(repr(exc))
        if len(statuses) >= 30:
            progress.set()

    loader = threading.Thread(target=lambda: run_load(one, 300, 12), daemon=True)
    loader.start()
    assert progress.wait(60)
    stack.cli("drain", "gpu-a")
    time.sleep(0.5)  # the control plane's event reaches the routers within milliseconds
    drained_received = received(stack.sims["gpu-a"])
    loader.join(timeout=180)
    assert statuses.count(200) == 300, [s for s in statuses if s != 200][:5]
    wait_until(lambda: metric_sum(sim_metrics(stack.sims["gpu-a"]), "vllm:num_requests_running") == 0, timeout=30,
               what="gpu-a to finish its in-flight requests")
    # nothing new after the drain (<=: the simulator may count a request that is just finishing twice
    # in one page of metrics; a new arrival would push the count above the snapshot)
    assert received(stack.sims["gpu-a"]) <= drained_received
    assert metric_sum(sim_metrics(stack.sims["gpu-a"]), "vllm:request_success_total", finished_reason="abort") == 0
    assert received(stack.sims["gpu-b"]) > drained_received

    # revoke through the CLI: refused within a few seconds
    stack.cli("keys", "revoke", created["key_id"])
    revoked_at = time.monotonic()
    wait_until(lambda: requests.post(router_url + "/v1/chat/completions",
                                     json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                                     headers={"Authorization": f"Bearer {created['key']}"},
                                     timeout=10).status_code == 401, timeout=10, what="the revoked key to be refused")
    assert time.monotonic() - revoked_at < 6
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)

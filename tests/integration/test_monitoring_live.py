"""Monitoring against a live local fleet: a real Prometheus (Debian's package) discovers a
real control plane, reconciler, router, simulators and agents through the control plane's
HTTP service discovery, scrapes them every second, evaluates gpufleet's rules, and every
query of the Grafana dashboard returns data through Prometheus's HTTP API."""

from __future__ import annotations

import json
import time

import openai
import pytest
import requests

from gpufleet.agent.testing import start_sim
from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.testing import cp_env, run_cli, start_reconciler
from support.procs import console_script, wait_until
from support.prometheus import PrometheusServer, dashboard, panel_queries
from support.workers import enrol_agent

MODEL = "obs-model"
VLLM_KEY = "sim-fleet-secret-obs"
SD_TOKEN = "gfs_sd-token-for-the-live-test-0123"
WORKERS = ("gpu-a", "gpu-b")


@pytest.fixture
def live_fleet(daemons, database_url, redis_url, redis_server):
    router_port = daemons.port()
    cp_port = daemons.port()
    router_url, cp_url = f"http://127.0.0.1:{router_port}", f"http://127.0.0.1:{cp_port}"
    env = cp_env(database_url, redis_url, GPUFLEET_SD_TOKEN=SD_TOKEN, GPUFLEET_SD_ROUTER_URLS=router_url,
                 GPUFLEET_SD_CONTROLPLANE_URLS=cp_url,
                 # a scaling loop with the `log` actuator, so the scaling panel has decisions to show
                 GPUFLEET_SCALING_ENABLED="true", GPUFLEET_SCALING_INTERVAL_S="1")
    from gpufleet.controlplane.migrate import migrate  # noqa: PLC0415

    migrate(database_url)
    cp = daemons.start("controlplane", [console_script("gpufleet-controlplane")],
                       {**env, "GPUFLEET_BIND": f"127.0.0.1:{cp_port}"})
    daemons.wait_http(cp_url + "/readyz", timeout=60, proc=cp)
    start_reconciler(daemons, env)
    for i, instance_id in enumerate(WORKERS):
        # the second worker fails a fifth of its completions: the router retries them elsewhere
        faults = ("--fault-rate", "0.2", "--fault-mode", "error") if i else ()
        _, sim_url = start_sim(daemons, MODEL, "--api-key", VLLM_KEY, "--ttft-ms", "20", "--itl-ms", "2", *faults,
                               name=f"sim-{instance_id}")
        enrol_agent(daemons, cp_url, instance_id, MODEL, sim_url, VLLM_API_KEY=VLLM_KEY)
    client = redis_server.client()
    wait_until(lambda: client.smembers(RedisKeys().ready_set(MODEL)) == set(WORKERS), timeout=60,
               what="both workers to be routable")
    client.close()
    router = daemons.start("router", [console_script("gpufleet-router")], {
        "GPUFLEET_REDIS_URL": redis_url, "GPUFLEET_BIND": f"127.0.0.1:{router_port}",
        "GPUFLEET_VLLM_API_KEY": VLLM_KEY, "GPUFLEET_ROUTER_PROCESSES": "2"})
    daemons.wait_http(router_url + "/healthz", timeout=30, proc=router)
    wait_until(lambda: requests.get(router_url + "/readyz", timeout=5).json()["workers"] == len(WORKERS),
               timeout=30, what="the router to see the workers")
    prometheus = PrometheusServer(cp_url + "/v1/sd/prometheus", SD_TOKEN).start()
    yield {"cp_url": cp_url, "router_url": router_url, "prometheus": prometheus}
    prometheus.cleanup()


def send_traffic(cp_url: str, router_url: str, seconds: float) -> int:
    key = json.loads(run_cli(cp_url, "--json", "keys", "create", "obs-test"))["key"]
    client = openai.OpenAI(base_url=router_url + "/v1", api_key=key, max_retries=0, timeout=30)
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sent % 2:
                stream = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"hello {sent}"}], max_tokens=8,
                    stream=True, stream_options={"include_usage": True})
                for _ in stream:
                    pass
            else:
                client.completions.create(model=MODEL, prompt=f"count {sent}", max_tokens=8)
        except openai.APIError:
            pass  # the faulty worker's errors that no retry saved: they feed the 5xx panels
        sent += 1
    return sent


def test_prometheus_discovers_the_fleet_and_every_dashboard_query_returns_data(live_fleet):
    prometheus = live_fleet["prometheus"]
    expected = {("controlplane", None), ("router", None)} | {(r, w) for w in WORKERS for r in ("agent", "vllm")}

    last: list = []

    def all_up():
        last[:] = targets = prometheus.targets()
        seen = {(t["labels"]["role"], t["labels"].get("worker_id")) for t in targets}
        return seen == expected and all(t["health"] == "up" for t in targets) and targets
    try:
        targets = wait_until(all_up, timeout=30, interval=0.5, what="every discovered target to be up")
    except TimeoutError:
        pytest.fail("targets: " + json.dumps([(t["labels"], t["health"], t["lastError"]) for t in last]))
    for t in targets:
        if t["labels"]["role"] in ("agent", "vllm"):
            assert t["labels"]["model"] == MODEL and t["labels"]["instance_id"] == t["labels"]["worker_id"]

    assert send_traffic(live_fleet["cp_url"], live_fleet["router_url"], seconds=8) > 20

    queries = list(panel_queries(dashboard(), model=MODEL))
    gpus = sum(float(s["value"][1]) for s in prometheus.query("gpufleet_agent_gpus"))
    missing: dict = {}

    def every_query_has_data():
        missing.clear()
        for title, ref, expr in queries:
            if gpus == 0 and "gpufleet_agent_gpu_" in expr:
                continue  # per-GPU series need NVML; the panel's other target (GPUs seen) is checked
            if not prometheus.query(expr):
                missing[(title, ref)] = expr
        return not missing
    try:
        wait_until(every_query_has_data, timeout=30, interval=1, what="every panel query to return data")
    except TimeoutError:
        pytest.fail(f"panel queries without data: {json.dumps({f'{t} [{r}]': e for (t, r), e in missing.items()})}")
    # the rules ran against live data: one routable-worker count per model
    routable = prometheus.query(f'model:gpufleet_routable_workers:count{{model="{MODEL}"}}')
    assert [s["value"][1] for s in routable] == ["2"]
    # and the healthy fleet fires none of the alerts that need no time to build up
    firing = prometheus.query('ALERTS{alertstate="firing"}')
    assert firing == [], firing

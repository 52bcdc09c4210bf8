"""The agent's /metrics and heartbeats report what vLLM (the simulator) really does.

Real PostgreSQL, Redis, control plane, simulator and agent.
"""

import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.agent.testing import agent_env, start_agent, start_sim
from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.testing import cp_env, enrol_instance, start_control_plane, start_reconciler
from support.procs import wait_until

MODEL = "tiny-llm"
TTFT_MS = 200


def scrape(url):
    text = requests.get(url + "/metrics", timeout=5).text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine")))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def complete(sim_url, max_tokens, timeout=60):
    return requests.post(sim_url + "/v1/completions", json={"model": MODEL, "prompt": "Say something long.",
                                                             "max_tokens": max_tokens, "ignore_eos": True},
                         timeout=timeout)


@pytest.fixture
def worker(daemons, database_url, redis_url, tmp_path):
    env = cp_env(database_url, redis_url)
    _, cp = start_control_plane(daemons, env)
    start_reconciler(daemons, env)  # probes the worker into Redis (the API never calls a worker)
    secret_file = enrol_instance(cp, "gpu-a", MODEL, tmp_path)
    _, sim_url = start_sim(daemons, MODEL, "--max-num-seqs", "2", "--ttft-ms", str(TTFT_MS), "--itl-ms", "50",
                           "--jitter", "0", "--slowdown-per-seq", "0", "--prefill-ms-per-token", "0")
    agent, agent_url = start_agent(daemons, agent_env(instance_id="gpu-a", control_plane_url=cp, model_id=MODEL,
                                                      vllm_base_url=sim_url, port=daemons.port(),
                                                      WORKER_JOIN_SECRET_FILE=secret_file))
    wait_until(lambda: requests.get(agent_url + "/readyz", timeout=5).status_code == 200, timeout=30,
               what="the agent to be ready")
    return sim_url, agent_url, agent


def test_ttft_p95_and_queue_under_load_match_the_simulator(worker, redis_server):
    sim_url, agent_url, _ = worker

    # latency: sequential short requests (no queueing), TTFT is the configured 200 ms
    for _ in range(8):
        assert complete(sim_url, 1).status_code == 200

    def ttft_p95():
        value = scrape(agent_url)[("gpufleet_agent_vllm_ttft_seconds", (("quantile", "0.95"),))]
        return value if value > 0 else None
    wait_until(lambda: scrape(agent_url)[("gpufleet_agent_vllm_requests_per_second", ())] > 0, timeout=10,
               what="a request rate")
    p95 = wait_until(ttft_p95, timeout=10, what="a TTFT p95")
    assert p95 == pytest.approx(TTFT_MS / 1000, rel=0.2), p95
    e2e_p95 = scrape(agent_url)[("gpufleet_agent_vllm_e2e_latency_seconds", (("quantile", "0.95"),))]
    assert e2e_p95 == pytest.approx(TTFT_MS / 1000, rel=0.3), e2e_p95
    hb = wait_until(lambda: float(redis_server.client().hget(RedisKeys().worker("gpu-a"), "ttft_p95_ms") or 0),
                    timeout=10, what="the heartbeat's ttft_p95_ms in Redis")
    assert hb == pytest.approx(TTFT_MS, rel=0.2)

    # load: 6 long requests on --max-num-seqs 2 → 2 running, 4 waiting
    threads = [threading.Thread(target=lambda: _swallow(complete, sim_url, 400), daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()

    def both_agree():
        sim, agent = scrape(sim_url), scrape(agent_url)
        pair = ((sim[("vllm:num_requests_running", ())], sim[("vllm:num_requests_waiting", ())]),
                (agent[("gpufleet_agent_vllm_requests_running", ())],
                 agent[("gpufleet_agent_vllm_requests_waiting", ())]))
        return pair if pair == ((2, 4), (2, 4)) else None
    wait_until(both_agree, timeout=15, interval=0.2, what="running 2 / waiting 4 in both /metrics")
    info = requests.get(agent_url + "/info", timeout=5).json()
    assert (info["running"], info["queue_depth"], info["inflight"]) == (2, 4, 6)
    # the heartbeat carries the queue to the control plane, which publishes it for the routers
    wait_until(lambda: redis_server.client().hget(RedisKeys().worker("gpu-a"), "queue_depth") == "4",
               timeout=10, what="queue_depth 4 in the worker's Redis hash")
    # KV-cache usage is reported (the simulator fills it with the running sequences)
    assert 0 < scrape(agent_url)[("gpufleet_agent_vllm_kv_cache_usage_ratio", ())] <= 1


def test_no_nvidia_driver_reports_zero_gpus(worker):
    _, agent_url, agent = worker
    values = scrape(agent_url)
    assert values[("gpufleet_agent_gpus", ())] == 0
    assert not [k for k in values if k[0].startswith("gpufleet_agent_gpu_utilization")]
    assert values[("gpufleet_agent_status", (("status", "ready"),))] == 1
    assert values[("gpufleet_agent_registration_state", (("state", "registered"),))] == 1
    info = requests.get(agent_url + "/info", timeout=5).json()
    assert info["gpus"] == [] and info["gpu_count"] == 0
    # scraping again does not re-log the missing driver (once per process, no traceback)
    for _ in range(3):
        assert requests.get(agent_url + "/metrics", timeout=5).status_code == 200
    time.sleep(0.2)
    assert agent.output().count("NVML is not available") == 1
    assert "Traceback" not in agent.output()


def _swallow(fn, *args):
    try:
        fn(*args)
    except requests.RequestException:
        pass

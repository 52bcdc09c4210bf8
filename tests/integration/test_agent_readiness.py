"""/readyz follows vLLM live: loading, model listed, warm-up, death, hang, restart.

Real PostgreSQL, Redis, control plane, simulator (with its fault API) and agent.
"""

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.agent.testing import agent_env, start_agent, start_sim
from gpufleet.controlplane.testing import cp_env, enrol_instance, start_control_plane
from support.procs import wait_until

MODEL = "tiny-llm"


@pytest.fixture
def cp(daemons, database_url, redis_url, tmp_path):
    """The control plane, with gpu-a and gpu-b added; their join secrets in tmp_path (see join_file)."""
    _, url = start_control_plane(daemons, cp_env(database_url, redis_url))
    for instance_id in ("gpu-a", "gpu-b"):
        enrol_instance(url, instance_id, MODEL, tmp_path)
    return url


def env_for(instance_id, cp_url, vllm_base_url, port, tmp_path):
    return agent_env(instance_id=instance_id, control_plane_url=cp_url, model_id=MODEL, vllm_base_url=vllm_base_url,
                     port=port, WORKER_JOIN_SECRET_FILE=tmp_path / f"{instance_id}.join-secret")


def readyz(agent_url):
    resp = requests.get(agent_url + "/readyz", timeout=5)
    return resp.status_code, resp.json()


def sim_requests_done(sim_url):
    text = requests.get(sim_url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "vllm:request_success_total")


def set_fault(sim_url, mode, scope="all", rate=1.0):
    resp = requests.post(sim_url + "/sim/faults", json={"mode": mode, "rate": rate, "scope": scope}, timeout=5)
    assert resp.status_code == 200, resp.text


def wait_readyz(agent_url, status, timeout=20.0, what=""):
    def probe():
        code, body = readyz(agent_url)
        return body if code == status else None
    return wait_until(probe, timeout=timeout, interval=0.05, what=what or f"/readyz {status}")


def test_not_ready_while_loading_then_ready_only_after_the_warm_up(daemons, cp, tmp_path):
    port = daemons.port()
    startup_delay = 5.0
    # --listen-while-loading: an open port that answers 503 (real vLLM keeps it closed; tests/vllm covers that)
    sim, sim_url = start_sim(daemons, MODEL, "--startup-delay", str(startup_delay), "--listen-while-loading",
                             "--enable-fault-api", port=port, wait=False)
    _, agent_url = start_agent(daemons, env_for("gpu-a", cp, sim_url, daemons.port(), tmp_path))
    # the model is "loading": /health answers 503; the port is open but that is never "ready"
    wait_until(lambda: requests.get(sim_url + "/health", timeout=2).status_code == 503, timeout=15,
               what="the simulator to answer 503 while loading")
    seen_503 = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        code, body = readyz(agent_url)
        assert code == 503, body
        assert "vllm_health" in body["failing"] and "warmup" in body["failing"]
        seen_503 += 1
        time.sleep(0.1)
    assert seen_503 >= 5

    wait_readyz(agent_url, 200, timeout=30, what="the agent to be ready once the model is loaded")
    # readiness came only after a real completion went through the simulator (the warm-up)
    assert sim_requests_done(sim_url) >= 1
    info = requests.get(agent_url + "/info", timeout=5).json()
    assert info["status"] == "ready" and info["served_models"] == [MODEL]
    assert info["versions"]["vllm"]


def test_model_not_listed_and_failing_warm_up_keep_it_unready(daemons, cp, tmp_path):
    # vLLM serves another name: healthy, but MODEL_ID is not listed
    _, other_url = start_sim(daemons, "some/other-model", name="sim-other")
    _, agent_url = start_agent(daemons, env_for("gpu-a", cp, other_url, daemons.port(), tmp_path), name="agent-other")
    wait_until(lambda: readyz(agent_url)[1]["failing"] == ["model_listed", "warmup"], timeout=15,
               what="only the model and warm-up checks to fail")
    assert "not among the served models" in readyz(agent_url)[1]["checks"]["model_listed"]["detail"]

    # every completion fails: health and models are fine, but without a successful warm-up it is not ready
    _, sim_url = start_sim(daemons, MODEL, "--enable-fault-api", "--fault-mode", "error", "--fault-rate", "1")
    _, agent_url = start_agent(daemons, env_for("gpu-b", cp, sim_url, daemons.port(), tmp_path))
    wait_until(lambda: (b := readyz(agent_url)[1])["failing"] == ["warmup"]
               and "failed" in b["checks"]["warmup"]["detail"], timeout=15, what="only the warm-up to fail")
    time.sleep(1.5)
    assert readyz(agent_url)[0] == 503
    set_fault(sim_url, "none", rate=0)
    wait_readyz(agent_url, 200, timeout=20, what="ready once a warm-up succeeds")


def test_unready_within_about_a_second_when_vllm_dies_or_hangs_and_back_after(daemons, cp, tmp_path):
    port = daemons.port()
    sim, sim_url = start_sim(daemons, MODEL, "--enable-fault-api", port=port)
    _, agent_url = start_agent(daemons, env_for("gpu-a", cp, sim_url, daemons.port(), tmp_path))
    wait_readyz(agent_url, 200, timeout=30)

    # a hang (every endpoint stops answering): cut by the poll timeout (0.5 s here)
    set_fault(sim_url, "hang", scope="all")
    started = time.monotonic()
    body = wait_readyz(agent_url, 503, timeout=10)
    hang_s = time.monotonic() - started
    assert "vllm_health" in body["failing"]
    assert hang_s < 3.0, f"a hung vLLM took {hang_s:.2f}s to show in /readyz"
    set_fault(sim_url, "none", rate=0)
    wait_readyz(agent_url, 200, timeout=20, what="ready again after the hang")

    # vLLM dies
    sim.kill9()
    started = time.monotonic()
    body = wait_readyz(agent_url, 503, timeout=10)
    dead_s = time.monotonic() - started
    assert "vllm_health" in body["failing"]
    assert dead_s < 2.0, f"a dead vLLM took {dead_s:.2f}s to show in /readyz"

    # vLLM restarts on the same port: ready again only after a fresh warm-up on the new process
    sim2, _ = start_sim(daemons, MODEL, "--startup-delay", "1", port=port, name="sim-restarted", wait=False)
    wait_readyz(agent_url, 200, timeout=30, what="ready again after vLLM restarted")
    assert sim_requests_done(sim_url) >= 1

"""Worker tokens end to end: enrolment with a join secret, persistence, restart, refusals, binding,
rotation.

Real PostgreSQL, Redis, control plane, simulator and agent processes.
"""

import json
import os
import stat
from pathlib import Path

import pytest
import requests

from gpufleet.agent.testing import agent_env, start_agent, start_sim
from gpufleet.controlplane.testing import ADMIN_TOKEN, cp_env, enrol_instance, run_cli, start_control_plane
from support.procs import wait_until

MODEL = "tiny-llm"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def cp(daemons, database_url, redis_url):
    _, url = start_control_plane(daemons, cp_env(database_url, redis_url))
    return url


def add_instance(cp_url, instance_id):
    """Add the instance; its join secret."""
    resp = requests.post(f"{cp_url}/v1/admin/instances", json={"instance_id": instance_id, "model_id": MODEL},
                         headers=ADMIN, timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()["join_secret"]


def registration(instance_id, worker_id=None):
    return {"instance_id": instance_id, "worker_id": worker_id or instance_id, "provider_instance_id": "",
            "model_id": MODEL, "advertise_url": "http://127.0.0.1:1", "agent_url": "http://127.0.0.1:2",
            "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "gpus": [], "agent_version": "test"}


def heartbeat(instance_id, worker_id=None):
    return {"instance_id": instance_id, "worker_id": worker_id or instance_id, "status": "starting",
            "model_id": MODEL, "queue_depth": 0, "running": 0, "kv_cache_usage": 0, "gpu_util": 0,
            "gpu_mem_used_mb": 0, "ttft_p95_ms": 0, "e2e_p95_ms": 0, "req_per_s": 0, "inflight": 0}


def post(cp_url, call, body, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{cp_url}/internal/worker/{call}", json=body, headers=headers, timeout=10)


def readyz(agent_url):
    return requests.get(agent_url + "/readyz", timeout=5)


def test_enrol_persist_restart_and_refusals(daemons, cp, tmp_path):
    secret_file = enrol_instance(cp, "gpu-a", MODEL, tmp_path)
    secret = Path(secret_file).read_text().strip()
    _, sim_url = start_sim(daemons, MODEL)
    token_file = tmp_path / "worker-token"
    env = agent_env(instance_id="gpu-a", control_plane_url=cp, model_id=MODEL, vllm_base_url=sim_url,
                    port=daemons.port(), WORKER_AUTH_TOKEN_FILE=token_file, WORKER_JOIN_SECRET_FILE=secret_file)
    agent, agent_url = start_agent(daemons, env)
    wait_until(lambda: readyz(agent_url).status_code == 200, timeout=30, what="the enrolled agent to be ready")

    token = token_file.read_text().strip()
    assert token.startswith("gfw_")
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert token not in agent.output() and secret not in agent.output()  # never logged
    assert requests.get(agent_url + "/info", timeout=5).json()["registration"]["token_source"] == "file"
    # the token works; the join secret was single use
    assert post(cp, "heartbeat", heartbeat("gpu-a"), token).status_code == 200
    assert post(cp, "register", registration("gpu-a"), secret).status_code == 401
    assert post(cp, "register", registration("gpu-a")).status_code == 401
    # an instance the control plane does not know: the same 401 without a credential, and
    # gpu-a's token may not act as another instance
    assert post(cp, "register", registration("ghost")).status_code == 401
    assert post(cp, "register", registration("ghost"), token).status_code == 403

    # restart: the agent reloads the token from the file and registers with it (no bootstrap)
    assert agent.stop() is not None
    agent2, agent_url = start_agent(daemons, env, name="agent-restarted")
    wait_until(lambda: readyz(agent_url).status_code == 200, timeout=30, what="the restarted agent to be ready")
    assert token_file.read_text().strip() == token
    log = agent2.output()
    assert "registered worker gpu-a" in log and "enrolled" not in log
    assert token not in log


def test_a_token_is_bound_to_its_instance(cp):
    secret_a = add_instance(cp, "gpu-a")
    secret_b = add_instance(cp, "gpu-b")
    token_a = post(cp, "register", registration("gpu-a"), secret_a).json()["bootstrap_token"]
    token_b = post(cp, "register", registration("gpu-b"), secret_b).json()["bootstrap_token"]
    assert token_a != token_b
    assert post(cp, "heartbeat", heartbeat("gpu-a"), token_a).status_code == 200
    # A's token can neither heartbeat nor register as B
    assert post(cp, "heartbeat", heartbeat("gpu-b"), token_a).status_code == 403
    assert post(cp, "register", registration("gpu-b"), token_a).status_code == 403
    # nor pass off B's worker as its own
    assert post(cp, "heartbeat", heartbeat("gpu-a", worker_id="gpu-b"), token_a).status_code == 403
    assert post(cp, "heartbeat", heartbeat("gpu-b"), token_b).status_code == 200
    assert post(cp, "heartbeat", heartbeat("gpu-b"), "gfw_not-a-real-token-at-all").status_code == 401


def test_a_rotated_token_replaces_the_old_one(daemons, cp, tmp_path):
    secret_file = enrol_instance(cp, "gpu-a", MODEL, tmp_path)
    _, sim_url = start_sim(daemons, MODEL)
    token_file = tmp_path / "worker-token"
    env = agent_env(instance_id="gpu-a", control_plane_url=cp, model_id=MODEL, vllm_base_url=sim_url,
                    port=daemons.port(), WORKER_AUTH_TOKEN_FILE=token_file, WORKER_JOIN_SECRET_FILE=secret_file)
    agent, agent_url = start_agent(daemons, env)
    wait_until(lambda: readyz(agent_url).status_code == 200, timeout=30, what="the agent to be ready")
    old = token_file.read_text().strip()

    new = rotate(cp, "gpu-a")
    assert new.startswith("gfw_") and new != old
    assert post(cp, "heartbeat", heartbeat("gpu-a"), old).status_code == 401
    assert post(cp, "heartbeat", heartbeat("gpu-a"), new).status_code == 200

    # the agent's next heartbeat is refused: not ready, a clear log line, no token in it
    body = wait_until(lambda: (r := readyz(agent_url)).status_code == 503 and r.json(), timeout=15,
                      what="the agent with a revoked token to turn unready")
    assert "registration" in body["failing"]
    wait_until(lambda: "rejected by the control plane" in agent.output(), timeout=10, what="the rejection log")
    assert old not in agent.output() and new not in agent.output()
    # it keeps retrying (no silent re-enrolment) and picks up the rotated token once written to its file
    tmp = tmp_path / "new-token"
    tmp.write_text(new + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, token_file)
    wait_until(lambda: readyz(agent_url).status_code == 200, timeout=20, what="the agent to use the rotated token")
    assert agent.output().count("enrolled with the join secret") == 1  # only the first start
    info = requests.get(agent_url + "/info", timeout=5).json()
    assert info["registration"]["accepted"] is True


def rotate(cp_url, instance_id):
    """``gpufleet tokens rotate INSTANCE``, the operator's way."""
    return json.loads(run_cli(cp_url, "--json", "tokens", "rotate", instance_id))["token"]

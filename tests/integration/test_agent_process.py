"""The agent as a process: configuration errors, and a control plane that is away."""

import os
import subprocess
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.agent.testing import TcpRelay, agent_env, start_agent, start_sim
from gpufleet.controlplane.testing import cp_env, enrol_instance, start_control_plane
from support.procs import console_script, wait_until

AGENT_VARS = ("INSTANCE_ID", "CONTROL_PLANE_URL", "MODEL_ID", "HEARTBEAT_INTERVAL_S", "AGENT_PORT", "GPUFLEET_BIND")


def run_agent(**env):
    full = {k: v for k, v in os.environ.items() if k not in AGENT_VARS}
    full.update(env)
    return subprocess.run([console_script("gpufleet-agent")], env=full, capture_output=True, text=True, timeout=60)


def test_config_errors_exit_2_naming_the_variable_without_a_traceback():
    cases = [
        ({"INSTANCE_ID": "gpu-01", "MODEL_ID": "m"}, "CONTROL_PLANE_URL is not set"),
        ({"CONTROL_PLANE_URL": "http://127.0.0.1:8003", "MODEL_ID": "m"}, "INSTANCE_ID is not set"),
        ({"INSTANCE_ID": "gpu-01", "CONTROL_PLANE_URL": "http://127.0.0.1:8003"}, "MODEL_ID is not set"),
        ({"INSTANCE_ID": "gpu-01", "CONTROL_PLANE_URL": "http://127.0.0.1:8003", "MODEL_ID": "m",
          "HEARTBEAT_INTERVAL_S": "ten"}, "HEARTBEAT_INTERVAL_S='ten' is not a number"),
        ({"INSTANCE_ID": "gpu-01", "CONTROL_PLANE_URL": "cp:8003", "MODEL_ID": "m"}, "CONTROL_PLANE_URL"),
    ]
    for env, needle in cases:
        result = run_agent(**env)
        assert result.returncode == 2, (env, result.stderr)
        assert needle in result.stderr
        assert "Traceback" not in result.stderr
    assert "e.g. CONTROL_PLANE_URL=http://" in run_agent(**cases[0][0]).stderr  # says what to set


def calls(agent_url, result):
    text = requests.get(agent_url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "gpufleet_agent_controlplane_calls_total" and s.labels["result"] == result)


def test_an_unreachable_control_plane_is_retried_with_backoff_never_fatal(daemons, database_url, redis_url,
                                                                          tmp_path):
    _, cp = start_control_plane(daemons, cp_env(database_url, redis_url))
    secret_file = enrol_instance(cp, "gpu-a", "tiny-llm", tmp_path)
    host, _, port = cp.removeprefix("http://").rpartition(":")
    relay = TcpRelay(host, int(port))
    relay.cut()  # the control plane is unreachable from the worker
    try:
        _, sim_url = start_sim(daemons, "tiny-llm")
        agent, agent_url = start_agent(daemons, agent_env(
            instance_id="gpu-a", control_plane_url=relay.url, model_id="tiny-llm", vllm_base_url=sim_url,
            port=daemons.port(), CONTROL_PLANE_RETRY_MAX_S="2", WORKER_JOIN_SECRET_FILE=secret_file))
        time.sleep(6)
        assert agent.alive()
        errors = calls(agent_url, "error")
        # back-off: 0.25–0.5, 0.5–1, 1–2, then 1–2 s per attempt: a handful of attempts in 6 s, not a tight loop
        assert 2 <= errors <= 12, errors
        body = requests.get(agent_url + "/readyz", timeout=5).json()
        assert body["failing"] == ["token", "registration"]
        assert "unreachable" in body["checks"]["registration"]["detail"]
        text = requests.get(agent_url + "/metrics", timeout=5).text
        assert 'gpufleet_agent_registration_state{state="unreachable"} 1.0' in text
        assert agent.output().count("retrying with back-off") == 1  # logged once, not per attempt

        relay.restore()
        wait_until(lambda: requests.get(agent_url + "/readyz", timeout=5).status_code == 200, timeout=20,
                   what="the agent to register once the control plane is reachable")
    finally:
        relay.close()


def _non_loopback_ipv4() -> str | None:
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing address
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_by_default_the_agent_listens_on_its_advertised_address_and_loopback_only(daemons, tmp_path):
    address = _non_loopback_ipv4()
    if address is None:
        import pytest  # noqa: PLC0415

        pytest.skip("this machine has no non-loopback IPv4 address")
    port = daemons.port()
    env = agent_env(instance_id="gpu-a", control_plane_url="http://127.0.0.1:9", model_id="m",
                    vllm_base_url="http://127.0.0.1:9", port=port, GPUFLEET_BIND=None,
                    AGENT_PORT=str(port), ADVERTISE_URL=f"http://{address}:8000")
    agent = daemons.start("agent", [console_script("gpufleet-agent")], env)
    wait_until(lambda: requests.get(f"http://{address}:{port}/healthz", timeout=2).status_code == 200, timeout=30,
               what="the agent on its advertised address")
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200  # local operators
    try:
        requests.get(f"http://127.0.0.2:{port}/healthz", timeout=2)  # another local address: not bound
        raise AssertionError("the agent answered on 127.0.0.2: it listens on every interface")
    except requests.ConnectionError:
        pass
    assert agent.alive()

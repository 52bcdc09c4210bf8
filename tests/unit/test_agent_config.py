"""The agent's environment: defaults, derived URLs, and errors that name what to set."""

import os
import stat

import pytest

from gpufleet.agent.config import load_config
from gpufleet.common.config import ConfigError

BASE = {"INSTANCE_ID": "gpu-01", "CONTROL_PLANE_URL": "http://127.0.0.1:8003", "MODEL_ID": "m"}


def test_defaults_and_derived_urls():
    config = load_config({**BASE, "ADVERTISE_URL": "http://100.64.0.7:8000/"})
    assert config.worker_id == "gpu-01"
    assert config.vllm_base_url == "http://127.0.0.1:8000"
    assert config.advertise_url == "http://100.64.0.7:8000"
    assert config.agent_url == "http://100.64.0.7:8080"  # advertise host + agent port
    # it listens on its advertised address (and loopback for local operators), not 0.0.0.0
    assert (config.bind_host, config.bind_port, config.extra_bind_hosts) == ("100.64.0.7", 8080, ("127.0.0.1",))
    assert config.heartbeat_interval_s == 10.0
    assert config.tensor_parallel_size == 1


def test_advertise_defaults_to_vllm_and_bind_wins_over_agent_port():
    config = load_config({**BASE, "VLLM_BASE_URL": "http://10.0.0.5:9000", "AGENT_PORT": "9100",
                          "WORKER_ID": "w-7", "TENSOR_PARALLEL_SIZE": "4", "GPU_MEMORY_UTILIZATION": "0.85"})
    assert config.advertise_url == "http://10.0.0.5:9000"
    assert config.agent_url == "http://10.0.0.5:9100"
    assert config.worker_id == "w-7" and config.tensor_parallel_size == 4
    assert config.gpu_memory_utilization == pytest.approx(0.85)
    config = load_config({**BASE, "GPUFLEET_BIND": "127.0.0.1:9200", "AGENT_PORT": "9100"})
    assert (config.bind_host, config.bind_port, config.extra_bind_hosts) == ("127.0.0.1", 9200, ())
    assert config.agent_url == "http://127.0.0.1:9200"


@pytest.mark.parametrize("env, needle", [
    ({"CONTROL_PLANE_URL": "http://cp:8003", "MODEL_ID": "m"}, "INSTANCE_ID is not set"),
    ({"INSTANCE_ID": "i", "MODEL_ID": "m"}, "CONTROL_PLANE_URL is not set"),
    ({"INSTANCE_ID": "i", "CONTROL_PLANE_URL": "http://cp:8003"}, "MODEL_ID is not set"),
    ({**BASE, "CONTROL_PLANE_URL": "cp:8003"}, "CONTROL_PLANE_URL"),
    ({**BASE, "HEARTBEAT_INTERVAL_S": "soon"}, "HEARTBEAT_INTERVAL_S"),
    ({**BASE, "AGENT_PORT": "70000"}, "AGENT_PORT"),
    ({**BASE, "TENSOR_PARALLEL_SIZE": "0"}, "TENSOR_PARALLEL_SIZE"),
    ({**BASE, "GPU_MEMORY_UTILIZATION": "1.5"}, "GPU_MEMORY_UTILIZATION"),
    ({**BASE, "GPUFLEET_BIND": "8080"}, "GPUFLEET_BIND"),
    ({**BASE, "WORKER_AUTH_TOKEN_FILE": "/nonexistent-dir/token"}, "WORKER_AUTH_TOKEN_FILE"),
])
def test_bad_settings_name_the_variable(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(env)


def test_token_file_folder_must_exist_but_the_file_may_not(tmp_path):
    config = load_config({**BASE, "WORKER_AUTH_TOKEN_FILE": str(tmp_path / "token")})
    assert config.worker_auth_token_file == str(tmp_path / "token")
    assert not (tmp_path / "token").exists()
    assert stat.S_ISDIR(os.stat(tmp_path).st_mode)


def test_default_bind_follows_agent_url_and_stays_local_without_an_advertised_address():
    assert (load_config(BASE).bind_host, load_config(BASE).extra_bind_hosts) == ("127.0.0.1", ())
    config = load_config({**BASE, "AGENT_URL": "http://gpu-01.tailnet.ts.net:8080"})
    assert (config.bind_host, config.extra_bind_hosts) == ("gpu-01.tailnet.ts.net", ("127.0.0.1",))


def test_join_secret_file_must_be_private(tmp_path):
    path = tmp_path / "join-secret"
    assert load_config({**BASE, "WORKER_JOIN_SECRET_FILE": str(path)}).worker_join_secret_file == str(path)  # not yet
    path.write_text("gfj_x\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config({**BASE, "WORKER_JOIN_SECRET_FILE": str(path)})
    path.chmod(0o600)
    assert load_config({**BASE, "WORKER_JOIN_SECRET_FILE": str(path)}).worker_join_secret_file == str(path)

"""Worker payload validation and control plane configuration."""

import pytest

from gpufleet.common.config import ConfigError
from gpufleet.common.ids import sha256_hex
from gpufleet.controlplane.config import ControlPlaneConfig
from gpufleet.controlplane.validation import PayloadError, parse_heartbeat, parse_registration

REG = {"instance_id": "i-1", "worker_id": "i-1", "model_id": "meta-llama/Llama-3.1-8B-Instruct",
       "advertise_url": "http://100.64.0.7:8000/", "agent_url": "http://100.64.0.7:8080",
       "tensor_parallel_size": 2, "gpu_memory_utilization": 0.9,
       "gpus": [{"index": 0, "name": "H100", "memory_total_mb": 81559}], "agent_version": "0.2.0",
       "some_future_field": 1}


def test_registration_parses_and_normalises():
    reg = parse_registration(REG)
    assert reg.advertise_url == "http://100.64.0.7:8000" and reg.tensor_parallel_size == 2
    assert reg.gpus == [{"index": 0, "name": "H100", "memory_total_mb": 81559.0}]


@pytest.mark.parametrize("field, value", [
    ("advertise_url", "http://user:pw@h:1"), ("advertise_url", "http://h:99999"), ("agent_url", "h:8080"),
    ("instance_id", ""), ("instance_id", 5), ("model_id", "has space"), ("gpu_memory_utilization", float("nan")),
    ("tensor_parallel_size", 0), ("gpus", [1]),
    ("advertise_url", "https://h:1"), ("agent_url", "http://h"), ("agent_url", "http://h:1\r\nX: y"),
    ("agent_url", "http://h:1/a b"), ("agent_url", "http://ex\u2028ample:1"), ("agent_url", "http://a..b:1"),
    ("agent_url", "http://" + "a" * 64 + ".example:1"), ("provider_instance_id", "p\x1b[31m"),
    ("model_id", "m\x00"),
])
def test_registration_rejects_and_names_the_field(field, value):
    with pytest.raises(PayloadError) as info:
        parse_registration({**REG, field: value})
    assert field in str(info.value) or field == "gpus"


def test_heartbeat_defaults_and_strictness():
    hb = parse_heartbeat({"instance_id": "i", "worker_id": "w", "status": "ready", "model_id": "m",
                          "queue_depth": 3.0, "gpu_util": 50})
    assert (hb.queue_depth, hb.gpu_util, hb.running, hb.ttft_p95_ms) == (3, 50.0, 0, 0.0)
    for bad in ({"queue_depth": -1}, {"gpu_util": 101}, {"running": True}, {"status": "READY"}):
        with pytest.raises(PayloadError):
            parse_heartbeat({"instance_id": "i", "worker_id": "w", "status": "ready", "model_id": "m", **bad})
    with pytest.raises(PayloadError, match="JSON object"):
        parse_heartbeat([])


ENV = {"GPUFLEET_DATABASE_URL": "postgresql://u:secretpw@db/gpufleet", "GPUFLEET_REDIS_URL": "redis://:rpw@r:6379/0",
       "GPUFLEET_ADMIN_TOKEN": "gfa_0123456789abcdefghij"}


def test_config_defaults_and_admin_token_forms():
    config = ControlPlaneConfig.from_env(ENV)
    assert (config.bind_host, config.bind_port, config.redis_prefix) == ("0.0.0.0", 8003, "gpufleet:")
    assert (config.heartbeat_interval_s, config.reconcile_interval_s, config.probe_timeout_s) == (10, 5, 2)
    assert (config.workers, config.max_body_bytes, config.migrate_on_start) == (2, 65536, False)
    assert config.admin_token_hash == sha256_hex("gfa_0123456789abcdefghij")
    assert config.stale_after_s == 30
    hashed = ControlPlaneConfig.from_env({**ENV, "GPUFLEET_ADMIN_TOKEN": "sha256:" + "AB" * 32})
    assert hashed.admin_token_hash == "ab" * 32
    # secrets stay out of reprs and descriptions
    assert "secretpw" not in repr(config) + config.describe() and "rpw" not in config.describe()
    assert "gfa_" not in repr(config)


@pytest.mark.parametrize("change, message", [
    ({"GPUFLEET_DATABASE_URL": None}, "GPUFLEET_DATABASE_URL is not set"),
    ({"GPUFLEET_DATABASE_URL": "mysql://x"}, "not a PostgreSQL DSN"),
    ({"GPUFLEET_REDIS_URL": None}, "GPUFLEET_REDIS_URL is not set"),
    ({"GPUFLEET_ADMIN_TOKEN": None}, "GPUFLEET_ADMIN_TOKEN is not set"),
    ({"GPUFLEET_ADMIN_TOKEN": "short"}, "too short"),
    ({"GPUFLEET_ADMIN_TOKEN": "sha256:xyz"}, "64 hex digits"),
    ({"GPUFLEET_BIND": "nope"}, "host:port"),
    ({"GPUFLEET_HEARTBEAT_INTERVAL_S": "0"}, "below the minimum"),
    ({"GPUFLEET_MIGRATE_ON_START": "maybe"}, "boolean"),
])
def test_config_errors_say_what_to_set(change, message):
    env = {**ENV, **change}
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        ControlPlaneConfig.from_env(env)


def test_reconciler_does_not_need_the_admin_token():
    env = {k: v for k, v in ENV.items() if k != "GPUFLEET_ADMIN_TOKEN"}
    assert ControlPlaneConfig.from_env(env, need_admin_token=False).admin_token_hash == ""


def test_worker_urls_accept_ip_literals_dns_and_idna_names():
    for value in ("http://10.0.0.7:8000", "http://[fd7a:115c::7]:8000", "http://gpu-1.tailnet.ts.net:8080/agent",
                  "http://bücher.example:8000", "http://localhost:8000"):
        assert parse_registration({**REG, "agent_url": value}).agent_url == value


def test_https_is_refused_with_a_message_that_says_why():
    with pytest.raises(PayloadError, match="https worker URLs are not supported yet"):
        parse_registration({**REG, "advertise_url": "https://100.64.0.7:8000"})

"""The control plane's Prometheus service discovery: which targets, with which labels."""

import pytest

from gpufleet.common.config import ConfigError, Env
from gpufleet.common.ids import sha256_hex
from gpufleet.controlplane.sd import SdSettings, discover


def row(worker_id, *, model="llama", age=1.0, retired=False, agent="http://10.0.0.5:8080",
        vllm="http://10.0.0.5:8000"):
    return {"worker_id": worker_id, "instance_id": f"i-{worker_id}", "model_id": model, "agent_url": agent,
            "advertise_url": vllm, "heartbeat_age_s": age, "retired_at": "2026-01-01" if retired else None}


def test_each_worker_gives_its_agent_and_its_vllm_with_identity_labels():
    groups = discover([row("w1")], SdSettings())
    assert groups == [
        {"targets": ["10.0.0.5:8080"], "labels": {"__scheme__": "http", "__metrics_path__": "/metrics",
                                                  "role": "agent", "worker_id": "w1", "instance_id": "i-w1",
                                                  "model": "llama"}},
        {"targets": ["10.0.0.5:8000"], "labels": {"__scheme__": "http", "__metrics_path__": "/metrics",
                                                  "role": "vllm", "worker_id": "w1", "instance_id": "i-w1",
                                                  "model": "llama"}},
    ]


def test_routers_and_control_planes_from_settings_and_url_paths_and_schemes_kept():
    settings = SdSettings(router_urls=("https://r1.tailnet:8002",), controlplane_urls=("http://cp:8003/gpufleet",))
    groups = discover([row("w1", vllm="http://10.0.0.5:8000/prefix/")], settings)
    assert groups[0] == {"targets": ["cp:8003"], "labels": {"__scheme__": "http",
                                                           "__metrics_path__": "/gpufleet/metrics",
                                                           "role": "controlplane"}}
    assert groups[1] == {"targets": ["r1.tailnet:8002"], "labels": {"__scheme__": "https",
                                                                   "__metrics_path__": "/metrics", "role": "router"}}
    assert groups[3]["labels"]["__metrics_path__"] == "/prefix/metrics"


def test_retired_silent_and_never_seen_workers_leave_the_list():
    rows = [row("b-live", age=5), row("a-retired", retired=True), row("c-silent", age=601), row("d-never", age=None)]
    groups = discover(rows, SdSettings(forget_after_s=600))
    assert {g["labels"]["worker_id"] for g in groups} == {"b-live"}


def test_the_answer_is_sorted_so_prometheus_sees_no_churn():
    assert discover([row("b"), row("a")], SdSettings()) == discover([row("a"), row("b")], SdSettings())
    assert [g["labels"]["worker_id"] for g in discover([row("b"), row("a")], SdSettings())] == ["a", "a", "b", "b"]


def test_settings_from_the_environment():
    settings = SdSettings.from_env(Env({"GPUFLEET_SD_TOKEN": "gfs_0123456789abcdef",
                                        "GPUFLEET_SD_ROUTER_URLS": "http://r1:8002, http://r2:8002/",
                                        "GPUFLEET_SD_FORGET_AFTER_S": "60"}))
    assert settings.token_hash == sha256_hex("gfs_0123456789abcdef")
    assert settings.router_urls == ("http://r1:8002", "http://r2:8002")
    assert settings.forget_after_s == 60
    assert "gfs_" not in repr(settings)
    assert SdSettings.from_env(Env({})).token_hash == ""  # discovery off
    assert SdSettings.from_env(Env({"GPUFLEET_SD_TOKEN": "sha256:" + "ab" * 32})).token_hash == "ab" * 32


@pytest.mark.parametrize(("env", "message"), [
    ({"GPUFLEET_SD_TOKEN": "short"}, "GPUFLEET_SD_TOKEN is too short"),
    ({"GPUFLEET_SD_TOKEN": "sha256:xyz"}, "64 hex digits"),
    ({"GPUFLEET_SD_ROUTER_URLS": "r1:8002"}, "GPUFLEET_SD_ROUTER_URLS"),
])
def test_bad_settings_say_what_to_fix(env, message):
    with pytest.raises(ConfigError, match=message):
        SdSettings.from_env(Env(env))
